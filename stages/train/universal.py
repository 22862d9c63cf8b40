"""Resuming on another number of workers: a checkpoint converted once into DeepSpeed's
universal checkpoint (every parameter and its Adam moments whole, in fp32), from which
each rank of any worker count loads its own partition. Kept apart from ``checkpoints.py``
(the same-layout save and resume), which hands a checkpoint here when its worker count
differs and the global batch is kept (``checkpoints.layout_mismatch``).

Two sides, so that no rank waits in a collective while a checkpoint is converted (a
process group times out after 30 minutes, and at 8B on 64 ranks a conversion can take
longer):

* the driver, before the rank group exists (``prepare_resume``): converts the checkpoint
  in a Ray task (in this process without Ray), its marker ``universal/COMPLETE.json``
  written last; a finished conversion is reused by every later attempt and rerun;
* each rank (``resume_universal``): loads the converted checkpoint and never converts.
  With a bucket run directory one process per node downloads it into a folder the node's
  ranks share, under a file lock, and it is removed once every rank has loaded it.

Disk and time at scale: docs/reliability.md, "Resuming on another worker count"."""

from __future__ import annotations

import inspect
import json
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

from pipeline import placement
from pipeline.storage import Loc, scratch_root

from .checkpoints import CHECKPOINT_DIR, COMPLETE, UNIVERSAL, checkpoint_to_resume, elastic_mismatch, resumed
from .metrics import say


# ----------------------------------------------------------------------------- the driver's side


def checkpoint_to_convert(train_cfg, out: Loc, stage: str, world: int) -> Loc | None:
    """The checkpoint the ranks will resume from when it was written by another number of
    workers (and can be resumed on ``world``), else None. Refuses, before any rank starts,
    a checkpoint that cannot (another global batch, ZeRO-1/2, RMSprop)."""
    path = checkpoint_to_resume(train_cfg, out, stage)
    if path is None:
        return None
    info = json.loads((path / COMPLETE).read_text())
    if info["world_size"] == world:
        return None
    why = elastic_mismatch(info, world, train_cfg)
    if why:
        raise RuntimeError(f"checkpoint {path}: {why}")
    return path


def conversion(path: Loc) -> dict | None:
    """The marker of ``path``'s finished universal conversion, or None."""
    marker = path / UNIVERSAL / COMPLETE
    return json.loads(marker.read_text()) if marker.is_file() else None


def prepare_resume(train_cfg, out: Loc, stage: str, world: int, on_ray: bool) -> dict | None:
    """Before a training stage's ranks start: the checkpoint they will resume from, when
    written by another worker count, converted to a universal checkpoint, once. On Ray the
    conversion is a task with a CPU for each of its processes (``conversion_workers``), so
    the ranks are not yet in a process group while it runs. Returns the conversion's marker."""
    path = checkpoint_to_convert(train_cfg, out, stage, world)
    if path is None:
        return None
    done = conversion(path)
    if done is not None:
        say(f"[{stage}] {path.name}: written by {done['from_world_size']} workers; its universal checkpoint "
            f"(converted in {done['seconds']:.1f} s) is reused")
        return done
    info = json.loads((path / COMPLETE).read_text())
    if on_ray:
        import ray

        workers = conversion_workers(info["world_size"], train_cfg.cpus_per_worker, largest_node_cpus(),
                                     optimizer_state_bytes(path))
        # max_calls=1: the worker process exits after it, with the conversion's memory
        task = ray.remote(max_calls=1)(_convert_task).options(num_cpus=workers, name=f"{stage}: universal checkpoint")
        done = ray.get(task.remote(str(path), train_cfg.local_dir, str(out), workers, stage))
    else:
        done = convert(path, scratch_root(train_cfg.local_dir, Loc(out)) / "convert", 1, stage)
    say(f"[{stage}] {path.name}: written by {done['from_world_size']} workers, converted to a universal checkpoint "
        f"for {world} in {done['seconds']:.1f} s ({done['workers']} extract processes)")
    return done


# DeepSpeed's own ds_to_universal CLI defaults: an extract process holds one rank's optimizer
# partition (12 bytes x parameters / ranks), a merge process one parameter's fragments.
MAX_EXTRACT_WORKERS, MAX_MERGE_WORKERS = 4, 2
# A spawned process imports DeepSpeed first (about 5 s, for each of the two pools): below a
# GB of optimizer state one process converts sooner (measured: 0.3-3.5 s against 10-12 s
# with 2 processes for the 140k-parameter test model).
PARALLEL_FROM_BYTES = 1 << 30


def conversion_workers(from_world: int, cpus_per_worker: float, node_cpus: float, state_bytes: int) -> int:
    """The conversion's extract processes: one per partition of the checkpoint, as many as
    the CPUs its ranks had (idle now: the new rank group starts after it) and one node has,
    at most ``MAX_EXTRACT_WORKERS``; one below ``PARALLEL_FROM_BYTES`` of optimizer state."""
    if state_bytes < PARALLEL_FROM_BYTES:
        return 1
    return max(1, min(from_world, int(from_world * cpus_per_worker), int(node_cpus), MAX_EXTRACT_WORKERS))


def largest_node_cpus() -> float:
    import ray

    return max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]), default=1)


def _convert_task(path: str, local_dir: str | None, out: str, workers: int, stage: str) -> dict:
    # the scratch folder is found on the node that converts (its temp directory, or local_dir)
    return convert(Loc(path), scratch_root(local_dir, Loc(out)) / "convert", workers, stage)


def optimizer_state_bytes(path: Loc) -> int:
    """The checkpoint's optimizer partitions: 12 bytes a parameter (fp32 weights, Adam's moments)."""
    return sum(f.info().size for f in path.files() if f.name.endswith("optim_states.pt"))


def convert(path: Loc, scratch: Path, workers: int, stage: str = "train") -> dict:
    """``<path>/universal``, DeepSpeed's universal checkpoint of ``path``, by
    ``ds_to_universal`` in ``workers`` processes (at most one per rank's partition). A
    checkpoint in a bucket is converted in ``scratch`` on this node (its partitions, the
    converter's temporary fragments and the output: 3 x the optimizer state at the peak),
    the output uploaded, and the scratch folder removed, whether the conversion succeeds or
    fails. The marker goes last: a conversion cut short is redone."""
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    from .safe_load import weights_only_loads

    start = time.time()
    parts = [f.relative_to(path) for f in path.files() if not f.relative_to(path).startswith(UNIVERSAL + "/")]
    world = json.loads((path / COMPLETE).read_text())["world_size"]
    ranks = {p.split("zero_pp_rank_")[1].split("_")[0] for p in parts if "zero_pp_rank_" in p}
    if ranks != {str(r) for r in range(world)}:
        raise RuntimeError(f"checkpoint {path}: written by {world} workers, but it holds the parts of ranks "
                           f"{sorted(ranks, key=int)}: it cannot be converted")
    local = Path(path.local) if not path.remote else scratch / path.name
    shutil.rmtree(local if path.remote else local / UNIVERSAL, ignore_errors=True)  # a conversion cut short
    # a bucket: partitions + fragments + output here; a filesystem: fragments + output beside them
    check_disk(local.parent, (3 if path.remote else 2) * optimizer_state_bytes(path),
               f"{stage}.local_dir" if path.remote else f"the filesystem of {path}")
    workers = min(workers, world)
    args = argparse.Namespace(input_folder=str(local), output_folder=str(local / UNIVERSAL),
                              num_extract_workers=workers, num_merge_workers=min(workers, MAX_MERGE_WORKERS),
                              keep_temp_folder=False, strict=True, inject_missing_state=False)
    try:
        if path.remote:  # every rank's part is needed to rebuild whole parameters
            for rel in parts:
                (path / rel).download(local / rel)
        with weights_only_loads(), spawned_workers(ds_to_universal) as parallel:
            if not parallel:
                args.num_extract_workers = args.num_merge_workers = workers = 1
            ds_to_universal.main(args)
        if path.remote:
            (path / UNIVERSAL).upload(local / UNIVERSAL)
    except BaseException:  # nothing of a failed conversion stays on disk
        shutil.rmtree(local if path.remote else local / UNIVERSAL, ignore_errors=True)
        raise
    if path.remote:
        shutil.rmtree(local, ignore_errors=True)
    marker = {"from_world_size": world, "workers": workers, "seconds": round(time.time() - start, 3),
              "converted_by": placement.here(), "finished_at": time.time()}
    (path / UNIVERSAL / COMPLETE).write_text(json.dumps(marker))  # last: a copy cut short is not taken for one
    return marker


def check_disk(folder: Path, need: int, setting: str) -> None:
    """Refuse, before it starts, a conversion the disk cannot hold."""
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < need:
        raise RuntimeError(f"converting a checkpoint to a universal one needs {need / 1e9:.1f} GB in {folder} "
                           f"({placement.here()['hostname']}) and {free / 1e9:.1f} GB are free: free space, or set "
                           f"{setting} to a larger disk")


@contextmanager
def spawned_workers(ds_to_universal):
    """``ds_to_universal`` forks its worker pool (``ProcessPoolExecutor`` with the platform's
    start method), and forking a process that runs threads (a Ray worker's) can deadlock in
    the child. Within the block its pools start their processes by spawning them, each of
    which reads checkpoint files with ``safe_load`` like this one (``install_safe_loads``).
    Yields False where DeepSpeed's pool helper is not the one this was written for (a
    conversion then runs in one process)."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from .safe_load import install_safe_loads

    serial = getattr(ds_to_universal, "_do_parallel_work", None)
    if serial is None or list(inspect.signature(serial).parameters) != ["do_work", "work_chunks", "num_workers"]:
        yield False
        return

    def parallel(do_work, work_chunks, num_workers):
        if num_workers <= 1:
            return serial(do_work, work_chunks, num_workers)
        with ProcessPoolExecutor(num_workers, mp_context=get_context("spawn"), initializer=install_safe_loads) as pool:
            return list(pool.map(do_work, work_chunks))

    ds_to_universal._do_parallel_work = parallel
    try:
        yield True
    finally:
        ds_to_universal._do_parallel_work = serial


# ----------------------------------------------------------------------------- each rank's side


def fetch_node_copy(path: Loc, node_dir: Path) -> bool:
    """The universal checkpoint of ``path`` (in a bucket) in ``node_dir/universal``, one
    copy a node: the first rank there downloads it under a file lock, the others wait on
    the lock (not in a collective) and find it. A copy of another conversion is replaced.
    Returns whether this process downloaded it."""
    from filelock import FileLock

    want = conversion(path)
    node_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(node_dir) + ".lock"):
        have = node_dir / UNIVERSAL / COMPLETE
        if have.is_file() and json.loads(have.read_text()) == want:
            return False
        shutil.rmtree(node_dir, ignore_errors=True)
        tmp = node_dir.with_name(f"{node_dir.name}.tmp")  # under the lock: one writer
        shutil.rmtree(tmp, ignore_errors=True)
        (path / UNIVERSAL).download(tmp / UNIVERSAL)
        tmp.rename(node_dir)
        return True


def drop_node_copy(node_dir: Path) -> None:
    """Remove this node's copy (about 12 bytes a parameter) once every rank has loaded it."""
    from filelock import FileLock

    with FileLock(str(node_dir) + ".lock"):
        (node_dir / UNIVERSAL / COMPLETE).unlink(missing_ok=True)  # first: a removal cut short is no copy
        shutil.rmtree(node_dir, ignore_errors=True)


def repair_universal_load(engine, universal: str) -> None:
    """Two things DeepSpeed 0.19's ZeRO-3 universal load gets wrong, put right:

    * it copies param group 0's settings onto every group, so the no-decay group (biases,
      norms) would get weight decay: each group gets its own back, from the checkpoint's
      optimizer state;
    * it gives every sub-group of the optimizer state the same ``step`` tensor, which torch's
      Adam increments in place once per sub-group: the step count would run ahead, and the
      bias correction with it, after the first step. Each sub-group gets its own copy."""
    import torch
    from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT

    from .safe_load import safe_load

    saved = safe_load(f"{universal}/{UNIVERSAL}/zero/optimizer_state.pt")[OPTIMIZER_STATE_DICT]["param_groups"]
    groups = engine.optimizer.optimizer.param_groups
    if len(saved) != len(groups):
        raise RuntimeError(f"universal checkpoint {universal}: {len(saved)} optimizer param groups, this run has "
                           f"{len(groups)}")
    for group, own in zip(groups, saved):
        for key, value in own.items():
            if key != "params":
                group[key] = value
    for flat in engine.optimizer.fp32_partitioned_groups_flat:
        state = engine.optimizer.optimizer.state[flat]
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def resume_universal(engine, ctx, log, path: Loc, info: dict) -> int:
    """Resume on another worker count that keeps the global batch: the step plans then
    give every step the same rows (``pipeline.packing.epoch_plan`` cuts one seeded order
    into steps of workers x accumulation rows), so no pair trains twice or not at all.
    The driver converted the checkpoint before the ranks started (``prepare_resume``)."""
    import torch.distributed as dist

    from .safe_load import weights_only_loads

    if conversion(path) is None:
        raise RuntimeError(f"checkpoint {path}: written by {info['world_size']} workers, and its universal checkpoint "
                           f"is missing; the driver converts it before the ranks start (prepare_resume in "
                           f"stages/train/universal.py): rerun the stage")
    node_dir = scratch_root(ctx.train_cfg.local_dir, ctx.out) / CHECKPOINT_DIR / path.name
    if path.remote:
        fetch_node_copy(path, node_dir)
    load_root = str(node_dir if path.remote else path.local)
    engine._config.load_universal_checkpoint = True  # read by load_checkpoint; no other use
    try:
        with weights_only_loads():
            load_path, client = engine.load_checkpoint(load_root, tag=UNIVERSAL, load_optimizer_states=True,
                                                       load_lr_scheduler_states=True)
    finally:
        engine._config.load_universal_checkpoint = False
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the universal checkpoint of {path}")
    repair_universal_load(engine, load_root)
    if path.remote:
        if dist.is_initialized():
            dist.barrier()  # every rank has loaded: the node's copy can go (each rank tries; the first removes it)
        drop_node_copy(node_dir)
    return resumed(ctx, log, path, client, f" (written by {info['world_size']} workers, resumed on {ctx.world} "
                                            f"through its universal checkpoint)")
