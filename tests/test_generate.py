"""The generate stage on the demo (stages/generate/): after train, the trained policy and
the reference answer the eval prompts greedily, side by side in the report; a rerun skips
it; a kill during it resumes shard by shard, each shard written once."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from helpers import tiny_config, write_config
from pipeline import runner
from pipeline.demo import NEGATIVE, POSITIVE

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
HERE = Path(__file__).parent

# The filed criterion: over the greedy answers to 50 eval prompts, the policy uses more of the
# demo's positive words and fewer of its negative words than the reference, by a margin
# written before the run.
# - Session 32, the demo as it is (reference = the random-initialised model.path): written
#   before the run, at least 10 more positive words and fewer negative ones. Failed: policy
#   25 positive / 0 negative, reference 58 / 79; the random model's greedy answers run to
#   max_new_tokens repeating a few tokens, words of both lists among them.
# - Session 33: a reference that speaks, as the DPO paper's pipeline has one. The sft stage
#   trains model.path on every pair's prompt with its chosen AND its rejected answer (a base
#   model of the demo's language that holds no preference, base_corpus below); train then
#   runs tiny.yaml's DPO from it. Eval share 0.25, so the split holds 50 distinct prompts
#   (0.1 gives 26). A trial at 0.1 gave policy 17 positive / 0 negative, reference 0 / 49.
#   Written after that trial, before the run at 0.25 that this test makes: the policy's
#   positive words exceed the reference's by at least 10, its negative words are at least 10
#   fewer, and at least 10 more of its answers praise (a positive word, no negative one).
WORD_MARGIN = 10


def base_corpus(assets, path: Path) -> Path:
    """SFT rows: each pair's prompt with its chosen answer, and again with its rejected one."""
    import json

    with open(path, "w") as out:
        for line in Path(assets["data"]).read_text().splitlines():
            pair = json.loads(line)
            for side in ("chosen", "rejected"):
                out.write(json.dumps({"prompt": pair["prompt"], "completion": pair[side]}) + "\n")
    return path


def demo(assets, run_dir: Path, corpus: Path, **generate):
    """The demo's config (configs/tiny.yaml on the session's assets) in one process, with an
    sft reference trained on ``corpus`` (at train's learning rate: the model starts from
    random weights) and generate on: greedy, 50 eval prompts asked for."""
    return tiny_config(assets, run_dir, data={"train_files": [str(assets["data"])], "eval_fraction": 0.25},
                       train={"num_workers": 1, "report_to": []},
                       sft={"enabled": True, "data": {"train_files": [str(corpus)]}, "learning_rate": 1.0e-3},
                       generate={"enabled": True, "num_prompts": 50, "prompts_per_shard": 16, **generate})


def reward_model(assets, path: Path) -> Path:
    """A sequence-classification Llama of one layer whose reward is the mean sentiment of the
    text's tokens: embeddings (s, 1, 0, 0) with s = 1 for a positive word of the demo, -1 for
    a negative one, 0 otherwise; q and k zero, so attention is the uniform causal mean; v
    carries s into the third dimension, which the score head reads; the MLP adds nothing.
    Its sign is that of the text's positive words less its negative ones."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(assets["model"])
    config = LlamaConfig(vocab_size=len(tok), hidden_size=4, intermediate_size=8, num_hidden_layers=1,
                         num_attention_heads=1, num_key_value_heads=1, num_labels=1, rms_norm_eps=1e-6,
                         pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"))
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for norm in (model.model.norm, model.model.layers[0].input_layernorm,
                     model.model.layers[0].post_attention_layernorm):
            norm.weight.fill_(1.0)
        emb = model.model.embed_tokens.weight
        emb[:, 1] = 1.0
        for words, s in ((POSITIVE, 1.0), (NEGATIVE, -1.0)):
            for w in words:
                for token in {tok(" " + w, add_special_tokens=False)["input_ids"][-1],
                              tok(w, add_special_tokens=False)["input_ids"][-1]}:
                    emb[token, 0] = s
        attn = model.model.layers[0].self_attn
        attn.v_proj.weight[2, 0] = 1.0
        attn.o_proj.weight.copy_(torch.eye(4))
        model.score.weight[0, 2] = 1.0
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def samples(out: Path) -> list[dict]:
    return [r for f in sorted(out.glob("samples-*.parquet")) for r in pq.read_table(f).to_pylist()]


def words(texts: list[str], vocabulary: list[str]) -> int:
    return sum(w.strip(".,:").lower() in vocabulary for t in texts for w in t.split())


@pytest.fixture(scope="module")
def ran(assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    cfg = demo(assets, root / "run", base_corpus(assets, root / "base.jsonl"),
               reward_model=str(reward_model(assets, root / "rm")))
    start = time.time()
    results = runner.run_pipeline(cfg, use_ray=False, log=print)
    return cfg, results, time.time() - start


def distinct_eval_prompts(cfg) -> int:
    from pipeline.core.rows import RowReader, split_files
    from stages.generate.prompts import pairs_of_row

    rows = RowReader(split_files(runner.plan_stages(cfg)["tokenize"].dir, "eval"))
    return len({tuple(p) for i in range(rows.num_rows) for _, p, _, _ in pairs_of_row(
        rows[i]["input_ids"], rows[i]["seq_lens"], rows[i]["prompt_lens"], rows[i]["pair_ids"])})


def test_the_policy_says_more_positive_things_than_the_reference(ran):
    cfg, results, _ = ran
    rows = samples(Path(results["generate"]["dir"]))
    # the demo's pairs at an eval share of 0.25: 50 of the 200 prompts (4 questions x 50
    # items, split by prompt), each answered once
    assert len(rows) == len({r["prompt_index"] for r in rows}) == min(50, distinct_eval_prompts(cfg)) == 50
    counts = {side: {"positive": words([r[side] for r in rows], POSITIVE),
                     "negative": words([r[side] for r in rows], NEGATIVE)} for side in ("policy", "reference")}
    answers = {side: {"praise": sum(words([r[side]], POSITIVE) > 0 and words([r[side]], NEGATIVE) == 0 for r in rows),
                      "negative": sum(words([r[side]], NEGATIVE) > 0 for r in rows)} for side in ("policy", "reference")}
    print(f"word counts over {len(rows)} greedy answers:", counts, "answers:", answers)
    for r in rows[:3]:
        print(repr(r["policy"]), "|", repr(r["reference"]))
    assert counts["policy"]["positive"] >= counts["reference"]["positive"] + WORD_MARGIN, counts
    assert counts["policy"]["negative"] <= counts["reference"]["negative"] - WORD_MARGIN, counts
    assert answers["policy"]["praise"] >= answers["reference"]["praise"] + WORD_MARGIN, answers
    # the reference speaks the demo's language: its answers are sentences of the data's frames
    assert sum(r["reference"].rstrip().endswith(".") for r in rows) >= len(rows) // 2, [r["reference"] for r in rows]
    # the prompts are eval prompts as stored, with the dataset's answers beside them
    assert all(r["pair_id"] and r["chosen"] and r["rejected"] for r in rows)


def test_the_win_rates_are_those_of_the_rewards_written(ran):
    """Each completion's reward as the reward model gives it, and the win rates and their
    Wilson intervals as the rows' rewards give them, prompt by prompt, ties at half."""
    from stages.generate.judge import wilson

    _, results, _ = ran
    stats = results["generate"]["stats"]
    rows = samples(Path(results["generate"]["dir"]))
    for side in ("policy", "reference", "chosen"):
        assert all(r[f"{side}_reward"] is not None for r in rows), side
    for name, other in (("policy_vs_reference", "reference"), ("policy_vs_chosen", "chosen")):
        scores = [1.0 if r["policy_reward"] > r[f"{other}_reward"] else 0.5 if r["policy_reward"] ==
                  r[f"{other}_reward"] else 0.0 for r in rows]
        rate = sum(scores) / len(scores)
        assert stats["win_rates"][name]["win_rate"] == pytest.approx(rate)
        assert stats["win_rates"][name]["ci95"] == pytest.approx(list(wilson(rate, len(rows))))
    print("win rates:", stats["win_rates"], "mean rewards:", stats["mean_reward"])
    # written before its first run: the reward is the text's mean sentiment, so the policy,
    # which praises where the reference runs down, wins beyond its interval's doubt
    assert stats["win_rates"]["policy_vs_reference"]["ci95"][0] > 0.5, stats["win_rates"]
    summary = runner.format_summary(results)
    assert "generate: policy win rate against reference" in summary
    assert (Path(ran[0].run_dir) / "report" / "generate_rewards.png").stat().st_size > 1000


def test_the_report_shows_the_samples_and_a_rerun_skips_generate(ran):
    cfg, results, _ = ran
    report = (Path(cfg.run_dir) / "report" / "report.md").read_text()
    assert "## generate" in report and "| prompt | policy | reference | chosen |" in report
    first = min(samples(Path(results["generate"]["dir"])), key=lambda r: r["prompt_index"])
    assert " ".join(first["policy"].split()).replace("|", "\\|")[:40] in report
    summary = runner.format_summary(results)
    assert f"generate: {results['generate']['stats']['prompts']} prompts x 1 samples; mean completion tokens" in summary
    again = runner.run_pipeline(cfg, use_ray=False, log=lambda _: None)
    assert not any(r["ran"] for r in again.values())
    assert {r["stage"]: r["state"] for r in runner.status(cfg)}["generate"] == "done"


def test_a_kill_during_generate_resumes_shard_by_shard(ran, tmp_path):
    """Rerun with --force (the output cleared) and killed after its 2nd of 4 shards (16, 16,
    16 and 2 prompts); the rerun keeps those two, written once, and writes the other two:
    every answer equals the uninterrupted run's (greedy, the same batches)."""
    cfg, results, _ = ran
    out = Path(results["generate"]["dir"])
    straight = [pq.read_table(f).to_pylist() for f in sorted(out.glob("samples-*.parquet"))]
    assert len(straight) == 4
    path = write_config(cfg, tmp_path / "run.yaml")
    proc = subprocess.run([sys.executable, str(HERE / "kill_in_generate.py"), "run", str(path), "--no-ray",
                           "--stages", "generate", "--force"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    first = {f.name: f.stat().st_mtime_ns for f in out.glob("samples-*.parquet")}
    assert sorted(first) == ["samples-00000.parquet", "samples-00001.parquet"]
    assert not (out / "_MANIFEST.json").exists()
    assert {r["stage"]: r["state"] for r in runner.status(cfg)}["generate"] == "partial"
    rerun = subprocess.run([sys.executable, "-m", "pipeline", "run", str(path), "--no-ray"],
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "[generate] running" in rerun.stdout and "[train] done already" in rerun.stdout
    assert {f.name: f.stat().st_mtime_ns for f in out.glob("samples-*.parquet") if f.name in first} == first
    assert not list(out.glob("*.tmp-*"))
    assert [pq.read_table(f).to_pylist() for f in sorted(out.glob("samples-*.parquet"))] == straight
