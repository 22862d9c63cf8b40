"""The score stage's core (``ShardScorer``) against the log-prob function run row by row.

The scorer queues row k+1 before it reads row k's results (on a GPU the forward of the
next row overlaps the host's wait), so these tests pin that the pipelined loop gives
every row exactly its own values, in order, and that a bad row is still named.
"""

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from helpers import tiny_config
from pipeline import runner
from pipeline.core.config import to_dict
from pipeline.core.logps import packed_token_logps
from pipeline.core.segments import segment_layout, segment_sums
from pipeline.core.modeling import row_tensors
from pipeline.core.rundir import read_manifest
from stages.score import ShardScorer, iter_rows


@pytest.fixture(scope="module")
def tokenized(assets, tmp_path_factory):
    cfg = tiny_config(assets, tmp_path_factory.mktemp("score-stage") / "run",
                      tokenize={"max_tokens_per_row": 256, "rows_per_shard": 8})
    runner.run_pipeline(cfg, stages=["tokenize"], use_ray=False, log=lambda _: None)
    tok_dir = runner.plan_stages(cfg)["tokenize"].dir
    shard = [s["name"] for s in read_manifest(tok_dir)["shards"] if s["name"].startswith("train")][0]
    return cfg, pq.read_table(str(tok_dir / shard))


def test_iter_rows_matches_the_table_also_when_sliced(tokenized):
    _, table = tokenized
    for part in (table, table.slice(3, 4)):
        rows = list(iter_rows(part))
        expected = part.to_pylist()
        assert [r["row_id"] for r in rows] == [e["row_id"] for e in expected]
        for r, e in zip(rows, expected):
            for name in ("input_ids", "position_ids", "seq_lens", "prompt_lens"):
                assert r[name].tolist() == e[name]


def test_pipelined_scoring_gives_each_row_its_own_logps(tokenized):
    cfg, table = tokenized
    assert table.num_rows >= 3
    scorer = ShardScorer(to_dict(cfg))
    scored = scorer.score_table(table)
    assert scored.column("row_id").to_pylist() == table.column("row_id").to_pylist()
    with torch.inference_mode():
        for row, out in zip(table.to_pylist(), scored.to_pylist()):
            t = row_tensors(row)
            layout = segment_layout(t["seq_lens"], t["prompt_lens"])
            expected = packed_token_logps(scorer.model, t["input_ids"], t["position_ids"], layout).logps
            # the same kernels on the same row: bit for bit
            assert np.array_equal(np.asarray(out["ref_logps"], dtype=np.float32), expected.numpy())
            assert np.array_equal(np.asarray(out["ref_seq_logps"], dtype=np.float32),
                                  segment_sums(expected, layout).numpy())
            completion = np.zeros(len(row["input_ids"]), dtype=bool)
            start = 0
            for length, prompt in zip(row["seq_lens"], row["prompt_lens"]):
                completion[start + prompt:start + length] = True
                start += length
            logps = np.asarray(out["ref_logps"])
            assert (logps[~completion] == 0).all() and (logps[completion] < 0).all()


def test_a_broken_reference_names_the_row(tokenized):
    cfg, table = tokenized
    scorer = ShardScorer(to_dict(cfg))
    with torch.no_grad():
        scorer.model.get_output_embeddings().weight.fill_(float("nan"))
    first = table.column("row_id")[0].as_py()
    with pytest.raises(ValueError, match=rf"score: row {first} has \d+ reference log-probs that are NaN"):
        scorer.score_table(table)


def test_shared_prompt_rows_score_every_pair_as_unshared_rows(assets, tmp_path):
    """The same data tokenized with and without shared prompts (rows packed differently,
    fewer tokens with sharing): through tokenize and score, every pair's chosen and
    rejected reference log-probs agree (fp32, up to summation order)."""
    scored, tokens = {}, {}
    for share in (True, False):
        cfg = tiny_config(assets, tmp_path / f"run-{share}", tokenize={"max_tokens_per_row": 256,
                                                                        "share_prompt": share})
        runner.run_pipeline(cfg, stages=["tokenize", "score"], use_ray=False, log=lambda _: None)
        stats = read_manifest(runner.plan_stages(cfg)["tokenize"].dir)["stats"]
        tokens[share] = (stats["tokens"], stats["train"]["shared_prompt_tokens"] + stats["eval"]["shared_prompt_tokens"])
        out = {}
        score_dir = runner.plan_stages(cfg)["score"].dir
        for shard in read_manifest(score_dir)["shards"]:
            if shard["name"] == "quarantine.parquet":
                continue
            for row in pq.read_table(str(score_dir / shard["name"])).to_pylist():
                for k, pair in enumerate(row["pair_ids"]):
                    out[pair] = row["ref_seq_logps"][2 * k: 2 * k + 2]
        scored[share] = out
    assert scored[True].keys() == scored[False].keys() and len(scored[True]) > 50
    pairs = sorted(scored[True])
    shared, unshared = (np.array([scored[s][p] for p in pairs]) for s in (True, False))
    np.testing.assert_allclose(shared, unshared, rtol=1e-5, atol=1e-4)
    # the shared rows hold every token of the unshared ones but the second copy of each prompt
    assert tokens[False][1] == 0 and tokens[True][0] + tokens[True][1] == tokens[False][0]
    assert tokens[True][1] > 0.1 * tokens[False][0]


def test_tr_dpo_scores_the_rows_it_is_given_and_leaves_nulls(tokenized):
    """TR-DPO: the score stage scores the first segment's rows only; they hold what scoring
    every row gives them, bit for bit, and the others hold nulls in both columns."""
    cfg, table = tokenized
    scorer = ShardScorer(to_dict(cfg))
    every, some = scorer.score_table(table).to_pylist(), scorer.score_table(table, wanted=[2, 0]).to_pylist()
    for i, (all_row, row) in enumerate(zip(every, some)):
        if i in (0, 2):
            assert row == all_row
        else:
            assert row["ref_logps"] is None and row["ref_seq_logps"] is None
            assert {k: v for k, v in row.items() if not k.startswith("ref_")} == \
                {k: v for k, v in all_row.items() if not k.startswith("ref_")}


def test_split_rows_splits_only_when_there_are_few_shards_an_actor():
    from stages.score.stage import split_rows

    # 3 shards on 2 actors (fewer than 4 an actor): pieces of ceil(70 / (4 x 2)) = 9 rows
    assert split_rows([32, 32, 6], actors=2, rows_per_task=None) == [
        [(0, 9), (9, 18), (18, 27), (27, 32)], [(0, 9), (9, 18), (18, 27), (27, 32)], [(0, 6)]]
    assert split_rows([5] * 8, actors=2, rows_per_task=None) == [[(0, 5)]] * 8  # 4 an actor: whole
    assert split_rows([32, 6], actors=None, rows_per_task=None) == [[(0, 32)], [(0, 6)]]  # one scorer in-process
    assert split_rows([25, 0], actors=None, rows_per_task=10) == [[(0, 10), (10, 20), (20, 25)], [(0, 0)]]
    assert split_rows([25], actors=8, rows_per_task=30) == [[(0, 25)]]


def test_a_split_score_writes_the_shards_of_a_whole_one_byte_for_byte(assets, tmp_path):
    """The same run scored whole, and in pieces of 3 rows (score.rows_per_task): every
    scored shard is the same file, and no part file is left. Then a piece already written
    by an earlier attempt is not scored again, and a shard whose every piece was written is
    joined without scoring anything."""
    import copy
    import json

    from pipeline.core.storage import Loc
    from stages.score.scorer import PARTS_DIR, join_parts, part_path
    from stages.score.stage import _todo, split_rows

    # shards of 40 rows: 3 row groups of ROW_GROUP_ROWS (16), pieces of 3 rows across their edges
    cfg = tiny_config(assets, tmp_path / "whole", tokenize={"max_tokens_per_row": 256, "rows_per_shard": 40})
    runner.run_pipeline(cfg, stages=["tokenize", "score"], use_ray=False, log=lambda _: None)
    split = copy.deepcopy(cfg)
    split.run_dir, split.score.rows_per_task = str(tmp_path / "split"), 3
    runner.run_pipeline(split, stages=["tokenize", "score"], use_ray=False, log=lambda _: None)
    whole_dir, split_dir = runner.plan_stages(cfg)["score"].dir, runner.plan_stages(split)["score"].dir
    assert whole_dir.name == split_dir.name  # rows_per_task does not change what is scored
    names = [s["name"] for s in read_manifest(whole_dir)["shards"]]
    assert len(names) >= 2 and max(s["rows"] for s in read_manifest(whole_dir)["shards"]) > 16
    for name in names:
        assert (split_dir / name).read_bytes() == (whole_dir / name).read_bytes(), name
    assert not (split_dir / PARTS_DIR).exists()

    # an earlier attempt wrote piece 0 of the first shard: the next attempt scores the rest only
    tok_dir = runner.plan_stages(split)["tokenize"].dir
    manifest = read_manifest(tok_dir)
    first = next(s for s in manifest["shards"] if s["name"].startswith("train"))
    dst = Loc(split_dir) / first["name"]
    table = pq.read_table(str(dst))
    dst.unlink()
    part_path(dst, 0, 3).write_parquet(table.slice(0, 3))
    todo, shards = _todo(Loc(tok_dir), manifest, Loc(split_dir), {}, None, 3)
    assert [(i["dst"], i["piece"]) for i in todo] == [(str(dst), p) for p in range(1, len(shards[str(dst)]))]
    assert shards[str(dst)][0] == (0, 3) and json.loads(todo[0]["bounds"])[0] == [0, 3]
    # every piece written: joined, the same bytes as scored whole
    for start, stop in shards[str(dst)][1:]:
        part_path(dst, start, stop).write_parquet(table.slice(start, stop - start))
    assert join_parts(dst, shards[str(dst)])
    assert dst.read_bytes() == (whole_dir / first["name"]).read_bytes()
    assert not (Loc(split_dir) / PARTS_DIR / first["name"]).exists()

    # auto split (rows_per_task null): the pieces are those of the whole stage, however many
    # shards an earlier attempt committed, so that its pieces are found again
    dst.unlink()
    _, before = _todo(Loc(tok_dir), manifest, Loc(split_dir), {}, 4, None)
    assert len(before[str(dst)]) > 1 and len(before) == 1  # only the first shard is left: still split
    shards = [s for s in manifest["shards"] if s["name"] != "quarantine.parquet"]
    every = split_rows([s["rows"] for s in shards], 4, None)  # as when no shard was committed
    assert before[str(dst)] == every[[s["name"] for s in shards].index(first["name"])]
    assert before[str(dst)] != split_rows([first["rows"]], 4, None)[0]  # what a split of the shards left gives


def test_a_piece_reads_only_the_row_groups_that_hold_its_rows(tmp_path, monkeypatch):
    """45 rows in row groups of 16 (0-15, 16-31, 32-44): each piece reads the groups it
    overlaps, and gets exactly its rows."""
    import pyarrow as pa

    from pipeline.core.storage import Loc
    from stages.score.scorer import read_rows

    path = tmp_path / "shard.parquet"
    pq.write_table(pa.table({"row_id": list(range(45))}), path, row_group_size=16)
    read = []
    real = pq.ParquetFile.read_row_groups
    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", lambda self, groups, **kw: read.append(list(groups))
                        or real(self, groups, **kw))
    for (start, stop), groups in (((15, 18), [0, 1]), ((16, 19), [1]), ((39, 45), [2]), ((0, 16), [0]),
                                  ((40, None), [2])):
        read.clear()
        rows = read_rows(Loc(path), start, stop).column("row_id").to_pylist()
        assert rows == list(range(start, 45 if stop is None else stop)) and read == [groups], (start, stop)
    assert read_rows(Loc(path)).num_rows == 45
