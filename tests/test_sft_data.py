"""The sft stage's own data (sft.data: {train_files | hf_dataset | sources}): SFT rows
(messages, or prompt + completion) read, tokenised, quarantined, split and packed by the
tokenize stage's code, one segment per sequence (pipeline/core/sft_formats.py, stages/sft/stage.py)."""

import json

import pyarrow.parquet as pq
import pytest
from helpers import tiny_config

from pipeline.core.config import ConfigError, SFTDataConfig
from pipeline.core.formats import BadRow, ExampleText, tokenize_pair
from pipeline.core.sft_formats import SequenceRows
from pipeline.core.storage import Loc
from stages import sft
from pipeline.tokenizing import tokenize
from pipeline.core.rows import split_files

ROWS = SequenceRows()
PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Describe the lamp."}]
ANSWER = [{"role": "assistant", "content": "A fine, bright lamp."}]


def test_formats_and_what_is_quarantined():
    [p] = ROWS.normalize({"messages": PROMPT + ANSWER})
    assert (p.prompt, p.chosen, p.rejected, p.format) == (PROMPT, ANSWER, None, "messages_conversational")
    [p] = ROWS.normalize({"prompt": "Q: lamp?", "completion": " A lamp."})
    assert (p.prompt, p.chosen, p.format) == ("Q: lamp?", " A lamp.", "prompt_completion_standard")
    [p] = ROWS.normalize({"prompt": PROMPT, "completion": ANSWER})
    assert p.format == "prompt_completion_conversational"
    bad = {
        "missing_field": [{"text": "no prompt at all"}, {"completion": "an answer to nothing"}],
        "malformed_messages": [{"messages": ANSWER}, {"messages": PROMPT},
                               {"prompt": PROMPT, "completion": [{"role": "user", "content": "x"}]},
                               {"messages": [{"role": "user"}] + ANSWER}],
        "empty_completion": [{"messages": PROMPT + [{"role": "assistant", "content": "  "}]},
                             {"prompt": "Q", "completion": " "}],
        "empty_prompt": [{"prompt": " ", "completion": "A"}],
        "bad_type": [{"prompt": "Q", "completion": ANSWER}],
    }
    for reason, rows in bad.items():
        for row in rows:
            with pytest.raises(BadRow) as e:
                ROWS.normalize(row)
            assert e.value.reason == reason, row


def test_a_sequence_is_tokenised_as_a_pairs_chosen_side(tokenizer):
    """One tokenisation for both stages: an SFT row's tokens and prompt length are those of
    the preference pair whose prompt and chosen completion it holds."""
    kwargs = dict(max_length=64, max_prompt_length=None)
    for prompt, completion in ((PROMPT, ANSWER), ("Tell me about the lamp.", " It is a fine lamp.")):
        fmt = "conversational" if isinstance(prompt, list) else "standard"
        rejected = [{"role": "assistant", "content": "A dull lamp."}] if fmt == "conversational" else " Dull."
        want = tokenize_pair(ExampleText(prompt, completion, rejected, fmt), tokenizer, **kwargs)
        [row] = ROWS.normalize({"prompt": prompt, "completion": completion})
        got = tokenize_pair(row, tokenizer, **kwargs)
        assert got.rejected is None and got.segments == [want.chosen]
        assert got.chosen.input_ids[-1] == tokenizer.eos_token_id  # one EOS closes the completion
    long = tokenize_pair(ROWS.normalize({"prompt": "Q " * 5, "completion": " word" * 100})[0], tokenizer,
                         max_length=20)
    assert len(long.chosen.input_ids) == 20 and long.truncated


def test_sft_data_config(assets, tmp_path):
    cfg = tiny_config(assets, tmp_path / "run", sft={"enabled": True, "data": {"train_files": ["sft.jsonl"],
                                                                                "eval_fraction": 0.2}})
    assert cfg.sft.data == SFTDataConfig(train_files=["sft.jsonl"], eval_fraction=0.2)
    with pytest.raises(ConfigError, match=r"^sft\.data\.train_files, sft\.data\.hf_dataset or sft\.data\.sources: "
                                          r"exactly one is required"):
        tiny_config(assets, tmp_path / "run", sft={"enabled": True, "data": {"eval_fraction": 0.2}})
    with pytest.raises(ConfigError, match=r"^sft\.data\.eval_fraction: must be in \[0, 1\)"):
        tiny_config(assets, tmp_path / "run", sft={"enabled": True, "data": {"train_files": ["a"],
                                                                            "eval_fraction": 1.0}})
    with pytest.raises(ConfigError, match=r"unknown config key sft\.data\.chosen_key"):
        tiny_config(assets, tmp_path / "run", sft={"enabled": True, "data": {"train_files": ["a"], "chosen_key": "c"}})


def read_sequences(out: Loc, split: str) -> list[tuple[tuple, int]]:
    """Every sequence of a split's rows: (its tokens, its prompt length), sorted."""
    seqs = []
    for row in pq.read_table([f.local for f in split_files(out, split)]).to_pylist() if split_files(out, split) else []:
        assert len(row["seq_lens"]) == len(row["pair_ids"])  # one segment per sequence
        start = 0
        for n, p in zip(row["seq_lens"], row["prompt_lens"]):
            assert row["position_ids"][start:start + n] == list(range(n))
            seqs.append((tuple(row["input_ids"][start:start + n]), p))
            start += n
    return sorted(seqs)


def test_own_rows_of_the_pairs_chosen_conversations_are_the_chosen_rows(assets, tmp_path):
    """The demo pairs written as SFT conversations (prompt + chosen) plus bad rows: the good
    rows give exactly the sequences `data: chosen` gives, split the same way (the split keys
    on the prompt as written); the bad ones are quarantined with their reason and counted."""
    pairs = [json.loads(line) for line in open(assets["data"]).read().splitlines()[:300]]
    rows = [{"messages": p["prompt"] + p["chosen"]} for p in pairs]
    rows += [{"messages": pairs[0]["prompt"]}, {"text": "no prompt"}, {"prompt": "Q", "completion": ""}]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pair_file = tmp_path / "pairs.jsonl"
    pair_file.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    cfg = tiny_config(assets, tmp_path / "run", data_file=pair_file, tokenize={"max_bad_fraction": 0.02},
                      sft={"enabled": True, "data": {"train_files": [str(data)], "eval_fraction": 0.1}})
    tok, chosen, own = (Loc(tmp_path / d) for d in ("tok", "chosen", "own"))
    for d in (tok, chosen, own):
        d.mkdir()
    tokenize.run_in_process(cfg, tok)
    sft.write_chosen_rows(cfg, tok, chosen)
    shards, stats = sft.tokenize_own(*sft.own_data(cfg), own, use_ray=False)

    assert stats["format"] == "messages_conversational"
    assert stats["quarantined"] == 3
    assert stats["quarantine_reasons"] == {"malformed_messages": 1, "missing_field": 1, "empty_completion": 1}
    quarantine = pq.read_table(own.local / "quarantine.parquet").to_pylist()
    assert sorted(q["row_index"] for q in quarantine) == [300, 301, 302] and all(q["raw"] for q in quarantine)
    for split in ("train", "eval"):
        assert read_sequences(own, split) == read_sequences(chosen, split), split
    assert stats["train"]["sequences"] + stats["eval"]["sequences"] == 300
    assert {s.name for s in shards} >= {"quarantine.parquet", "train-00000.parquet"}


def test_own_data_with_nothing_to_train_on_is_a_data_error_of_sft_data(assets, tmp_path):
    """Every row in the eval split: the run ends in one line (a DataError), said of sft.data's
    rows and its eval fraction; the quarantine path in it as it is."""
    from pipeline.core.config import DataError

    pairs = [json.loads(line) for line in open(assets["data"]).read().splitlines()[:3]]
    data = tmp_path / "pairs-sft.jsonl"
    data.write_text("".join(json.dumps({"messages": p["prompt"] + p["chosen"]}) + "\n" for p in pairs))
    cfg = tiny_config(assets, tmp_path / "run", sft={"enabled": True, "data": {"train_files": [str(data)],
                                                                                 "eval_fraction": 0.99}})
    out = Loc(tmp_path / "own")
    out.mkdir()
    with pytest.raises(DataError, match=r"^sft\.data: no training rows left \(all quarantined or in eval\): see "
                                         r".*/own/quarantine\.parquet and sft\.data\.eval_fraction$"):
        sft.tokenize_own(*sft.own_data(cfg), out, use_ray=False)
