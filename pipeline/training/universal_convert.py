"""Making the universal checkpoint a resume on another worker count loads: on the driver's
side, before the rank group exists, so that no rank waits in a collective while a
checkpoint is converted (a process group times out after 30 minutes, and at 8B on 64
ranks a conversion can take longer). ``prepare_resume`` converts the checkpoint the ranks
will resume from, in a Ray task (in this process without Ray), its marker
``universal/COMPLETE.json`` written last; a finished conversion is reused by every later
attempt and rerun. Loading it is ``universal.py``'s, on each rank.

Disk and time at scale: docs/reliability.md, "Resuming on another worker count at scale"."""

from __future__ import annotations

import inspect
import json
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

from pipeline.core import placement
from pipeline.core.storage import Loc, scratch_root

from .checkpoints import COMPLETE, UNIVERSAL, checkpoint_to_resume, elastic_mismatch
from .metrics import say
from .universal import conversion


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

        from cluster.workers import release

        release()  # the run's warm actors hold CPUs this task asks for
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
    # DeepSpeed's files lie at the top (under it: the universal output, TR-DPO's reference partitions)
    parts = [rel for rel in (f.relative_to(path) for f in path.files()) if "/" not in rel]
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
