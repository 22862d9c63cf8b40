"""A prompt that leaves no room for its completions: quarantined (the default), or, with
``tokenize.prompt_too_long: truncate`` (TRL's behaviour), cut as ``truncation_mode`` says
so that each completion keeps ``tokenize.min_completion_tokens``."""

import json

import pyarrow.parquet as pq
import pytest

from helpers import tiny_config
from pipeline.core.config import ConfigError, config_from_dict, to_dict
from pipeline.core.formats import BadRow, normalize, tokenize_pair
from pipeline.core.rundir import HashCache
from pipeline.tokenizing import tokenize

KEYS = ("prompt", "chosen", "rejected")


def hh_row(words: int, i: int = 0):
    """Anthropic HH-RLHF style: a long conversation, then two short answers."""
    return {"prompt": [{"role": "system", "content": f"Case {i}."},
                       {"role": "user", "content": " ".join(["word"] * words)}],
            "chosen": [{"role": "assistant", "content": "The lamp is great and clean."}],
            "rejected": [{"role": "assistant", "content": "Dull, and the lamp is broken."}]}


def whole(tokenizer, row):
    return tokenize_pair(*normalize(row, *KEYS), tokenizer, max_length=100_000)


@pytest.mark.parametrize("mode", ["keep_end", "keep_start"])
def test_truncate_cuts_the_prompt_so_each_completion_keeps_its_minimum(tokenizer, mode):
    row = hh_row(120)
    full = whole(tokenizer, row)
    prompt = full.chosen.input_ids[: full.chosen.prompt_len]
    chosen_c, rejected_c = (s.input_ids[s.prompt_len:] for s in (full.chosen, full.rejected))
    assert len(prompt) > 64 and len(chosen_c) > 5 and len(rejected_c) > 5
    tp = tokenize_pair(*normalize(row, *KEYS), tokenizer, max_length=64, truncation_mode=mode,
                       prompt_too_long="truncate", min_completion_tokens=5)
    kept = prompt[-59:] if mode == "keep_end" else prompt[:59]  # 64 - 5 prompt tokens, one prompt for both sides
    assert tp.chosen.input_ids == kept + chosen_c[:5] and tp.chosen.prompt_len == 59
    assert tp.rejected.input_ids == kept + rejected_c[:5] and tp.rejected.prompt_len == 59
    assert tp.truncated and tp.prompt_truncated


def test_a_short_completion_keeps_all_of_itself_and_the_prompt_the_rest(tokenizer):
    row = hh_row(120)
    full = whole(tokenizer, row)
    prompt = full.chosen.input_ids[: full.chosen.prompt_len]
    longest = max(len(s.input_ids) - s.prompt_len for s in (full.chosen, full.rejected))
    tp = tokenize_pair(*normalize(row, *KEYS), tokenizer, max_length=64, prompt_too_long="truncate",
                       min_completion_tokens=50)
    assert longest < 50 and tp.chosen.prompt_len == 64 - longest  # room for the longest completion, whole
    assert tp.chosen.input_ids[: tp.chosen.prompt_len] == prompt[-(64 - longest):]
    for seg, side in ((tp.chosen, full.chosen), (tp.rejected, full.rejected)):
        assert seg.input_ids[seg.prompt_len:] == side.input_ids[side.prompt_len:]


def test_quarantine_keeps_the_old_rule_and_adds_the_minimum(tokenizer):
    row = hh_row(120)
    with pytest.raises(BadRow, match=r"prompt has \d+ tokens, max_length 64$") as e:
        tokenize_pair(*normalize(row, *KEYS), tokenizer, max_length=64)
    assert e.value.reason == "prompt_too_long"
    full = whole(tokenizer, hh_row(10))
    n = full.chosen.prompt_len
    assert tokenize_pair(*normalize(hh_row(10), *KEYS), tokenizer, max_length=n + 2).chosen.prompt_len == n
    with pytest.raises(BadRow, match=f"prompt has {n} tokens, max_length {n + 2}, and completions keep 3"):
        tokenize_pair(*normalize(hh_row(10), *KEYS), tokenizer, max_length=n + 2, min_completion_tokens=3)


def run(assets, tmp_path, name, rows, **tok):
    data = tmp_path / "hh.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tiny_config(assets, tmp_path / name, data, tokenize={"max_length": 64, **tok},
                      data={"eval_fraction": 0.0})
    out = tmp_path / name / "out"
    out.mkdir(parents=True)
    _, stats = tokenize.run_in_process(cfg, out)
    return cfg, stats, pq.read_table(out / "quarantine.parquet").to_pylist()


def test_the_stage_counts_cut_prompts_and_quarantines_none(assets, tmp_path):
    rows = [hh_row(120 if i % 3 == 0 else 5, i) for i in range(12)]
    cfg, stats, quarantine = run(assets, tmp_path, "default", rows, max_bad_fraction=0.5)
    assert stats["quarantine_reasons"] == {"prompt_too_long": 4} and len(quarantine) == 4
    assert stats["pairs"] == 8 and stats["prompt_truncated_pairs"] == 0
    cut_cfg, stats, quarantine = run(assets, tmp_path, "truncate", rows, prompt_too_long="truncate",
                                     min_completion_tokens=4)
    assert quarantine == [] and stats["pairs"] == 12 and stats["prompt_truncated_pairs"] == 4
    assert stats["truncated_pairs"] >= 4
    # The default leaves the fingerprint as it was before the setting existed; truncate changes it.
    cache = HashCache(tmp_path / "hashes.json")
    plain = tokenize.fingerprint_inputs(cfg, cache)
    assert "prompt_too_long" not in plain["tokenize_settings"]
    assert "min_completion_tokens" not in plain["tokenize_settings"]
    assert tokenize.fingerprint_inputs(cut_cfg, cache)["tokenize_settings"]["prompt_too_long"] == "truncate"


def test_min_completion_tokens_is_checked(assets, tmp_path):
    raw = to_dict(tiny_config(assets, tmp_path / "run"))
    raw["tokenize"]["min_completion_tokens"] = raw["tokenize"]["max_length"]
    with pytest.raises(ConfigError, match=r"tokenize.min_completion_tokens: must be in \[1, tokenize.max_length"):
        config_from_dict(raw)
    raw["tokenize"]["min_completion_tokens"] = 1
    raw["tokenize"]["prompt_too_long"] = "drop"
    with pytest.raises(ConfigError, match="tokenize.prompt_too_long"):
        config_from_dict(raw)
