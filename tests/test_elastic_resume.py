"""Resuming on another number of workers (DeepSpeed's universal checkpoint): 2 ranks for 10
steps, then 1 rank with twice the gradient accumulation, so the global batch is kept."""

import dataclasses
import json
from collections import Counter
from pathlib import Path

import pytest

from helpers import tiny_config, train_metrics
from pipeline import runner
from pipeline.core.config import ConfigError
from pipeline.training.checkpoints import UNIVERSAL, layout_mismatch
from pipeline.training.plan import planned_steps


def rows_of(step_plan) -> Counter:
    return Counter(mb.row for rank_plan in step_plan for mb in rank_plan if mb.weight > 0)


def test_the_same_global_batch_gives_every_step_the_same_rows():
    rows, seed, total = 37, 5, 30  # 37 rows, 2 rows a step: 19 steps an epoch, the last one short
    straight = dict(planned_steps(rows, 2, 1, seed, total))
    first = dict((s, p) for s, p in planned_steps(rows, 2, 1, seed, total) if s <= 10)
    then = dict(planned_steps(rows, 1, 2, seed, total, done=10))
    assert sorted(first) == list(range(1, 11)) and sorted(then) == list(range(11, 31))
    resumed = {**first, **then}
    for step in range(1, total + 1):
        assert rows_of(resumed[step]) == rows_of(straight[step]), step
    epoch = Counter()
    for step in range(1, 20):
        epoch += rows_of(resumed[step])
    assert epoch == Counter(range(rows))  # each pair once in the epoch, across the change


def test_which_checkpoints_resume_on_another_worker_count():
    cfg = tiny_config({"model": "m", "data": "d.jsonl"}, "run", train={"gradient_accumulation_steps": 2,
                                                                        "num_workers": 1})
    info = {"world_size": 2, "gradient_accumulation_steps": 1, "zero_stage": 3, "zero_sub_groups": 1,
            "optimizer": "adamw"}
    assert layout_mismatch(info, 1, 1, cfg.train) == UNIVERSAL
    assert layout_mismatch(dict(info, world_size=1, gradient_accumulation_steps=2), 1, 1, cfg.train) is None
    why = layout_mismatch(dict(info, world_size=3), 1, 1, cfg.train)
    assert why.startswith("its global batch is 3 rows a step (3 workers x 1 accumulation steps) and this run's 2 "
                          "(1 x 2): the steps would train other rows. Keep the global batch (1 workers x 3, "
                          "3 workers x 1)")
    assert "restores Adam's moments only, so an RMSprop run can only resume on 2 workers" in \
        layout_mismatch(dict(info, optimizer="rmsprop"), 1, 1, cfg.train)
    assert "does not record its gradient accumulation" in \
        layout_mismatch({k: v for k, v in info.items() if k != "gradient_accumulation_steps"}, 1, 1, cfg.train)
    assert "ZeRO-3 only (this checkpoint is ZeRO-2)" in layout_mismatch(dict(info, zero_stage=2), 1, 1, cfg.train)


def test_the_conversion_processes():
    from pipeline.training.universal_convert import conversion_workers

    gb = 1 << 30
    assert conversion_workers(64, 8, 96, 96 * gb) == 4  # DeepSpeed's CLI default caps it
    assert conversion_workers(2, 1, 16, 2 * gb) == 2  # one a partition
    assert conversion_workers(8, 0.25, 16, 2 * gb) == 2  # the CPUs the ranks had
    assert conversion_workers(64, 8, 3, 96 * gb) == 3  # the CPUs of one node
    assert conversion_workers(64, 8, 96, 200 << 20) == 1  # spawning costs more than it saves


def write_checkpoint(root, world, accum=1, universal=None):
    """A checkpoint folder as the ranks leave it: each rank's files, COMPLETE.json last."""
    from pipeline.core.storage import Loc

    path = Loc(root) / "checkpoints" / "step-00000010"
    for rank in range(world):
        (path / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"x" * 10)
    (path / "COMPLETE.json").write_text(json.dumps({"step": 10, "world_size": world, "zero_stage": 3,
                                                    "gradient_accumulation_steps": accum, "optimizer": "adamw"}))
    if universal is not None:
        (path / "universal" / "zero" / "w" / "fp32.pt").write_bytes(universal)
        (path / "universal" / "COMPLETE.json").write_text(json.dumps({"from_world_size": world,
                                                                      "tag": universal.decode()}))
    return path


def test_the_driver_refuses_before_any_rank_starts_and_finds_what_to_convert(tmp_path):
    from pipeline.training.universal_convert import checkpoint_to_convert

    cfg = tiny_config({"model": "m", "data": "d.jsonl"}, "run", train={"gradient_accumulation_steps": 2,
                                                                        "num_workers": 1})
    path = write_checkpoint(tmp_path / "a", world=2)
    assert checkpoint_to_convert(cfg.train, tmp_path / "a", "train", 1) == path
    assert checkpoint_to_convert(cfg.train, tmp_path / "a", "train", 2) is None  # the same worker count
    assert checkpoint_to_convert(cfg.train, tmp_path / "none", "train", 1) is None  # a fresh start
    write_checkpoint(tmp_path / "b", world=3)
    with pytest.raises(RuntimeError, match=r"step-00000010: its global batch is 3 rows a step \(3 workers x 1"):
        checkpoint_to_convert(cfg.train, tmp_path / "b", "train", 1)


def test_a_conversion_the_disk_cannot_hold_is_refused_before_it_starts(tmp_path):
    import shutil

    from pipeline.training.universal_convert import check_disk

    free = shutil.disk_usage(tmp_path).free
    check_disk(tmp_path / "scratch", free // 2, "train.local_dir")
    with pytest.raises(RuntimeError, match=r"converting a checkpoint to a universal one needs .* GB in .*scratch "
                                           r"\(.*\) and .* GB are free: free space, or set train.local_dir to a "
                                           r"larger disk"):
        check_disk(tmp_path / "scratch", free * 2, "train.local_dir")


def test_a_resume_path_is_the_same_checkpoint_for_the_driver_and_the_ranks(tmp_path, monkeypatch):
    """The ranks run in another working directory (Ray's, or another node's): a relative path is made
    absolute for them, a tag or a URI is left as it is."""
    from pipeline.core.config import for_workers

    monkeypatch.chdir(tmp_path)
    cfg = tiny_config({"model": "m", "data": "d.jsonl"}, "run",
                      train={"resume_from_checkpoint": "old/checkpoints/step-00000010"},
                      sft={"resume_from_checkpoint": "s3://b/run/sft/x/checkpoints/step-00000004"})
    workers = for_workers(cfg)
    assert workers["train"]["resume_from_checkpoint"] == str(tmp_path / "old/checkpoints/step-00000010")
    assert workers["sft"]["resume_from_checkpoint"] == "s3://b/run/sft/x/checkpoints/step-00000004"
    cfg = tiny_config({"model": "m", "data": "d.jsonl"}, "run", train={"resume_from_checkpoint": "step-00000010"})
    assert for_workers(cfg)["train"]["resume_from_checkpoint"] == "step-00000010"


def test_a_rank_never_converts(tmp_path):
    """Without the driver's conversion a rank refuses; it never converts and makes the
    others wait in a collective."""
    from pipeline.training.universal import resume_universal

    path = write_checkpoint(tmp_path, world=2)
    with pytest.raises(RuntimeError, match=r"written by 2 workers, and its universal checkpoint is missing; the "
                                           r"driver converts it before the ranks start"):
        resume_universal(None, None, None, path, {"world_size": 2})


def test_a_node_downloads_the_universal_checkpoint_once_for_its_ranks(s3_bucket, tmp_path):
    """Two ranks of a node fetch the bucket's universal checkpoint side by side: one
    downloads it under the file lock, the other finds it. A copy of another conversion is
    replaced; once every rank has loaded it the copy is removed."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.core.storage import Loc
    from pipeline.training.universal import drop_node_copy, fetch_node_copy

    path = write_checkpoint(Loc(f"{s3_bucket}/node-copy-{tmp_path.name}"), world=2, universal=b"first")
    node = tmp_path / "node" / "step-00000010"
    with ThreadPoolExecutor(2) as pool:
        fetched = list(pool.map(lambda _: fetch_node_copy(path, node), range(2)))
    assert sorted(fetched) == [False, True]
    assert (node / "universal" / "zero" / "w" / "fp32.pt").read_bytes() == b"first"
    assert not fetch_node_copy(path, node)
    write_checkpoint(path.parent.parent, world=2, universal=b"again")  # converted anew
    assert fetch_node_copy(path, node)
    assert (node / "universal" / "zero" / "w" / "fp32.pt").read_bytes() == b"again"
    assert sorted(p.name for p in node.parent.iterdir()) == ["step-00000010", "step-00000010.lock"]
    drop_node_copy(node)
    assert not node.exists()


class Payload:
    """Unpickled, writes ``marker``: code an attacker's checkpoint file would run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('owned')",)


def universal_tensors(root) -> dict:
    """Every tensor of a universal checkpoint's ``zero/`` folder, by file."""
    import torch

    out = {}
    for f in sorted(Path(root).rglob("*.pt")):
        state = torch.load(f, weights_only=False)
        out[str(f.relative_to(root))] = state["param"] if isinstance(state, dict) and "param" in state else state
    return out


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_resume_on_one_worker_from_two_in_a_bucket(assets, tmp_path, ray_cluster, s3_bucket, monkeypatch):
    """2 ranks x accumulation 1 on an S3 run directory for 20 steps; the run then lost after
    step 10's checkpoint (step 20's half written), and resumed on Ray as 1 rank x 2: steps
    11-20 equal the uninterrupted run's. The driver converts the checkpoint in a Ray task
    (2 spawned extract processes, as for a checkpoint of over a GB) before the rank starts; the rank loads a copy its node
    downloaded once and removes it; a rerun reuses the conversion."""
    import torch

    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from pipeline.core.storage import Loc, scratch_root
    from pipeline.training.resume import resume
    from stages.train.driver import worker_spec
    from pipeline.training.engine import build_engine
    from pipeline.training.loop import setup
    from pipeline.training.metrics import MetricsLog
    from pipeline.training.safe_load import UnsafeCheckpointError
    from pipeline.training import universal_convert
    from pipeline.training.universal import conversion
    from pipeline.training.universal_convert import convert, prepare_resume

    monkeypatch.setattr(universal_convert, "PARALLEL_FROM_BYTES", 0)  # this checkpoint's 2 MB converted as a GB's

    train = {"max_steps": 20, "save_steps": 10, "save_total_limit": None, "eval_steps": 1000,
             "weight_decay": 0.1}
    run = f"{s3_bucket}/elastic-{tmp_path.name}"

    def config(workers, accum):
        return tiny_config(assets, run, tokenize={"max_tokens_per_row": 256},
                           train=dict(train, num_workers=workers, gradient_accumulation_steps=accum))

    two, one = config(2, 1), config(1, 2)
    plans = runner.plan_stages(two)
    assert runner.plan_stages(one)["train"].fingerprint == plans["train"].fingerprint  # the same run
    runner.run_pipeline(two, log=lambda _: None)
    straight = {r["step"]: r for r in train_metrics(two) if "loss" in r}
    assert sorted(straight) == list(range(1, 21))

    # The run as a spot cluster leaves it after step 10's checkpoint: step 20's half written
    out = Loc(plans["train"].dir)
    (out / "_MANIFEST.json").unlink()
    (out / "model").rmtree()
    (out / "checkpoints" / "step-00000020" / "COMPLETE.json").unlink()
    (out / "checkpoints" / "latest_complete").write_text("step-00000010")
    step10 = out / "checkpoints" / "step-00000010"

    # A worker count that cannot keep the global batch (2 rows a step): refused, with the way out
    with pytest.raises(ConfigError, match=r"holds checkpoints of this run at a global batch of 2 rows a step, and "
                                          r"this one's is 3 .*keep the global batch \(1 x 2, 2 x 1\)"):
        runner.run_pipeline(config(3, 1), stages=["train"], use_ray=False, log=lambda _: None)

    results = runner.run_pipeline(one, stages=["train"], log=lambda _: None)  # on Ray: 1 rank
    assert results["train"]["ran"]
    resumed = {r["step"]: r for r in train_metrics(one) if "loss" in r}
    assert sorted(resumed) == list(range(1, 21))  # steps 1-10 kept, 11-20 trained on one rank
    for step in range(11, 21):
        assert resumed[step]["loss"] == pytest.approx(straight[step]["loss"], abs=1e-5), step
        assert resumed[step]["rows"] == straight[step]["rows"]  # the same rows each step

    # Converted once, by a Ray task with 2 spawned extract processes, not by the rank
    marker = conversion(step10)
    assert marker["from_world_size"] == 2 and marker["workers"] == 2
    ranks = json.loads((out / "workers.json").read_text())["attempts"][-1]
    assert marker["converted_by"]["pid"] not in {w["pid"] for w in ranks}
    assert marker["finished_at"] < min(w["started_at"] for w in ranks)  # done before any rank began
    assert marker["converted_by"]["node_id"] is not None  # in a Ray worker
    # nothing left in scratch: the converter's copy, and the node's copy the rank loaded
    scratch = scratch_root(None, out)
    assert not (scratch / "convert" / "step-00000010").exists()
    assert not (scratch / "checkpoints" / "step-00000010").exists()

    # A rerun (or a retry of the stage) reuses the finished conversion, and redoes a partial one
    again = dataclasses.replace(one.train, resume_from_checkpoint="step-00000010")  # step 20 is newer now
    assert prepare_resume(again, out, "train", 1, on_ray=True) == marker
    parallel = tmp_path / "parallel"
    (step10 / "universal").download(parallel)
    (step10 / "universal" / "COMPLETE.json").unlink()
    redone = prepare_resume(again, out, "train", 1, on_ray=False)
    print(f"converted in {marker['seconds']} s by 2 spawned processes, in {redone['seconds']} s by one")
    assert redone["workers"] == 1 and redone["finished_at"] > marker["finished_at"]
    serial = tmp_path / "serial"
    (step10 / "universal").download(serial)
    a, b = universal_tensors(parallel), universal_tensors(serial)
    assert sorted(a) == sorted(b) and len(a) > 10
    for name in a:  # 2 spawned processes convert to the same tensors as one
        if torch.is_tensor(a[name]):
            assert torch.equal(a[name], b[name]), name

    # The state right after the load, bit for bit the two ranks' consolidated values
    spec = worker_spec(one, plans["score"].dir, out, {"tokenized_dir": str(plans["tokenize"].dir),
                                                      "fingerprints": {}})
    spec.cfg_dict["train"]["resume_from_checkpoint"] = "step-00000010"
    ctx = setup(spec)
    engine = build_engine(ctx.train_cfg, ctx.cfg.model, ctx.world, ctx.total_steps, ctx.objective, ctx.device)
    assert resume(engine, ctx, MetricsLog(ctx)) == 10
    assert not (scratch / "checkpoints" / "step-00000010").exists()  # the node's copy, loaded and removed
    checked = 0
    for name, param in engine.module.named_parameters():
        for key, got in (("fp32", safe_get_full_fp32_param(param)),
                         ("exp_avg", safe_get_full_optimizer_state(param, "exp_avg")),
                         ("exp_avg_sq", safe_get_full_optimizer_state(param, "exp_avg_sq"))):
            assert torch.equal(got.view(-1), b[f"zero/{name}/{key}.pt"].view(-1)), (name, key)
            checked += 1
    assert checked == 3 * len(list(engine.module.parameters()))
    # independently: the parameters zero_to_fp32 consolidates from the two ranks' partitions
    local = tmp_path / "checkpoints"
    for f in step10.files():
        if not f.relative_to(step10).startswith("universal/"):
            f.download(local / "step-00000010" / f.relative_to(step10))
    consolidated = get_fp32_state_dict_from_zero_checkpoint(str(local), tag="step-00000010")
    for name, param in engine.module.named_parameters():
        assert torch.equal(safe_get_full_fp32_param(param), consolidated[name]), name
    # each param group keeps its own settings (DeepSpeed copies group 0's onto all)
    decay, no_decay = engine.optimizer.optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    # each sub-group's own Adam step count (DeepSpeed shares one tensor, incremented once per sub-group)
    steps = [engine.optimizer.optimizer.state[flat]["step"] for flat in engine.optimizer.fp32_partitioned_groups_flat]
    assert len(steps) >= 2 and all(int(s) == 10 for s in steps)
    assert len({id(s) for s in steps}) == len(steps)

    # And back on 2 ranks from step 20's checkpoint (written by the one rank): its two ranks
    # share one node's copy; the final eval is the 1-rank run's, the weights being the same
    final = [r for r in train_metrics(one) if "eval_loss" in r][-1]
    (out / "_MANIFEST.json").unlink()
    (out / "model").rmtree()
    assert runner.run_pipeline(two, stages=["train"], log=lambda _: None)["train"]["ran"]
    assert json.loads((out / "checkpoints" / "step-00000020" / "universal" / "COMPLETE.json").read_text())[
        "from_world_size"] == 1
    again = [r for r in train_metrics(two) if "eval_loss" in r][-1]
    assert again["eval_loss"] == pytest.approx(final["eval_loss"], abs=1e-6)
    assert not (scratch / "checkpoints" / "step-00000020").exists()  # removed once both ranks loaded it

    # A spawned extract process reads with weights_only like the rest: rank 1's partition
    # (read by an extract process only) replaced by a pickled callable is refused, naming it
    poisoned = next((local / "step-00000010").glob("*zero_pp_rank_1_*optim_states.pt"))
    torch.save({"optimizer_state_dict": Payload(tmp_path / "owned")}, poisoned)
    with pytest.raises(UnsafeCheckpointError, match=f"refused to load checkpoint file {poisoned}"):
        convert(Loc(local / "step-00000010"), tmp_path / "unused", workers=2)
    assert not (tmp_path / "owned").exists() and not (local / "step-00000010" / "universal" / "COMPLETE.json").exists()
