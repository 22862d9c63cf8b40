"""The generate stage's parts, fast: its fingerprint (a generate setting reruns generate
alone), the engine's batch against one prompt at a time, stops, a prompts file, and the
reward model named as the run's models are. No pipeline run."""

import json
from types import SimpleNamespace

import pytest
import torch

from helpers import tiny_config
from pipeline import runner
from pipeline.core import models
from pipeline.core.config import ConfigError, ModelConfig, for_workers
from stages.generate.engines import HFEngine, cut_at_stop, shard_seed
from stages.generate.prompts import file_prompts


def fingerprints(cfg) -> dict:
    return {name: p.fingerprint for name, p in runner.plan_stages(models.pin(cfg)[0]).items()}


def test_a_generate_setting_reruns_generate_alone(assets, tmp_path):
    plain = fingerprints(tiny_config(assets, tmp_path))
    on = fingerprints(tiny_config(assets, tmp_path, generate={"enabled": True}))
    assert list(on) == list(plain) + ["generate"] and {k: on[k] for k in plain} == plain
    for key, value in (("max_new_tokens", 32), ("temperature", 0.7), ("num_prompts", 20), ("seed", 3),
                       ("prompts_per_shard", 4)):
        other = fingerprints(tiny_config(assets, tmp_path, generate={"enabled": True, key: value}))
        assert [k for k in on if other[k] != on[k]] == ["generate"], key
    for key, value in (("actors", 3), ("show", 9), ("cpu_threads", 2)):  # where and how it runs, what it shows
        assert fingerprints(tiny_config(assets, tmp_path, generate={"enabled": True, key: value})) == on, key
    # a new policy (train's settings) reruns train and generate
    beta = fingerprints(tiny_config(assets, tmp_path, generate={"enabled": True}, train={"beta": 0.2}))
    assert [k for k in on if beta[k] != on[k]] == ["train", "generate"]


def test_a_batch_answers_as_each_prompt_alone_and_stops_where_it_should(assets, tokenizer):
    """Left-padded prompts of different lengths, greedy: the same tokens as one prompt at a
    time (the pads are masked, on the demo's segment_sdpa model too), each cut after its
    first stop token."""
    prompts = [tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                       add_generation_prompt=True), add_special_tokens=False)["input_ids"]
               for text in ("Describe the lamp.", "How would you describe the old river to a friend?", "Hi")]
    assert len({len(p) for p in prompts}) == 3
    stop = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id]
    engine = HFEngine(str(assets["model"]), ModelConfig(path="x", attn_implementation="segment_sdpa"),
                      torch.device("cpu"), tokenizer.eos_token_id, stop)
    g = SimpleNamespace(num_samples=1, temperature=0.0, top_p=1.0, max_new_tokens=12)
    together = engine.generate(prompts, g, 0)
    alone = [engine.generate([p], g, 0)[0] for p in prompts]
    assert together == alone
    for (completion,) in together:
        assert all(t not in stop for t in completion[:-1]) and (completion[-1] in stop or len(completion) == 12)
    assert cut_at_stop([5, 6, 2, 7, 2], {2}) == [5, 6, 2] and cut_at_stop([5, 6], {2}) == [5, 6]
    # sampled: two samples a prompt, the same again from the same seed, others from another
    g = SimpleNamespace(num_samples=2, temperature=1.0, top_p=0.9, max_new_tokens=8)
    first = engine.generate(prompts, g, shard_seed(0, 1, 0))
    assert first == engine.generate(prompts, g, shard_seed(0, 1, 0)) and [len(s) for s in first] == [2, 2, 2]
    assert first != engine.generate(prompts, g, shard_seed(0, 2, 0))


def test_a_prompts_file_gets_the_chat_template_and_bad_lines_are_named(tokenizer, tmp_path):
    path = tmp_path / "prompts.jsonl"
    messages = [{"role": "user", "content": "Describe the lamp."}]
    path.write_text(json.dumps({"prompt": messages}) + "\n\n" + json.dumps({"prompt": "Describe the lamp."}) + "\n")
    table = file_prompts(str(path), tokenizer)
    expected = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                         add_special_tokens=False)["input_ids"]
    assert table.column("prompt_ids").to_pylist() == [expected, expected]  # text is the user's one message
    assert table.column("prompt_index").to_pylist() == [0, 1] and table.column("chosen_ids").null_count == 2
    path.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"text": "no prompt"}) + "\n")
    with pytest.raises(ValueError, match=r"generate.prompts_file: .*prompts.jsonl line 2: not a JSON object with a"):
        file_prompts(str(path), tokenizer)


def test_the_reward_model_is_pinned_as_the_run_models_are(assets, tmp_path, monkeypatch):
    monkeypatch.chdir(assets["model"].parent)
    cfg = tiny_config(assets, tmp_path, generate={"enabled": True, "reward_model": f"./{assets['model'].name}"})
    pinned, done = models.pin(cfg)
    assert pinned.generate.reward_model == str(assets["model"].resolve()) and done["reward_model"].kind == "local"
    assert for_workers(cfg)["generate"]["reward_model"] == str(assets["model"].resolve())  # workers run elsewhere
    with pytest.raises(ConfigError, match=r"generate.reward_model: ./nowhere: no such directory"):
        models.pin(tiny_config(assets, tmp_path, generate={"enabled": True, "reward_model": "./nowhere"}))
