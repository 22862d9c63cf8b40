"""Every input format and every bad-row reason through the real tokenize stage core:
each input row ends up in a packed row or in quarantine with its reason."""

import csv
import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import tiny_config
from pipeline.core.config import config_from_dict, to_dict
from pipeline.core.packing import first_fit_decreasing
from pipeline.tokenizing import tokenize


def conv(prompt, chosen, rejected, system=None):
    p = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return {"prompt": p, "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


ITEMS = ["lamp", "river", "piano", "tower", "garden", "candle", "bridge", "castle"]
GOOD, BAD = ["great", "lovely", "clean", "bright"], ["awful", "dull", "ugly", "dirty"]


def standard_rows(n):
    return [{"prompt": f"Describe the {ITEMS[i % 8]} number {i}.", "chosen": f" It is {GOOD[i % 4]}.",
             "rejected": f" It is {BAD[i % 4]}."} for i in range(n)]


def conversational_rows(n):
    return [conv(f"Describe the {ITEMS[i % 8]} number {i}.", f"It is {GOOD[i % 4]}.", f"It is {BAD[i % 4]}.",
                 system="Be brief." if i % 2 else None) for i in range(n)]


def run_stage(assets, tmp_path, files=None, hf_dataset=None, **groups):
    cfg = tiny_config(assets, tmp_path / "run", tokenize={"max_tokens_per_row": 256, "rows_per_task": 7,
                                                           **groups.pop("tokenize", {})},
                      data={"eval_fraction": 0.2, **groups.pop("data", {})})
    raw = to_dict(cfg)
    raw["data"]["train_files"] = [str(f) for f in files] if files else []
    raw["data"]["hf_dataset"] = hf_dataset
    cfg = config_from_dict(raw)
    out = tmp_path / "out"
    out.mkdir(parents=True, exist_ok=True)
    shards, stats = tokenize.run_in_process(cfg, out)
    rows = pa.concat_tables([pq.read_table(p) for p in sorted(out.glob("*-0*.parquet"))]).to_pylist()
    quarantine = pq.read_table(out / "quarantine.parquet").to_pylist()
    return stats, rows, quarantine


def accounted(stats, rows, quarantine, n_records):
    """Every record (row x rejected completion) is packed exactly once or quarantined."""
    packed = [p for r in rows for p in r["pair_ids"]]
    assert len(packed) == len(set(packed)) == stats["pairs"]
    assert stats["pairs"] + len(quarantine) == stats["records"] == n_records


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("kind", ["jsonl", "json", "json_lines_named_json", "parquet", "csv", "hf_disk",
                                  "load_dataset", "directory_glob", "uri_files", "uri_glob"])
def test_every_file_kind_reads_every_row(assets, tmp_path, kind):
    rows = standard_rows(40)
    if kind == "jsonl":
        files = [write_jsonl(tmp_path / "d.jsonl", rows)]
    elif kind == "json":
        (tmp_path / "d.json").write_text(json.dumps(rows))
        files = [tmp_path / "d.json"]
    elif kind == "json_lines_named_json":
        files = [write_jsonl(tmp_path / "d.json", rows)]
    elif kind == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet", row_group_size=6)
        files = [tmp_path / "d.parquet"]
    elif kind == "csv":
        with open(tmp_path / "d.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["prompt", "chosen", "rejected"])
            w.writeheader()
            w.writerows(rows)
        files = [tmp_path / "d.csv"]
    elif kind == "hf_disk":
        import datasets

        datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "ds"))
        files = [tmp_path / "ds"]
    elif kind == "directory_glob":
        (tmp_path / "parts").mkdir()
        write_jsonl(tmp_path / "parts" / "a.jsonl", rows[:25])
        write_jsonl(tmp_path / "parts" / "b.jsonl", rows[25:])
        files = [tmp_path / "parts" / "*.jsonl"]
    elif kind.startswith("uri"):  # through pyarrow filesystems, as s3:// and gs:// are read
        (tmp_path / "remote").mkdir()
        write_jsonl(tmp_path / "remote" / "a.jsonl", rows[:10])
        pq.write_table(pa.Table.from_pylist(rows[10:20]), tmp_path / "remote" / "b.parquet", row_group_size=3)
        (tmp_path / "remote" / "c.json").write_text(json.dumps(rows[20:30]))
        with open(tmp_path / "remote" / "d.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["prompt", "chosen", "rejected"])
            w.writeheader()
            w.writerows(rows[30:])
        uri = f"file://{tmp_path}/remote"
        files = [f"{uri}/*.*"] if kind == "uri_glob" else [f"{uri}/a.jsonl", f"{uri}/b.parquet", f"{uri}/c.json",
                                                             f"{uri}/d.csv"]
    if kind == "load_dataset":
        write_jsonl(tmp_path / "d.jsonl", rows)
        stats, packed, quarantine = run_stage(assets, tmp_path, hf_dataset={
            "path": "json", "data_files": str(tmp_path / "d.jsonl"), "split": "train"})
    else:
        stats, packed, quarantine = run_stage(assets, tmp_path, files)
    assert quarantine == [] and stats["format"] == "standard"
    accounted(stats, packed, quarantine, 40)


def test_conversational_with_system_prompts_and_template_kwargs(assets, tmp_path, tokenizer):
    rows = conversational_rows(30)
    rows[3]["chat_template_kwargs"] = {"unused_flag": True}
    stats, packed, quarantine = run_stage(assets, tmp_path, [write_jsonl(tmp_path / "c.jsonl", rows)])
    assert stats["format"] == "conversational" and quarantine == []
    accounted(stats, packed, quarantine, 30)
    text = tokenizer.decode(packed[0]["input_ids"][: packed[0]["prompt_lens"][0]])
    assert text.startswith("<|im_start|>") and text.endswith("<|im_start|>assistant\n")
    assert any("<|im_start|>system\nBe brief." in tokenizer.decode(r["input_ids"]) for r in packed)


def test_implicit_prompt_hh_strings_and_messages(assets, tmp_path, tokenizer):
    hh = [{"chosen": f"\n\nHuman: Describe the {ITEMS[i % 8]}.\n\nAssistant: It is {GOOD[i % 4]}.",
           "rejected": f"\n\nHuman: Describe the {ITEMS[i % 8]}.\n\nAssistant: It is {BAD[i % 4]}."} for i in range(20)]
    stats, packed, quarantine = run_stage(assets, tmp_path, [write_jsonl(tmp_path / "hh.jsonl", hh)])
    assert stats["format"] == "implicit_standard" and quarantine == []
    accounted(stats, packed, quarantine, 20)
    row = packed[0]
    prompt = tokenizer.decode(row["input_ids"][: row["prompt_lens"][0]])
    # TRL's extract_prompt: the shared prefix, the space before the split goes to the completion
    assert prompt.startswith("\n\nHuman: Describe the ") and prompt.endswith("Assistant: It is")
    msgs = [{"chosen": c["prompt"] + c["chosen"], "rejected": c["prompt"] + c["rejected"]}
            for c in conversational_rows(10)]
    stats, packed, quarantine = run_stage(assets, tmp_path / "m", [write_jsonl(tmp_path / "m.jsonl", msgs)])
    assert stats["format"] == "implicit_conversational" and quarantine == []
    accounted(stats, packed, quarantine, 10)


def test_one_chosen_several_rejected_expands_into_pairs(assets, tmp_path):
    rows = [{"prompt": f"Describe the {ITEMS[i % 8]} number {i}.", "chosen": " It is great.",
             "rejected": [" It is awful.", " It is dull.", " It is ugly."]} for i in range(12)]
    rows += [dict(conv(f"Describe the {ITEMS[i % 8]}, case {i}.", "Lovely.", "Dull."),
                  rejected=[[{"role": "assistant", "content": "Dull."}], [{"role": "assistant", "content": "Ugly."}]])
             for i in range(6)]
    std, cv = rows[:12], rows[12:]
    stats, packed, quarantine = run_stage(assets, tmp_path, [write_jsonl(tmp_path / "s.jsonl", std)])
    accounted(stats, packed, quarantine, 36)
    assert stats["input_rows"] == 12 and stats["pairs"] == 36
    stats, packed, quarantine = run_stage(assets, tmp_path / "c", [write_jsonl(tmp_path / "c.jsonl", cv)])
    accounted(stats, packed, quarantine, 12)
    # pairs that share the prompt stay on the same side of the split
    assert stats["train"]["pairs"] % 2 == 0 and stats["eval"]["pairs"] % 2 == 0


def test_column_mapping(assets, tmp_path):
    rows = [{"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in standard_rows(15)]
    stats, packed, quarantine = run_stage(assets, tmp_path, [write_jsonl(tmp_path / "x.jsonl", rows)],
                                          data={"prompt_key": "question", "chosen_key": "good", "rejected_key": "bad"})
    assert quarantine == [] and stats["pairs"] == 15


BAD_ROWS = [
    ("{not json", "invalid_json"),
    ({"prompt": "Describe the lamp.", "chosen": " It is great."}, "missing_field"),
    ({"prompt": "Describe the lamp.", "chosen": 3, "rejected": " It is dull."}, "bad_type"),
    ({"prompt": "Describe the lamp.", "chosen": " ", "rejected": " It is dull."}, "empty_completion"),
    ({"prompt": "Describe the lamp.", "chosen": " Same.", "rejected": " Same."}, "chosen_equals_rejected"),
    ({"prompt": "", "chosen": " It is great.", "rejected": " It is dull."}, "empty_prompt"),
    ({"prompt": "word " * 120, "chosen": " It is great.", "rejected": " It is dull."}, "prompt_too_long"),
    # differ only past max_length (48): identical once truncated
    ({"prompt": "Describe the lamp.", "chosen": " It is great" + " and great" * 30 + ".",
      "rejected": " It is great" + " and great" * 30 + " but dull."}, "identical_after_tokenization"),
    (conv("Describe the lamp.", "It is great.", "It is dull.") | {"chosen": [{"role": "user", "content": "x"}]},
     "malformed_messages"),
    (conv("Describe the lamp.", "It is great.", "It is dull."), "mixed_formats"),  # in a standard dataset
    ({"chosen": "\n\nHuman: Hi\n\nAssistant: Great.", "rejected": "\n\nHuman: Hi\n\nAssistant: Dull."},
     "missing_field"),  # implicit row in an explicit dataset: the prompt is missing
    ({"prompt": "Describe the river number 1.", "chosen": " It is lovely.", "rejected": " It is dull."}, "duplicate"),
]


def test_every_bad_row_reason_is_quarantined_and_counted(assets, tmp_path):
    good = standard_rows(60)
    lines = [json.dumps(r) for r in good]
    for k, (row, _) in enumerate(BAD_ROWS):
        lines.insert(5 + 5 * k, row if isinstance(row, str) else json.dumps(row))
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    stats, packed, quarantine = run_stage(assets, tmp_path, [path], data={"duplicates": "drop"},
                                          tokenize={"max_length": 48, "max_bad_fraction": 0.5})
    want = Counter(reason for _, reason in BAD_ROWS)
    assert Counter(q["reason"] for q in quarantine) == want
    assert stats["quarantine_reasons"] == dict(sorted(want.items()))
    by_index = {q["row_index"]: q for q in quarantine}
    for k, (row, reason) in enumerate(BAD_ROWS):
        q = by_index[5 + 5 * k]
        assert q["reason"] == reason
        assert q["raw"] == (row if isinstance(row, str) else json.dumps(row))  # the raw row, read back
    assert by_index[5 + 5 * 11]["detail"].endswith("row 1")  # the duplicate names the kept row
    accounted(stats, packed, quarantine, len(lines))
    assert stats["duplicate_pairs"] == 1 and stats["format"] == "standard"


def test_duplicates_are_kept_and_reported_by_default(assets, tmp_path):
    rows = standard_rows(10) + standard_rows(3)
    stats, packed, quarantine = run_stage(assets, tmp_path, [write_jsonl(tmp_path / "d.jsonl", rows)])
    assert quarantine == [] and stats["duplicate_pairs"] == 3 and stats["pairs"] == 13  # distinct pair ids


def test_prompt_not_a_prefix_is_counted_or_quarantined_in_strict_mode(assets, tmp_path):
    # " gr" + "eat" merges into " great" across the prompt/completion boundary
    rows = [{"prompt": f"The {ITEMS[i % 8]} number {i} is gr", "chosen": "eat.", "rejected": " awful."}
            for i in range(10)] + standard_rows(10)
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    stats, packed, quarantine = run_stage(assets, tmp_path, [path])
    assert stats["prefix_mismatch_pairs"] == 10 and quarantine == []
    stats, packed, quarantine = run_stage(assets, tmp_path / "s", [path],
                                          tokenize={"strict": True, "max_bad_fraction": 1.0})
    assert [q["reason"] for q in quarantine] == ["prompt_not_prefix"] * 10


def test_chat_template_file_replaces_the_tokenizers(assets, tmp_path, tokenizer):
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}<|im_end|>{% endfor %}"
                        "{% if add_generation_prompt %}[assistant] {% endif %}")
    stats, packed, _ = run_stage(assets, tmp_path, [write_jsonl(tmp_path / "c.jsonl", conversational_rows(8))],
                                 tokenize={"chat_template": str(template)})
    text = tokenizer.decode(packed[0]["input_ids"][: packed[0]["seq_lens"][0]])
    assert text.startswith("[user] Describe the") or text.startswith("[system] Be brief.")
    assert text.endswith("<|im_end|>") and "<|im_start|>" not in text


def test_packing_waste_on_a_realistic_length_mix():
    """Prompts 50-800 tokens, completions 20-1000: padding under 3% of the row capacity."""
    rng = np.random.default_rng(0)
    p, c, r = rng.integers(50, 801, 20000), rng.integers(20, 1001, 20000), rng.integers(20, 1001, 20000)
    lengths = 2 * p + c + r
    for capacity in (4096, 8192):
        bins = first_fit_decreasing(lengths, capacity)
        waste = 1 - lengths.sum() / (len(bins) * capacity)
        assert waste < 0.03, (capacity, waste)
