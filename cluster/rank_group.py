"""A training stage's ranks on Ray: ``num_workers`` actors in one PACK placement group (on
CPUs: the run's warm actors of the ranks' shape, when there are as many), each given
the process group's environment as torchrun gives it (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, NODE_RANK, MASTER_ADDR, MASTER_PORT; on GPUs the node's
CUDA_VISIBLE_DEVICES), running one function; after a failure (a rank raised, or its process
or node died) all of them are stopped and started again, ``max_failures`` times (-1: without
limit), and the function resumes from what it saved.

Why not Ray Train's ``TorchTrainer`` (the pipeline's launcher until issue #37): the job is
the same, and Ray Train starts a controller, an autoscaling coordinator, a synchronisation
actor and a placement-group cleaner one after another before the ranks: on the 2-core
machine the train function began 10.5 to 12.4 s after ``fit()``, while this group's ranks
begin it 1.6 s after the call (bench/RESULTS.md). What it gave beyond this module: its
dashboard page and the registry of reported checkpoints (the pipeline's own checkpoints
folder and ``workers.json`` say the same), its preemption watcher and NCCL hang detector.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from cluster import workers
from cluster.host import Host, stop


@dataclass(frozen=True)
class Slot:
    """Where one rank's actor landed: its bundle in the placement group, node and GPUs."""

    bundle: int
    node_id: str
    node_ip: str
    gpu_ids: tuple[str, ...] = ()
    port: int = 0  # a free port on its host (MASTER_PORT when it holds rank 0)


def rank_envs(slots: list[Slot]) -> list[dict[str, str]]:
    """The environment of each slot's rank (in the order of ``slots``). Ranks run node by node
    (nodes in the order of their first bundle), so a node's ranks are consecutive, and within
    a node in the order of their GPU (then bundle): LOCAL_RANK is then the index of the
    rank's GPU in the node's CUDA_VISIBLE_DEVICES (every GPU Ray gave this group's ranks on
    that node), which is where DeepSpeed and ``zero.Init`` place its tensors (``cuda:LOCAL_RANK``);
    Ray hands GPU ids out in no particular order. Rank 0's host is MASTER_ADDR, with the
    port its actor found free."""
    nodes = list(dict.fromkeys(s.node_id for s in sorted(slots, key=lambda s: s.bundle)))

    def order(s: Slot):
        return nodes.index(s.node_id), [int(g) if g.isdigit() else g for g in s.gpu_ids], s.bundle

    ranked = sorted(slots, key=order)
    master = ranked[0]
    envs = {}
    for rank, slot in enumerate(ranked):
        mates = [s for s in ranked if s.node_id == slot.node_id]
        env = {"RANK": str(rank), "WORLD_SIZE": str(len(slots)), "LOCAL_RANK": str(mates.index(slot)),
               "LOCAL_WORLD_SIZE": str(len(mates)), "NODE_RANK": str(nodes.index(slot.node_id)),
               "MASTER_ADDR": master.node_ip, "MASTER_PORT": str(master.port)}
        if slot.gpu_ids:
            visible = list(dict.fromkeys(g for s in mates for g in s.gpu_ids))
            env["CUDA_VISIBLE_DEVICES"] = ",".join(visible)
            env["LOCAL_RANK"] = str(visible.index(slot.gpu_ids[0]))
        envs[slot.bundle] = env
    return [envs[s.bundle] for s in slots]


class RanksFailed(RuntimeError):
    """A rank's process or node died, and no restart was left."""


def run_ranks(fn: Callable[[dict], None], config: dict, *, num_workers: int, resources: dict[str, float],
              max_failures: int = 0, name: str = "train", log=print, wait_log_s: float = 30.0) -> None:
    """``fn(config)`` on ``num_workers`` ranks, each with ``resources`` (``{"CPU": 1, "GPU": 1}``),
    placed by one PACK placement group (Ray Train's default), or on CPUs the run's warm actors
    of that shape (``_warm``: no placement group; they lie where the stages before placed
    them, which on one node is the same); started again after a failure
    ``max_failures`` times. The last failure is raised: a rank's exception as itself (Ray's
    ``RayTaskError`` subclass of it, with the rank's traceback), a dead rank as ``RanksFailed``."""
    failures = 0
    while True:
        failure = _attempt(fn, config, num_workers, resources, name, log, wait_log_s)
        if failure is None:
            return
        failures += 1
        rank, error = failure
        who = "an actor that was to hold a rank" if rank is None else f"rank {rank}"
        said = next((line for line in reversed(str(error).splitlines()) if line.strip()), "")[:300]
        if max_failures != -1 and failures > max_failures:
            if isinstance(error, Exception) and hasattr(error, "as_instanceof_cause"):  # the rank raised
                raise error.as_instanceof_cause() from None
            raise RanksFailed(f"{name}: {who} died, and no restart is left ({name}.max_failures: "
                              f"{max_failures}): {error}") from None
        left = "without limit" if max_failures == -1 else f"{failures} of {max_failures}"
        log(f"[{name}] {who} failed ({type(error).__name__}: {said}): starting the {num_workers} ranks again "
            f"(restart {left}); they resume from the newest complete checkpoint")


def _attempt(fn, config, num_workers, resources, name, log, wait_log_s) -> tuple[int | None, BaseException] | None:
    """One start of the group: None when every rank returned, else (rank, error) of the first
    that failed. Every actor and the placement group are gone when it returns."""
    import ray
    from ray.exceptions import RayError
    from ray.util.placement_group import remove_placement_group

    bundle = {k: float(v) for k, v in resources.items() if v}
    pg, actors, envs = None, _warm(num_workers, bundle), None
    try:
        if actors:
            try:
                envs = _environ(actors)
                log(f"[{name}] the {num_workers} ranks in the run's warm actors of {bundle}")
            except RayError as e:  # a warm actor gone meanwhile (its node lost): new ones, no failure counted
                log(f"[{name}] the warm actors could not hold the ranks ({type(e).__name__}): starting new ones")
                stop(actors)
                actors = []
        if not actors:
            pg = _placement_group(num_workers, bundle, name, log, wait_log_s)
            actors = _new_ranks(pg, num_workers, bundle)
            try:
                envs = _environ(actors)
            except RayError as e:  # an actor that could not start, or died before its rank ran: no rank yet
                return None, e
        rank_of = {i: int(env["RANK"]) for i, env in enumerate(envs)}
        title = f"TrainingRank.{getattr(fn, '__name__', 'run')}"
        refs = {a.run.remote(fn, config, title=title): i for i, a in enumerate(actors)}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            if (error := _error(done[0])) is not None:
                return _first_cause((done[0], error), refs, rank_of, pending)
        return None
    finally:
        stop(actors)  # the others, blocked in a collective with the one that failed, are stopped too
        if pg is not None:
            remove_placement_group(pg)


def _placement_group(num_workers: int, bundle: dict, name: str, log, wait_log_s: float):
    """One PACK placement group of ``num_workers`` bundles, once placed (a line every
    ``wait_log_s`` until then, never a silent wait)."""
    import ray
    from ray.util.placement_group import placement_group

    pg = placement_group([dict(bundle)] * num_workers, strategy="PACK", name=f"{name}-ranks")
    waited, ready = 0.0, pg.ready()
    while not ray.wait([ready], timeout=wait_log_s)[0]:
        waited += wait_log_s
        log(f"[{name}] waiting {waited:g} s for {num_workers} x {bundle} (the cluster has "
            f"{ray.available_resources()} free): {name}.num_workers, cpus_per_worker and use_gpu ask for them")
    return pg


def _new_ranks(pg, num_workers: int, bundle: dict) -> list:
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    options = {"num_cpus": bundle.get("CPU", 0), "num_gpus": bundle.get("GPU", 0),
               "resources": {k: v for k, v in bundle.items() if k not in ("CPU", "GPU")} or None, "max_restarts": 0}
    return [ray.remote(Host).options(scheduling_strategy=PlacementGroupSchedulingStrategy(
        pg, placement_group_bundle_index=i), **options).remote() for i in range(num_workers)]


def _environ(actors: list) -> list[dict]:
    """Each actor's rank environment, set in it (``rank_envs``, from where each one is)."""
    import ray

    envs = rank_envs([Slot(i, **where) for i, where in enumerate(ray.get([a.where.remote() for a in actors]))])
    ray.get([a.environ.remote(env) for a, env in zip(actors, envs)])
    return envs


def _warm(num_workers: int, bundle: dict[str, float]) -> list:
    """The run's warm actors (tokenize's and score's, ``cluster.workers``) as the ranks, when
    there are ``num_workers`` of the ranks' shape: their processes have torch and
    transformers imported. CPU ranks only: a GPU actor has initialised CUDA with its own GPU
    visible, and a rank needs its node's GPUs visible (``rank_envs``). Any other warm actor is
    stopped: its CPUs and GPUs would keep the ranks' placement group waiting."""
    if set(bundle) - {"CPU"}:
        workers.release()
        return []
    return workers.take(num_workers, bundle.get("CPU", 0), 0)


def _error(ref) -> BaseException | None:
    import ray
    from ray.exceptions import RayError

    try:
        ray.get(ref)
    except RayError as e:  # the rank raised (RayTaskError) or died (RayActorError)
        return e
    return None


# How long the other ranks are given, after one failed, to show the cause: a rank whose
# process died makes its peers' collectives fail too, often before Ray reports the death.
SETTLE_S = 2.0


def _first_cause(failed: tuple, refs: dict, rank_of: dict, pending: list) -> tuple[int, BaseException]:
    """The failure to report once one rank failed: a rank whose process died, if one did
    within ``SETTLE_S`` (its peers' "connection closed" errors are its consequence), else
    the first rank that raised. ``failed``: (ref, error) of the first."""
    import ray
    from ray.exceptions import RayActorError

    errors = [failed]
    if not isinstance(failed[1], RayActorError) and pending:
        done, _ = ray.wait(pending, num_returns=len(pending), timeout=SETTLE_S)
        errors += [(ref, e) for ref in done if (e := _error(ref)) is not None]
    return cause([(rank_of[refs[ref]], e) for ref, e in errors])


def cause(errors: list[tuple[int, BaseException]]) -> tuple[int, BaseException]:
    """Of the ranks' failures, in the order seen: the first rank whose process died, else the first."""
    from ray.exceptions import RayActorError

    return next(((r, e) for r, e in errors if isinstance(e, RayActorError)), errors[0])


