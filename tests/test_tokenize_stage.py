"""The real tokenize stage on real files: every input row ends up packed or quarantined."""

import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import Killer, tiny_config
from pipeline.demo import make_pairs
from pipeline.tokenizing import tokenize
from pipeline.tokenizing.chunk import PAIR_META_SCHEMA, TOKEN_COLUMNS, TokenizeChunk, UNITS_DIR, WRITER_COLUMNS
from pipeline.core.rows import ROW_SCHEMA
from pipeline.tokenizing.pack import assemble_rows, shard_groups

BAD_LINES = [
    ("{not json", "invalid_json"),
    (json.dumps({"prompt": "p", "chosen": "a"}), "missing_field"),
    (json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"}), "chosen_equals_rejected"),
    (json.dumps({"prompt": "p", "chosen": " ", "rejected": "b"}), "empty_completion"),
    (json.dumps({"prompt": [{"role": "user", "content": "q"}],
                 "chosen": [{"role": "user", "content": "a"}],
                 "rejected": [{"role": "assistant", "content": "b"}]}), "malformed_messages"),
    (json.dumps({"prompt": "word " * 200, "chosen": "a", "rejected": "b"}), "prompt_too_long"),
]


@pytest.fixture()
def inputs(tmp_path):
    pairs = make_pairs(300, seed=7)
    jsonl = tmp_path / "a.jsonl"
    lines = [json.dumps(p) for p in pairs[:200]]
    for k, (line, _) in enumerate(BAD_LINES):
        lines.insert(10 + 20 * k, line)
    jsonl.write_text("\n".join(lines) + "\n\n")  # a trailing blank line is not a row
    parquet = tmp_path / "b.parquet"
    pq.write_table(pa.Table.from_pylist(pairs[200:]), parquet, row_group_size=40)
    return [str(jsonl), str(parquet)], len(lines) + 100


def read_rows(out_dir):
    return pa.concat_tables([pq.read_table(p) for p in sorted(out_dir.glob("*-0*.parquet"))])


@pytest.mark.parametrize("share_prompt", [None, False])
def test_rows_are_packed_or_quarantined(assets, tmp_path, inputs, share_prompt):
    files, n_rows = inputs
    cfg = tiny_config(assets, tmp_path / "run", data_file=files[0],
                      tokenize={"max_length": 64, "max_tokens_per_row": 300, "rows_per_task": 37,
                                "max_bad_fraction": 0.1, "share_prompt": share_prompt})
    cfg.data.train_files = files
    out = tmp_path / "out"
    out.mkdir()
    shards, stats = tokenize.run_in_process(cfg, out)

    quarantine = pq.read_table(out / "quarantine.parquet").to_pylist()
    assert Counter(q["reason"] for q in quarantine) == Counter(r for _, r in BAD_LINES)
    bad_index = {q["row_index"]: q["reason"] for q in quarantine}
    assert bad_index == {10 + 20 * k: r for k, (_, r) in enumerate(BAD_LINES)}
    assert all(q["source"] == files[0] for q in quarantine)
    assert quarantine[0]["raw"] == BAD_LINES[0][0]  # the raw row is kept

    rows = read_rows(out).to_pylist()
    pair_ids = [p for r in rows for p in r["pair_ids"]]
    assert len(pair_ids) == len(set(pair_ids)) == stats["pairs"] == n_rows - len(BAD_LINES)
    assert stats["input_rows"] == n_rows and stats["quarantined"] == len(BAD_LINES)
    shared = share_prompt is None  # the default: on with the tiny config's segment_sdpa
    assert stats["share_prompt"] is shared
    for r in rows:
        assert len(r["seq_lens"]) == 2 * len(r["pair_ids"])  # both sides of every pair
        assert sum(r["seq_lens"]) == len(r["input_ids"]) == r["num_tokens"] <= 300
        chosen_prompts = r["prompt_lens"][0::2]
        assert all(0 < p < n for p, n in zip(chosen_prompts, r["seq_lens"][0::2]))
        if shared:  # a rejected segment is its completion, positions continuing from its prompt's
            assert r["prompt_lens"][1::2] == [0] * len(r["pair_ids"])
            starts = [q for p in chosen_prompts for q in (0, p)]
        else:  # restart at 0 per segment
            assert r["prompt_lens"][1::2] == chosen_prompts
            starts = [0] * len(r["seq_lens"])
        assert r["position_ids"] == [s + i for s, n in zip(starts, r["seq_lens"]) for i in range(n)]
    assert stats["train"]["rows"] > 0 and stats["eval"]["rows"] > 0
    saved = stats["train"]["shared_prompt_tokens"] + stats["eval"]["shared_prompt_tokens"]
    assert saved == (sum(p for r in rows for p in r["prompt_lens"][0::2]) if shared else 0)
    assert 0 <= stats["train"]["waste_fraction"] < 0.1


def test_dropped_duplicates_are_not_bad_rows(assets, tmp_path):
    """data.duplicates: drop quarantines what it was asked to drop; those entries do not
    count against tokenize.max_bad_fraction (here 20% of the pairs, the limit 1%)."""
    rows = make_pairs(80, seed=4)
    rows += rows[:20]
    data = tmp_path / "dups.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tiny_config(assets, tmp_path / "run", data_file=data, data={"duplicates": "drop"},
                      tokenize={"max_bad_fraction": 0.01})
    out = tmp_path / "out"
    out.mkdir()
    _, stats = tokenize.run_in_process(cfg, out)
    assert stats["quarantine_reasons"] == {"duplicate": 20} and stats["duplicate_pairs"] == 20
    assert stats["pairs"] == 80


def test_too_many_bad_rows_fail_with_a_summary(assets, tmp_path, inputs):
    files, _ = inputs
    cfg = tiny_config(assets, tmp_path / "run", data_file=files[0], tokenize={"max_bad_fraction": 0.01})
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ValueError, match=r"6 of 206 pairs quarantined as bad .*max_bad_fraction"):
        tokenize.run_in_process(cfg, out)
    assert not (out / UNITS_DIR).exists()  # the workers' token lists go either way


@pytest.mark.slow
def test_ray_and_local_runs_write_identical_shards(assets, tmp_path, inputs, ray_cluster):
    files, _ = inputs
    cfg = tiny_config(assets, tmp_path / "run", data_file=files[0],
                      tokenize={"max_tokens_per_row": 300, "rows_per_task": 37, "max_bad_fraction": 0.1})
    cfg.data.train_files = files
    local, ray_out = tmp_path / "local", tmp_path / "ray"
    local.mkdir()
    ray_out.mkdir()
    shards_local, stats_local = tokenize.run_in_process(cfg, local)
    cfg.tokenize.pack_buffer_tokens = 2000  # shards written by several Ray tasks
    shards_ray, stats_ray = tokenize.run_on_ray(cfg, ray_out)
    assert [s.sha256 for s in shards_local] == [s.sha256 for s in shards_ray]
    assert stats_local["write_groups"] == 1 and stats_ray["write_groups"] > 2
    assert {**stats_local, "write_groups": 0} == {**stats_ray, "write_groups": 0}
    assert sorted(p.name for p in ray_out.iterdir()) == sorted(s.name for s in shards_ray)  # no unit files left


def test_rows_do_not_depend_on_the_write_buffer(assets, tmp_path, inputs):
    """A buffer of a few rows' tokens writes the shards in many groups, each reading the
    unit files again: the same bytes as one group."""
    files, _ = inputs
    written = {}
    for buffer in (1 << 27, 3000, 1):
        cfg = tiny_config(assets, tmp_path / "run", tokenize={"max_tokens_per_row": 300, "rows_per_task": 37,
                                                              "rows_per_shard": 3, "max_bad_fraction": 0.1,
                                                              "pack_buffer_tokens": buffer})
        cfg.data.train_files = files
        out = tmp_path / f"out-{buffer}"
        out.mkdir()
        shards, stats = tokenize.run_in_process(cfg, out)
        written[buffer] = [(s.name, s.sha256) for s in shards], stats.pop("write_groups")
    (one, groups_one), (few, groups_few), (each, groups_each) = written.values()
    assert one == few == each
    shard_count = len(one) - 1  # the quarantine file is not a group's
    assert groups_one == 1 and 1 < groups_few < shard_count and groups_each == shard_count


def test_workers_return_pair_columns_and_write_token_lists(assets, tmp_path, inputs):
    """What a tokenize worker sends the driver has no token list; the unit file holds them,
    row for row, with their lengths in the returned table."""
    from pipeline.core.config import to_dict
    from pipeline.core.sources import expand_inputs, plan_chunks

    files, _ = inputs
    cfg = tiny_config(assets, tmp_path / "run", tokenize={"max_length": 64})
    chunk = dict(plan_chunks(expand_inputs([files[0]]), 50)[0], unit=7)
    worker = TokenizeChunk(to_dict(cfg), str(tmp_path / "units"))
    meta = worker.tokenize_unit(chunk)
    records = worker.tokenize_chunk(chunk)
    assert meta.schema == PAIR_META_SCHEMA
    lists = pq.read_table(tmp_path / "units" / "unit-00007.parquet")
    assert lists.column_names == TOKEN_COLUMNS and lists.num_rows == meta.num_rows == len(records) == 50
    assert meta.column("unit").to_pylist() == [7] * 50 and meta.column("unit_row").to_pylist() == list(range(50))
    assert meta.column("reason").to_pylist()[10] == "invalid_json"
    for rec, m, lst in zip(records, meta.to_pylist(), lists.to_pylist()):
        assert lst == {"chosen_ids": rec.get("chosen_ids"), "rejected_ids": rec.get("rejected_ids")}
        assert (m["chosen_len"], m["rejected_len"]) == (len(lst["chosen_ids"] or []), len(lst["rejected_ids"] or []))
        assert {k: v for k, v in rec.items() if k not in TOKEN_COLUMNS} == {
            k: m[k] for k in rec if k not in TOKEN_COLUMNS}


def test_shard_groups_worked_example():
    """Pairs holding 3, 4, 5, 6 tokens in three shards of 7, 11 and 0 tokens; a 12-token
    buffer takes shard 0 alone (7 + 11 > 12), then shards 1 and 2. Each group carries only
    its own pairs, its bins renumbered into them."""
    pairs = pa.table({"pair_id": ["a", "b", "c", "d"], "chosen_prompt_len": [1, 1, 1, 1],
                      "rejected_prompt_len": [1, 1, 1, 1], "unit": [0, 0, 1, 1], "unit_row": [0, 1, 0, 1],
                      "other": [0, 0, 0, 0]})
    shards = [{"name": "s0", "first_row_id": 0, "bins": [[0, 1]]},
              {"name": "s1", "first_row_id": 1, "bins": [[3], [2]]},
              {"name": "s2", "first_row_id": 3, "bins": []}]
    groups = shard_groups(pairs, shards, np.array([3, 4, 5, 6]), budget=12)
    assert [g["pairs"].column("pair_id").to_pylist() for g in groups] == [["a", "b"], ["d", "c"]]
    assert groups[0]["pairs"].column_names == WRITER_COLUMNS
    assert [g["shards"] for g in groups] == [
        [{"name": "s0", "first_row_id": 0, "bins": [[0, 1]]}],
        [{"name": "s1", "first_row_id": 1, "bins": [[0], [1]]}, {"name": "s2", "first_row_id": 3, "bins": []}],
    ]
    assert len(shard_groups(pairs, shards, np.array([3, 4, 5, 6]), budget=1)) == 3


def test_assemble_rows_worked_example():
    """Three pairs into rows [[1, 0], [2]]: segments chosen, rejected of each member in bin
    order, positions restarting per segment, lengths and prompt lengths per segment. The
    token lists sit in another order (as they arrive from the workers) and are found
    through ``token_rows``."""
    pairs = pa.table({
        "pair_id": ["p0", "p1", "p2"],
        "chosen_prompt_len": pa.array([1, 1, 2], pa.int32()),
        "rejected_prompt_len": pa.array([1, 1, 2], pa.int32()),
    })
    tokens = pa.table({  # rows: p2, p0, p1
        "chosen_ids": pa.array([[6, 7, 8, 9], [1, 2, 3], [4, 5]], pa.list_(pa.int32())),
        "rejected_ids": pa.array([[6, 7, 0], [1, 2], [4, 6, 6]], pa.list_(pa.int32())),
    })
    token_rows = np.array([1, 2, 0])
    rows = assemble_rows(pairs, tokens, token_rows, [[1, 0], [2]], first_row_id=10)
    assert rows.schema == ROW_SCHEMA
    assert rows.to_pylist() == [
        {"row_id": 10, "input_ids": [4, 5, 4, 6, 6, 1, 2, 3, 1, 2], "position_ids": [0, 1, 0, 1, 2, 0, 1, 2, 0, 1],
         "seq_lens": [2, 3, 3, 2], "prompt_lens": [1, 1, 1, 1], "pair_ids": ["p1", "p0"], "num_tokens": 10},
        {"row_id": 11, "input_ids": [6, 7, 8, 9, 6, 7, 0], "position_ids": [0, 1, 2, 3, 0, 1, 2],
         "seq_lens": [4, 3], "prompt_lens": [2, 2], "pair_ids": ["p2"], "num_tokens": 7},
    ]
    assert assemble_rows(pairs, tokens, token_rows, [], 0).num_rows == 0
    # share_prompt: each rejected segment keeps its completion only, at the positions it
    # has after its prompt, with prompt_len 0
    assert assemble_rows(pairs, tokens, token_rows, [[1, 0], [2]], 10, share_prompt=True).to_pylist() == [
        {"row_id": 10, "input_ids": [4, 5, 6, 6, 1, 2, 3, 2], "position_ids": [0, 1, 1, 2, 0, 1, 2, 1],
         "seq_lens": [2, 2, 3, 1], "prompt_lens": [1, 0, 1, 0], "pair_ids": ["p1", "p0"], "num_tokens": 8},
        {"row_id": 11, "input_ids": [6, 7, 8, 9, 0], "position_ids": [0, 1, 2, 3, 2],
         "seq_lens": [4, 1], "prompt_lens": [2, 0], "pair_ids": ["p2"], "num_tokens": 5},
    ]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_killed_tokenize_actor_is_retried_with_the_same_shards(assets, tmp_path, ray_cluster):
    """A tokenize actor killed (SIGKILL) once the first unit file is written: the pool
    replaces it and gives its unit again; the unit files it rewrites are the same, so the shards
    equal an in-process run's, and no unit file or half file is left."""
    cfg = tiny_config(assets, tmp_path / "run", tokenize={"max_tokens_per_row": 256, "rows_per_task": 60})
    local, ray_out = tmp_path / "local", tmp_path / "ray"
    local.mkdir()
    ray_out.mkdir()
    shards_local, stats_local = tokenize.run_in_process(cfg, local)
    killer = Killer("TokenizeChunk", lambda: bool(list((ray_out / UNITS_DIR).glob("unit-*.parquet"))))
    killer.start()
    shards_ray, stats_ray = tokenize.run_on_ray(cfg, ray_out)
    killer.join()
    assert killer.killed, "no tokenize actor was found to kill"
    assert stats_local["pairs"] == stats_ray["pairs"] == 3000 and stats_local == stats_ray
    assert [(s.name, s.sha256) for s in shards_local] == [(s.name, s.sha256) for s in shards_ray]
    assert sorted(p.name for p in ray_out.iterdir()) == sorted(s.name for s in shards_ray)
