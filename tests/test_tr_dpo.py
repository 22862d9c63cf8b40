"""TR-DPO offline (train.sync_ref_model; pipeline/training/refresh.py): the reference mixed
in the ranks every τ steps and the coming rows rescored with it, against a live-reference
run that applies TRL 1.16's own ``SyncRefModelCallback._sync_target_model``; τ past the
last step is the plain run bit for bit; a kill during a refresh resumes bit for bit."""

import copy
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from helpers import tiny_config, train_dir, train_metrics, write_config
from pipeline import runner
from pipeline.core.logps import packed_token_logps
from pipeline.core.modeling import load_causal_lm, row_tensors
from pipeline.core.packing import eval_plan
from pipeline.core.rows import RowReader, split_files
from pipeline.core.rundir import read_manifest
from pipeline.core.segments import segment_layout
from pipeline.demo import make_pairs, write_jsonl
from pipeline.training.plan import planned_steps
from stages.train import preference_objective

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

STEPS, TAU, ALPHA = 7, 2, 0.6  # refreshes after steps 2, 4 and 6
# Plain AdamW at a constant rate, no clipping: what the live run below does by hand. Adam
# divides by sqrt(v) + eps: with torch's 1e-8 a parameter whose gradient is ~0 takes a step of
# ~lr whichever way float noise points it, and ZeRO-3's flat fp32 partitions and a plain
# model's tensors sum in other orders (1e-5 apart after 7 steps with or without TR-DPO). An
# eps of 1e-4 keeps such steps small, so what is compared is the reference's refresh.
TRAIN = {"max_steps": STEPS, "num_workers": 1, "gradient_accumulation_steps": 2, "learning_rate": 1e-2,
         "adam_epsilon": 1e-4,
         "lr_scheduler_type": "constant", "warmup_ratio": 0.0, "weight_decay": 0.0, "max_grad_norm": 0.0,
         "eval_steps": 2, "logging_steps": 1, "report_to": []}
SYNC = {"sync_ref_model": True, "ref_model_sync_steps": TAU, "ref_model_mixup_alpha": ALPHA}
HERE = Path(__file__).parent
# Buckets and sub-groups far smaller than the weights (4k-33k elements): what breaks at scale breaks here
SMALL = {"reduce_bucket_size": 2000, "allgather_bucket_size": 2000, "stage3_prefetch_bucket_size": 2000,
         "sub_group_size": 10000}
COMPARED = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tr_dpo")
    write_jsonl(make_pairs(300, seed=3), root / "pairs.jsonl")
    return root


@pytest.fixture(scope="module")
def few(tmp_path_factory):
    """Pairs for 5 steps an epoch: the epoch ends inside the segment of steps 5-6."""
    root = tmp_path_factory.mktemp("tr_dpo_few")
    write_jsonl(make_pairs(70, seed=3), root / "pairs.jsonl")
    return root


def config(assets, data: Path, name: str = "run", **train):
    return tiny_config(assets, data / name, data_file=data / "pairs.jsonl", tokenize={"max_tokens_per_row": 256},
                       data={"eval_fraction": 0.2}, train={**TRAIN, **train})


def run(cfg) -> list[dict]:
    runner.run_pipeline(cfg, use_ray=False, log=lambda _: None)
    return train_metrics(cfg)


def by_step(records: list[dict], key: str) -> dict[int, dict]:
    return {r["step"]: r for r in records if key in r}


def numbers(records: list[dict], key: str) -> dict[int, dict]:
    """What a step or an eval computed (not its timing), by step."""
    return {step: {k: v for k, v in r.items() if "second" not in k} for step, r in by_step(records, key).items()}


def weights(cfg) -> dict[str, torch.Tensor]:
    return load_file(train_dir(cfg) / "model" / "model.safetensors")


def live_run(cfg) -> tuple[dict, dict]:
    """TR-DPO as TRL runs it: the policy and a live reference model in plain torch, the
    same rows each step (the pipeline's seeded plan), the reference's log-probs computed
    live, and TRL's ``_sync_target_model`` at the end of every τ-th step, before that
    step's eval. Returns the per-step and eval metrics, means per pair."""
    from trl.trainer.callbacks import SyncRefModelCallback

    scored = runner.plan_stages(cfg)["score"].dir
    train_rows, eval_rows = RowReader(split_files(scored, "train")), RowReader(split_files(scored, "eval"))
    objective = preference_objective(cfg)
    policy = load_causal_lm(cfg.model.path, cfg.model)
    reference = copy.deepcopy(policy).eval()
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.train.learning_rate, eps=cfg.train.adam_epsilon, weight_decay=0.0)

    def through(model, row, weight=1.0):
        t = row_tensors(row)
        with torch.no_grad():
            live = packed_token_logps(reference, t["input_ids"], t["position_ids"],
                                      segment_layout(t["seq_lens"], t["prompt_lens"])).logps
        return objective.pairs(model, dict(row, ref_logps=live.tolist()), "cpu").loss

    def means(outs, prefix=""):
        pairs = sum(o.losses.numel() * w for o, w in outs)
        sums = {"loss": sum(float(o.losses.detach().double().sum()) * w for o, w in outs),
                "rewards/chosen": sum(float(o.chosen_rewards.double().sum()) * w for o, w in outs),
                "rewards/rejected": sum(float(o.rejected_rewards.double().sum()) * w for o, w in outs),
                "rewards/margins": sum(float((o.chosen_rewards - o.rejected_rewards).double().sum()) * w for o, w in outs),
                "rewards/accuracies": sum(float((o.chosen_rewards > o.rejected_rewards).double().sum()) * w
                                          for o, w in outs)}
        return {prefix + k: v / pairs for k, v in sums.items()}

    def evaluate():
        policy.eval()
        with torch.no_grad():
            out = means([(through(policy, eval_rows[mb.row]), mb.weight) for mb in eval_plan(eval_rows.num_rows, 1)[0]],
                        "eval_")
        policy.train()
        return out

    steps, evals = {}, {0: evaluate()}
    for step, plan in planned_steps(train_rows.num_rows, 1, 2, cfg.train.seed, STEPS):
        outs = [(through(policy, train_rows[mb.row]), mb.weight) for mb in plan[0]]
        pairs = sum(o.losses.numel() * w for o, w in outs)
        opt.zero_grad()
        (sum(o.losses.sum() * w for o, w in outs) / pairs).backward()
        opt.step()
        steps[step] = means(outs)
        if step % TAU == 0:  # TRL's on_step_end, before the step's eval
            SyncRefModelCallback._sync_target_model(policy, reference, ALPHA)
        if step % cfg.train.eval_steps == 0 or step == STEPS:
            evals[step] = evaluate()
    return steps, evals


@pytest.mark.parametrize("pairs", ["data", "few"])
def test_offline_refresh_equals_trl_sync_with_a_live_reference(assets, request, pairs):
    """Fp32, one rank, 2 rows a step, α = 0.6, τ = 2: 3 refreshes in 7 steps. The steps'
    losses and rewards and every eval's equal the live-reference run's to 1e-5. With few
    pairs the epoch ends inside a segment (its last step topped up with a filler row), and
    the next epoch's rows, some trained on in the same segment already, are rescored."""
    data = request.getfixturevalue(pairs)
    cfg = config(assets, data, **SYNC)
    records = run(cfg)
    refreshes = by_step(records, "reference_refresh")
    assert sorted(refreshes) == [2, 4, 6] and [r["reference_refresh"] for r in refreshes.values()] == [1, 2, 3]
    want_steps, want_evals = live_run(cfg)
    got_steps, got_evals = by_step(records, "loss"), by_step(records, "eval_loss")
    assert sorted(got_steps) == sorted(want_steps) == list(range(1, STEPS + 1))
    assert sorted(got_evals) == sorted(want_evals) == [0, 2, 4, 6, 7]
    for step, want in want_steps.items():
        for key in COMPARED:
            assert got_steps[step][key] == pytest.approx(want[key], abs=1e-5), (step, key)
    for step, want in want_evals.items():
        for key in COMPARED:
            assert got_evals[step]["eval_" + key] == pytest.approx(want["eval_" + key], abs=1e-5), (step, key)
    if pairs == "few":  # the epoch ends at step 5, inside the segment of steps 5 and 6
        assert by_step(records, "loss")[5]["epoch"] == 1.0
    # status and the report show the segments
    state = next(r["state"] for r in runner.status(cfg) if r["stage"] == "train")
    assert state == "done (TR-DPO: 3 reference refreshes, the last at step 6, one every 2 steps)"
    report = (Path(cfg.run_dir) / "report" / "report.md").read_text()
    assert "- TR-DPO: the reference refreshed 3 times (steps 2, 4, 6)" in report and "![rewards](rewards.png)" in report
    assert (Path(cfg.run_dir) / "report" / "rewards.png").stat().st_size > 1000
    # the refreshes changed what was trained: the plain run (a fixed reference) differs
    plain_cfg = config(assets, data)
    plain = by_step(run(plain_cfg), "loss")
    assert max(abs(plain[s]["loss"] - got_steps[s]["loss"]) for s in range(3, STEPS + 1)) > 1e-3
    # the score stage scored every eval row and the train rows of steps 1 and 2 (2 rows each),
    # each as the plain run's score stage did; it left the other train rows to the refreshes
    ours, theirs = (runner.plan_stages(c)["score"].dir for c in (cfg, plain_cfg))
    for split, scored in (("train", 4), ("eval", None)):
        a, b = ([r for f in split_files(d, split) for r in pq.read_table(str(f)).to_pylist()] for d in (ours, theirs))
        assert len(a) == len(b) and all(x == y for x, y in zip(a, b) if x["ref_logps"] is not None)
        assert sum(x["ref_logps"] is not None for x in a) == (scored or len(b))
    assert read_manifest(ours)["stats"]["rows_scored"] == 4 + RowReader(split_files(theirs, "eval")).num_rows


@pytest.mark.parametrize("tau", [STEPS, STEPS + 100])
def test_no_refresh_before_the_last_step_is_the_plain_run_bit_for_bit(assets, data, tau):
    """τ at or past the last step: no row is rescored, so every step and the weights are
    the plain run's, bit for bit (τ = the steps refreshes once, after the last step: only
    the final eval, which reads the new reference, differs)."""
    plain_cfg = config(assets, data)
    plain = run(plain_cfg)
    cfg = config(assets, data, **{**SYNC, "ref_model_sync_steps": tau})
    records = run(cfg)
    assert numbers(records, "loss") == numbers(plain, "loss")
    assert list(by_step(records, "reference_refresh")) == ([STEPS] if tau == STEPS else [])
    a, b = weights(plain_cfg), weights(cfg)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_kill_during_the_second_refresh_resumes_bit_for_bit(assets, data):
    """The driver (one rank in-process) is killed with SIGKILL inside the second refresh,
    after the mix and one rescored row (tests/kill_in_refresh.py); the rerun resumes from
    the step-2 checkpoint, written at the first refresh, whose reference it loads, and
    every step, eval and weight equals the uninterrupted run's. Nothing is left but what
    the uninterrupted run leaves."""
    ckpt = {**SYNC, "save_steps": 2, "save_total_limit": 1}
    straight_cfg = config(assets, data, "straight", **ckpt)
    straight = run(straight_cfg)

    cfg = config(assets, data, "killed", **ckpt)
    path = write_config(cfg, data / "killed.yaml")
    killed = subprocess.run([sys.executable, str(HERE / "kill_in_refresh.py"), "run", str(path), "--no-ray"],
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    out = train_dir(cfg)
    at_kill = train_metrics(cfg)
    assert max(r["step"] for r in at_kill) == 4  # killed after step 4 ...
    assert [r["reference_refresh"] for r in at_kill if "reference_refresh" in r] == [1]  # ... in its refresh
    assert not (out / "_MANIFEST.json").exists()

    resumed = subprocess.run([sys.executable, "-m", "pipeline", "run", str(path), "--no-ray"],
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "at step 2" in resumed.stdout
    records = train_metrics(cfg)
    for key in ("loss", "eval_loss"):
        assert numbers(records, key) == numbers(straight, key)
    assert [r["reference_refresh"] for r in records if "reference_refresh" in r] == [1, 2, 3]
    a, b = weights(straight_cfg), weights(cfg)
    assert all(torch.equal(a[k], b[k]) for k in a)
    left = lambda d: sorted(str(f.relative_to(d)) for f in d.rglob("*") if f.is_file() and "workers" not in f.parts)  # noqa: E731
    assert left(out) == left(train_dir(straight_cfg))


def test_two_ranks_on_ray_in_a_bucket_and_a_resume_on_one(assets, data, tmp_path, ray_cluster, s3_bucket):
    """TR-DPO on 2 ZeRO-3 ranks on Ray, buckets and optimizer sub-groups far smaller
    than the weights, on an S3 run directory (then 1 rank x 2 accumulation): each rank mixes
    and rescores its half, and the steps equal one rank's with twice the accumulation
    (the same rows a step). Then the run, lost after step 3's checkpoint, resumes on 1
    rank: the rank reassembles its reference from the 2 ranks' saved partitions (fetched
    from the bucket), and steps 4-7, with 2 refreshes, equal the uninterrupted run's."""
    from pipeline.core.storage import Loc

    def on_ray(workers, accum):
        return tiny_config(assets, f"{s3_bucket}/tr-dpo-{tmp_path.name}", data_file=data / "pairs.jsonl",
                           tokenize={"max_tokens_per_row": 256}, data={"eval_fraction": 0.2},
                           train={**TRAIN, **SYNC, "num_workers": workers, "gradient_accumulation_steps": accum,
                                  "save_steps": 3, "save_total_limit": None, "deepspeed": {"zero_optimization": SMALL}})

    two = on_ray(2, 1)
    runner.run_pipeline(two, log=lambda _: None)
    straight = train_metrics(two)
    one_rank = run(config(assets, data, **SYNC))  # in one process, 1 rank x 2
    assert sorted(by_step(straight, "reference_refresh")) == [2, 4, 6]
    for key in ("loss", "eval_loss"):
        got, want = by_step(straight, key), by_step(one_rank, key)
        assert sorted(got) == sorted(want)
        for step in want:
            assert got[step][key] == pytest.approx(want[step][key], abs=1e-5), (key, step)
    out = Loc(runner.plan_stages(two)["train"].dir)
    assert [p.name for p in (out / "checkpoints" / "step-00000003" / "reference").files()] == \
        ["zero_pp_rank_0_reference.pt", "zero_pp_rank_1_reference.pt"]

    # lost after step 3's checkpoint: the later ones half written
    (out / "_MANIFEST.json").unlink()
    (out / "model").rmtree()
    for step in (6, 7):
        (out / "checkpoints" / f"step-{step:08d}" / "COMPLETE.json").unlink()
    (out / "checkpoints" / "latest_complete").write_text("step-00000003")
    runner.run_pipeline(on_ray(1, 2), stages=["train"], log=lambda _: None)
    resumed = train_metrics(two)
    assert [r["reference_refresh"] for r in resumed if "reference_refresh" in r] == [1, 2, 3]
    for key in ("loss", "eval_loss"):
        got, want = by_step(resumed, key), by_step(straight, key)
        assert sorted(got) == sorted(want)
        for step in want:
            assert got[step][key] == pytest.approx(want[step][key], abs=1e-5), (key, step)
