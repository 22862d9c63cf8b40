"""One door per stage: a stage declared in this module, registered with one line, runs
after train through the runner, loads train's exported model as score loads sft's, and
shows in ``status``, ``--stages``, ``--from``, the summary and the report, with no edit to
the runner (pipeline/core/stage.py, docs/design.md "Stages").

The stage counts the tokens the trained policy generates, greedily, for the first eval
prompts: what a generate stage does, cut to what the test needs.
"""

import ast
import json
import re
from pathlib import Path

import pytest

from helpers import tiny_config
from pipeline import cli, runner
from pipeline.core.config import dump_yaml
from pipeline.core.rundir import ShardInfo, read_manifest
from pipeline.core.stage import RunContext, Stage
from pipeline.registry import names, register, unregister
from pipeline.training.export import export_digest

PROMPTS, NEW_TOKENS = 3, 4


def count_generated(ctx: RunContext):
    """Load the model the runner hands this stage as ``model.path`` (train's export), and
    generate ``NEW_TOKENS`` greedily after each of the first eval prompts."""
    import torch

    from pipeline.core.modeling import load_causal_lm
    from pipeline.core.rows import RowReader, split_files

    model = load_causal_lm(ctx.cfg.model.path, ctx.cfg.model)
    rows = RowReader(split_files(ctx.dir("tokenize"), "eval"))
    generated = []
    for i in range(PROMPTS):
        row = rows[i]
        prompt = torch.tensor([row["input_ids"][:row["prompt_lens"][0]]])
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                 pad_token_id=0)
        generated.append(out.shape[1] - prompt.shape[1])
    path = ctx.out / "counts.json"
    path.write_text(json.dumps({"generated": generated, "model": ctx.cfg.model.path, "models": ctx.models}))
    return [ShardInfo.of(path, PROMPTS)], {"rows": PROMPTS, "tokens": sum(generated), "prompts": PROMPTS}


COUNT = Stage(
    name="count",
    fingerprint_inputs=lambda cfg, cache, fingerprints: {"upstream": fingerprints["train"], "new_tokens": NEW_TOKENS},
    run=count_generated,
    reads=lambda cfg, planned: {"train", "tokenize"},
    models=("path", "tokenizer_path"),
    loads={"train": "path"},
    summary=lambda stats: [f"count: {stats['tokens']} tokens generated for {stats['prompts']} eval prompts"],
)


@pytest.fixture
def count_stage():
    register(COUNT)  # the one line a new stage needs
    yield COUNT
    unregister(COUNT.name)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_stage_registered_with_one_line_runs_after_train(assets, tmp_path, count_stage, capsys):
    cfg = tiny_config(assets, tmp_path / "run", tokenize={"max_tokens_per_row": 256},
                      train={"max_steps": 2, "num_workers": 1, "eval_steps": 100, "report_to": []})
    assert [r["stage"] for r in runner.status(cfg)] == ["tokenize", "sft", "score", "train", "generate", "count"]
    assert {r["stage"]: r["state"] for r in runner.status(cfg)}["count"] == "missing"

    results = runner.run_pipeline(cfg, use_ray=False, log=lambda _: None)
    assert [name for name, r in results.items() if r["ran"]] == ["tokenize", "score", "train", "count"]
    train_dir, count_dir = Path(results["train"]["dir"]), Path(results["count"]["dir"])
    counts = json.loads((count_dir / "counts.json").read_text())
    # the model it loaded is the one train exported, pinned with the digest of its committed files
    assert Path(counts["model"]) == train_dir / "model"
    recorded = read_manifest(count_dir)["models"]["model.path"]
    assert recorded["export_digest"] == export_digest(train_dir, train_dir / "model")
    assert counts["models"]["train.base_model"]["pinned"] == str(Path(assets["model"]).resolve())
    assert counts["generated"] == [NEW_TOKENS] * PROMPTS
    assert {r["stage"]: r["state"] for r in runner.status(cfg)}["count"] == "done"
    summary = runner.format_summary(results)
    assert summary.splitlines()[-1] == f"count: {NEW_TOKENS * PROMPTS} tokens generated for {PROMPTS} eval prompts"
    report = (tmp_path / "run" / "report" / "report.md").read_text()
    assert f"| count | ran | {PROMPTS} | {NEW_TOKENS * PROMPTS} |" in report

    # --stages and --from, through the CLI as a user runs them
    config = tmp_path / "run.yaml"
    config.write_text(dump_yaml(cfg))
    capsys.readouterr()
    assert cli.main(["run", str(config), "--no-ray", "--stages", "count", "--force"]) == 0
    out = capsys.readouterr().out
    assert "[count] running" in out and "[train] running" not in out and re.search(r"^count +ran ", out, re.M), out
    assert cli.main(["run", str(config), "--no-ray", "--from", "count"]) == 0
    assert "[count] done already" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    assert "tokenize,sft,score,train,generate,count" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_stage_after_train_gets_the_model_of_this_run(assets, tmp_path, count_stage):
    """With sft: train starts from the SFT model and hands its own on, and only the
    selected stage runs (--stages count) while the ones it reads are done. An output made
    from another build of train's model (same fingerprint, other bytes, as a train rerun
    with --force on other hardware) is refused."""
    steps = {"max_steps": 2, "num_workers": 1, "eval_steps": 100, "report_to": []}
    cfg = tiny_config(assets, tmp_path / "run", tokenize={"max_tokens_per_row": 256}, train=steps,
                      sft=dict(steps, enabled=True))
    results = runner.run_pipeline(cfg, use_ray=False, log=lambda _: None)
    assert [name for name, r in results.items() if r["ran"]] == ["tokenize", "sft", "score", "train", "count"]
    sft_dir, count_dir = Path(results["sft"]["dir"]), Path(results["count"]["dir"])
    counts = json.loads((count_dir / "counts.json").read_text())
    assert Path(counts["model"]) == Path(results["train"]["dir"]) / "model"
    assert counts["models"]["train.base_model"]["pinned"] == str(sft_dir / "model")  # train started from sft's

    assert runner.run_pipeline(cfg, stages=["tokenize", "sft"], use_ray=False, log=lambda _: None)["sft"]["ran"] is False
    again = runner.run_pipeline(cfg, stages=["count"], force=True, use_ray=False, log=lambda _: None)
    assert list(again) == ["count"] and again["count"]["ran"]

    train_dir = Path(results["train"]["dir"])
    manifest = json.loads((train_dir / "_MANIFEST.json").read_text())
    weights = next(s for s in manifest["shards"] if s["name"] == "model/model.safetensors")
    weights["sha256"] = "0" * 64  # train's model, as another build of it would be committed
    (train_dir / "_MANIFEST.json").write_text(json.dumps(manifest))
    with pytest.raises(RuntimeError, match=r"count \(\w+\) was made from a trained policy with digest \w+, and the "
                                           r"train stage's model is now \w+ \(train ran again since\): rerun it, "
                                           r"--from count --force"):
        runner.run_pipeline(cfg, stages=["count"], use_ray=False, log=lambda _: None)


def test_the_runner_names_no_stage():
    """The runner loops over the registry: no string in runner.py names a stage."""
    source = Path(runner.__file__).read_text()
    strings = [n.value for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    named = {(name, s) for s in strings for name in names() if re.search(rf"\b{name}\b", s)}
    assert not named, named
