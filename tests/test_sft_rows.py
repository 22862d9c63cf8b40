"""The sft stage's rows (stages/sft/stage.py): the tokenize output repacked with the chosen
segments alone. Every distinct chosen sequence exactly once (pairs sharing a chosen
completion, as a row with several rejected ones gives, train it once), token for token and
with its prompt length, no rejected token, positions restarting at 0, waste within 3%."""

import pyarrow.parquet as pq
import pytest
from helpers import tiny_config

from pipeline.core.storage import Loc
from stages import sft
from pipeline.tokenizing import tokenize
from pipeline.core.rows import split_files


def segments_of(files, which):
    """{pair_id: (tokens, prompt_len, positions)} of the chosen (which=0) or every segment."""
    out = {}
    for f in files:
        for row in pq.read_table(f).to_pylist():
            start = 0
            for k, (n, p) in enumerate(zip(row["seq_lens"], row["prompt_lens"])):
                pair = row["pair_ids"][k // 2 if which == 0 else k]
                if which is None or k % 2 == which:
                    out.setdefault(pair, []).append((row["input_ids"][start:start + n], p,
                                                     row["position_ids"][start:start + n]))
                start += n
    return out


@pytest.mark.parametrize("share_prompt", [True, False])
def test_chosen_rows_hold_every_chosen_segment_once(assets, tmp_path, share_prompt):
    cfg = tiny_config(assets, tmp_path / "run", tokenize={"share_prompt": share_prompt, "rows_per_shard": 16})
    tok_dir, out = Loc(tmp_path / "tok"), Loc(tmp_path / "sft")
    tok_dir.mkdir(), out.mkdir()
    tokenize.run_in_process(cfg, tok_dir)
    shards, stats = sft.write_chosen_rows(cfg, tok_dir, out)

    for split in ("train", "eval"):
        want = segments_of([f.local for f in split_files(tok_dir, split)], 0)
        got = segments_of([f.local for f in split_files(out, split)], None)
        assert set(got) <= set(want) and len(got) == stats[split]["sequences"]
        distinct = {(tuple(ids), p) for [(ids, p, _)] in want.values()}
        kept = [(tuple(ids), p) for [(ids, p, _)] in got.values()]
        assert sorted(kept) == sorted(distinct)  # each distinct chosen sequence once
        assert len(want) - len(got) == stats[split]["repeated_chosen"]
        for pair, [(ids, prompt_len, positions)] in got.items():  # one segment per pair
            [(want_ids, want_prompt, _)] = want[pair]
            assert (ids, prompt_len) == (want_ids, want_prompt)
            assert positions == list(range(len(ids)))
        rows = pq.read_table([f.local for f in split_files(out, split)]).to_pylist() if got else []
        assert all(r["num_tokens"] <= cfg.tokenize.max_tokens_per_row for r in rows)
        assert sum(r["num_tokens"] for r in rows) == stats[split]["tokens"]
    # packed as tightly as tokenize packs pairs: the train split's waste within 3%
    assert stats["train"]["waste_fraction"] <= 0.03
    assert sum(s.rows for s in shards) == stats["train"]["rows"] + stats["eval"]["rows"]
    # the same rows on a rerun: packing and shuffle are a function of the lengths and data.seed
    again = Loc(tmp_path / "again")
    again.mkdir()
    assert [s.sha256 for s in sft.write_chosen_rows(cfg, tok_dir, again)[0]] == [s.sha256 for s in shards]
