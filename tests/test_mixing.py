"""data.sources: a mixture of datasets, each source's rows drawn with data.seed, counted per
source in the manifest and the report, fingerprinted."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import tiny_config
from pipeline.core.config import ConfigError, config_from_dict, to_dict
from pipeline.core.mixing import sample
from pipeline.core.rundir import HashCache
from pipeline.tokenizing import tokenize


def pairs(tag, n):
    return [{"prompt": f"Describe {tag} item {i}.", "chosen": " It is great.", "rejected": " It is awful."}
            for i in range(n)]


def write_inputs(tmp_path):
    a = tmp_path / "a.jsonl"
    a.write_text("".join(json.dumps(r) + "\n" for r in pairs("alpha", 100)))
    b = tmp_path / "b.parquet"
    pq.write_table(pa.Table.from_pylist(pairs("beta", 50)), b, row_group_size=8)
    return a, b


def run(assets, tmp_path, name, mixture, seed=42, **tok):
    raw = to_dict(tiny_config(assets, tmp_path / name, tokenize={"rows_per_task": 16, **tok},
                              data={"eval_fraction": 0.0, "seed": seed}))
    raw["data"]["train_files"] = []
    raw["data"]["sources"] = mixture
    cfg = config_from_dict(raw)
    out = tmp_path / name / "out"
    out.mkdir(parents=True)
    _, stats = tokenize.run_in_process(cfg, out)
    rows = pa.concat_tables([pq.read_table(p) for p in sorted(out.glob("train-*.parquet"))]).to_pylist()
    return cfg, stats, sorted(pid for r in rows for pid in r["pair_ids"])


def test_each_source_gives_its_share_drawn_with_the_seed(assets, tmp_path):
    a, b = write_inputs(tmp_path)
    mixture = [{"name": "alpha", "files": str(a), "weight": 0.3}, {"files": [str(b)], "max_pairs": 20}]
    cfg, stats, ids = run(assets, tmp_path, "one", mixture)
    assert stats["sources"] == {
        "alpha": {"rows": 100, "sampled_rows": 30, "pairs": 30, "quarantined": 0, "format": "standard"},
        "b": {"rows": 50, "sampled_rows": 20, "pairs": 20, "quarantined": 0, "format": "standard"},  # the file's name
    }
    assert stats["input_rows"] == stats["pairs"] == len(ids) == 50
    # The same seed draws the same rows, whatever the read units; another seed others.
    _, _, again = run(assets, tmp_path, "again", mixture, rows_per_task=7)
    assert again == ids
    _, other_stats, other = run(assets, tmp_path, "other", mixture, seed=7)
    assert other_stats["sources"] == stats["sources"] and other != ids
    # weight 1 and no limit: every row
    _, full, _ = run(assets, tmp_path, "full", [{"files": str(a)}, {"files": str(b), "weight": 1.0}])
    assert full["sources"]["a"]["sampled_rows"] == 100 and full["sources"]["b"]["pairs"] == 50


def pair_tokens(out_dir) -> dict:
    """{pair id: (prompt, chosen, rejected) token lists} of a tokenize output's train rows."""
    from stages.generate.prompts import pairs_of_row

    rows = pa.concat_tables([pq.read_table(p) for p in sorted(out_dir.glob("train-*.parquet"))]).to_pylist()
    return {pid: (p, c, r) for row in rows for pid, p, c, r in pairs_of_row(
        row["input_ids"], row["seq_lens"], row["prompt_lens"], row["pair_ids"])}


def test_each_source_of_a_mixture_has_its_own_format(assets, tmp_path):
    """Conversational pairs, implicit-prompt pairs (HH-RLHF's shape: chosen and rejected
    strings sharing the prompt, here under column names of their own) and standard pairs
    with a row of several rejected answers, mixed: each source gives the pairs it gives
    alone, token for token (it quarantined the minority formats' rows as missing_field /
    mixed_formats), and the manifest names each source's format."""
    from pipeline.demo import make_pairs, write_jsonl

    chat = tmp_path / "chat.jsonl"
    write_jsonl(make_pairs(30, seed=4), chat)
    hh = tmp_path / "hh.jsonl"
    write_jsonl([{"good": f"\n\nHuman: What about item {i}?\n\nAssistant: It is great.",
                  "bad": f"\n\nHuman: What about item {i}?\n\nAssistant: It is awful."} for i in range(20)]
                + [{"good": "\n\nHuman: Hi\n\nAssistant: Same.", "bad": "\n\nHuman: Hi\n\nAssistant: Same."}], hh)
    std = tmp_path / "std.jsonl"
    rows = pairs("gamma", 10)
    rows[0]["rejected"] = [" It is awful.", " It is dull.", " It is broken."]
    write_jsonl(rows, std)
    sources = {"chat": chat, "hh": hh, "std": std}
    own = {"hh": {"chosen_key": "good", "rejected_key": "bad"}}
    mixture = [{"name": name, "files": str(path), **own.get(name, {})} for name, path in sources.items()]
    _, stats, _ = run(assets, tmp_path, "mixed", mixture)
    assert stats["quarantine_reasons"] == {"empty_completion": 1}  # hh's last row, named with its source
    bad = pq.read_table(tmp_path / "mixed" / "out" / "quarantine.parquet").to_pylist()
    assert [(b["source_name"], b["source"], b["row_index"]) for b in bad] == [("hh", str(hh), 20)]
    assert {n: c["format"] for n, c in stats["sources"].items()} == {
        "chat": "conversational", "hh": "implicit_standard", "std": "standard"}
    assert {n: c["pairs"] for n, c in stats["sources"].items()} == {"chat": 30, "hh": 20, "std": 12}
    mixed = pair_tokens(tmp_path / "mixed" / "out")
    alone = {}
    for name, path in sources.items():
        _, alone_stats, _ = run(assets, tmp_path, f"alone-{name}", [{"name": name, "files": str(path), **own.get(name, {})}])
        assert alone_stats["quarantined"] == (name == "hh")
        alone.update(pair_tokens(tmp_path / f"alone-{name}" / "out"))
    assert len(mixed) == 62 and mixed == alone


def test_the_draw_keeps_exactly_its_count_and_units_that_keep_nothing_are_left_out():
    chunks = [dict(label="f", group="s", rows=10, first_row=10 * i, unit=i) for i in range(10)]
    kept, counts = sample(chunks, [{"name": "s", "max_pairs": 3}], seed=0)
    assert counts == {"s": {"rows": 100, "sampled_rows": 3}}
    assert len(kept) <= 3 and sum(len(c["keep"]) for c in kept) == 3
    assert all(0 <= k < 10 for c in kept for k in c["keep"])
    kept, _ = sample(chunks, [{"name": "s"}], seed=0)
    assert kept == chunks  # all of it: no draw, every unit as planned


def test_the_mixture_is_fingerprinted_and_reported(assets, tmp_path):
    from pipeline.report import write_report

    a, b = write_inputs(tmp_path)
    mixture = [{"name": "alpha", "files": str(a), "weight": 0.3}, {"name": "beta", "files": str(b)}]
    cfg, stats, _ = run(assets, tmp_path, "fp", mixture)
    cache = HashCache(tmp_path / "hashes.json")
    fp = tokenize.fingerprint_inputs(cfg, cache)
    assert fp["mixture"][0] == {"name": "alpha", "weight": 0.3, "max_pairs": None, "files": [str(a)],
                                "hf_dataset": None, "checks": 2}
    raw = to_dict(cfg)
    raw["data"]["sources"][0]["weight"] = 0.4
    assert tokenize.fingerprint_inputs(config_from_dict(raw), cache) != fp
    # a config without a mixture fingerprints as before data.sources existed
    plain = tokenize.fingerprint_inputs(tiny_config(assets, tmp_path / "plain"), cache)
    assert "sources" not in plain["data_settings"] and "mixture" not in plain
    report = write_report(tmp_path / "fp", {"tokenize": {"ran": True, "rows": 1, "tokens": 1, "seconds": 0,
                                                         "dir": str(tmp_path), "stats": stats}})
    text = report.read_text()
    assert "| alpha | 100 | 30 | 30 | 0 | standard |" in text and "| beta | 50 | 50 | 50 | 0 | standard |" in text
    # a source's own column names are fingerprinted where set
    raw["data"]["sources"][0]["weight"] = 0.3
    raw["data"]["sources"][1]["prompt_key"] = "question"
    keyed = tokenize.fingerprint_inputs(config_from_dict(raw), cache)
    assert keyed["mixture"][0] == fp["mixture"][0] and keyed["mixture"][1]["prompt_key"] == "question"


@pytest.mark.parametrize("source, message", [
    ({"files": "a.jsonl", "weight": 1.5}, r"data.sources\[0\].weight: the fraction of the source's rows kept, in \(0, 1\]"),
    ({"files": "a.jsonl", "weight": 0.5, "max_pairs": 2}, r"data.sources\[0\]: weight or max_pairs, not both"),
    ({"files": "a.jsonl", "max_pairs": 0}, r"data.sources\[0\].max_pairs: an integer >= 1"),
    ({"weight": 0.5}, r"data.sources\[0\]: exactly one of files and hf_dataset"),
    ({"files": "a.jsonl", "ratio": 1}, r"data.sources\[0\]: unknown key ratio"),
    ({"hf_dataset": {"name": "x"}}, r"data.sources\[0\].hf_dataset.path: required"),
    ({"files": "a.jsonl", "chosen_key": 3}, r"data.sources\[0\].chosen_key: a column name \(got 3\)"),
])
def test_a_bad_source_names_its_key(assets, tmp_path, source, message):
    raw = to_dict(tiny_config(assets, tmp_path))
    raw["data"]["train_files"] = []
    raw["data"]["sources"] = [source]
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw)
    raw["data"]["sources"] = [{"files": "x/a.jsonl"}, {"files": "y/a.jsonl"}]
    with pytest.raises(ConfigError, match=r"data.sources\[1\].name: 'a' names two sources"):
        config_from_dict(raw)
    raw["data"]["train_files"] = ["a.jsonl"]
    with pytest.raises(ConfigError, match=r"exactly one is required \(set: data.train_files, data.sources\)"):
        config_from_dict(raw)


@pytest.mark.slow
def test_a_mixture_on_ray_writes_the_shards_of_the_in_process_run(assets, tmp_path, ray_cluster):
    import pyarrow.csv as pacsv

    a, b = write_inputs(tmp_path)
    c = tmp_path / "c.csv"
    pacsv.write_csv(pa.Table.from_pylist(pairs("gamma", 40)), c)  # CSV units carry a header range, others not
    mixture = [{"files": str(a), "weight": 0.5}, {"files": str(b)}, {"files": str(c), "max_pairs": 25}]
    raw = to_dict(tiny_config(assets, tmp_path / "run", tokenize={"rows_per_task": 16}))
    raw["data"]["train_files"] = []
    raw["data"]["sources"] = mixture
    cfg = config_from_dict(raw)
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    local.mkdir()
    on_ray.mkdir()
    shards_local, stats_local = tokenize.run_in_process(cfg, local)
    shards_ray, stats_ray = tokenize.run_on_ray(cfg, on_ray)
    assert [s.sha256 for s in shards_local] == [s.sha256 for s in shards_ray]
    assert stats_ray["sources"] == stats_local["sources"]
    assert {name: s["pairs"] for name, s in stats_ray["sources"].items()} == {"a": 50, "b": 50, "c": 25}


def test_files_without_a_mixture_are_one_dataset_and_a_source_without_good_rows_says_so(assets, tmp_path):
    """data.train_files over two files of two formats: one dataset, one format, the other
    file's rows quarantined as before (per-source formats are a mixture's). In a mixture, a
    source whose every row is bad (a column name misspelt) has no format, and the other
    source's rows keep theirs."""
    from pipeline.demo import make_pairs, write_jsonl

    a, _ = write_inputs(tmp_path)  # 100 standard pairs
    chat = tmp_path / "chat.jsonl"
    write_jsonl(make_pairs(10, seed=4), chat)
    raw = to_dict(tiny_config(assets, tmp_path / "files", tokenize={"max_bad_fraction": 0.5},
                              data={"eval_fraction": 0.0}))
    raw["data"]["train_files"] = [str(a), str(chat)]
    out = tmp_path / "files" / "out"
    out.mkdir(parents=True)
    _, stats = tokenize.run_in_process(config_from_dict(raw), out)
    assert stats["format"] == "standard" and stats["quarantine_reasons"] == {"mixed_formats": 10}
    assert "source_formats" not in stats and "sources" not in stats
    bad = pq.read_table(out / "quarantine.parquet")
    assert "source_name" not in bad.column_names
    assert set(bad.column("detail").to_pylist()) == {"the dataset is standard, this row is conversational"}

    mixture = [{"name": "alpha", "files": str(a)}, {"name": "chat", "files": str(chat), "prompt_key": "question"}]
    _, stats, _ = run(assets, tmp_path, "mixed", mixture, max_bad_fraction=0.5)
    assert stats["sources"]["alpha"]["format"] == "standard" and stats["sources"]["chat"]["format"] is None
    assert stats["sources"]["chat"]["quarantined"] == 10


def test_sft_data_sources_refuse_preference_column_names(assets, tmp_path):
    raw = to_dict(tiny_config(assets, tmp_path))
    raw["sft"] = {"enabled": True, "data": {"sources": [{"files": "a.jsonl", "chosen_key": "good"}]}}
    with pytest.raises(ConfigError, match=r"sft.data.sources\[0\].chosen_key: per-source column names are for "):
        config_from_dict(raw)


def test_two_sources_that_share_a_label_stay_two_sources(assets, tmp_path):
    """One file named in two sources (as two hf_dataset json sources share "hf:json[train]"):
    each record keeps its own source, its format, its count."""
    a, _ = write_inputs(tmp_path)
    mixture = [{"name": "first", "files": str(a), "max_pairs": 10}, {"name": "second", "files": str(a), "max_pairs": 20}]
    _, stats, ids = run(assets, tmp_path, "shared", mixture)
    assert {n: (c["pairs"], c["format"]) for n, c in stats["sources"].items()} == {
        "first": (10, "standard"), "second": (20, "standard")}
    assert len(ids) == 30 and len(set(ids)) == 30  # a pair id each, the source's label in it
