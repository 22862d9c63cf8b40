"""A run's worker actors, kept warm from one stage to the next.

tokenize, score and generate each map a list of items (read units, shards, prompt shards)
over a few Ray actors, each holding one worker object built once (a tokenizer, a reference
model). Each actor is a ``Host``: a process that builds the worker object it is sent, runs
items on it one at a time, drops it at the stage's end and stays up, with its imports
(torch, transformers: about 4 s of a core a process), for the next stage that asks for
actors of the same CPUs and GPUs; on CPUs the training ranks too (``rank_group``).

Why not Ray Data's actor pools (the pipeline's until #37): they served as a work queue only
(items in, a dict or a table out), each started its actors anew, and Ray Data cost the
driver its import, an executor, a stats actor, an autoscaling coordinator and an
actor-location tracker (about 4 s of a core in a demo run).

As Ray Data's pool did: an item goes to an actor once it is built and free (one in flight
an actor: an actor that loaded its model first would otherwise queue them all), an actor
that dies is replaced and its item given again (``ITEM_TRIES`` tries), an item's exception
is raised on the driver as itself. Actors of another shape are stopped before new ones are
asked for (they hold CPUs the new ones may need); ``release()`` stops them all, and what is
placed beside the pool (the ranks' placement group) calls it first. Every actor is gone
when the run ends (``warm_pool``).
"""

from __future__ import annotations

import gc
import os
import socket
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

ITEM_TRIES = 4  # an item whose actor died is given again: at most this many tries in all
WAIT_LOG_S = 30.0  # a line every this many seconds while no actor has started


class Host:
    """One warm worker process: builds a worker object, runs items on it, drops it."""

    def __init__(self):
        self.worker = None

    def build(self, factory: Callable, kwargs: dict) -> float:
        """Drop the last worker object, build this one; returns when it was ready."""
        self.drop()
        self.worker = factory(**kwargs)
        return time.time()

    def call(self, method: str, item: Any, title: str) -> Any:
        _title(title)
        return getattr(self.worker, method)(item)

    def run(self, fn: Callable, *args, title: str = "", **kwargs) -> Any:
        _title(title or getattr(fn, "__name__", "function"))
        return fn(*args, **kwargs)

    def where(self) -> dict:
        """Its node, the node's address, the GPUs Ray gave it, and a port free on its host."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return {"node_id": ray.get_runtime_context().get_node_id(), "node_ip": ray.util.get_node_ip_address(),
                "gpu_ids": tuple(str(g) for g in ray.get_gpu_ids()), "port": port}

    def environ(self, env: dict) -> None:
        """Set before a later call: its arguments (a function, its config) are unpickled only
        then, so nothing they import can read the environment before it is set
        (CUDA_VISIBLE_DEVICES above all: CUDA reads it once, when first initialised)."""
        os.environ.update(env)

    def drop(self) -> None:
        """Free the worker object (a model: gigabytes). It was frozen out of the collector's
        view once built (``placement.settle``): taken back first, or its cycles stay."""
        if self.worker is not None:
            self.worker = None
            gc.unfreeze()
            gc.collect()


def _title(title: str) -> None:
    """The process's title while it works on an item (``ps``, ``top``): ``ray::ShardScorer.score_item``
    rather than the generic ``ray::Host.call``; Ray sets it back after the call."""
    import ray

    set_title = getattr(getattr(ray, "_raylet", None), "setproctitle", None)
    if set_title is not None:
        set_title(f"ray::{title}")


class WorkerDied(RuntimeError):
    """An item's actor died ``ITEM_TRIES`` times while working on it."""


class WorkerPool:
    """Warm ``Host`` actors, by shape (CPUs, GPUs). ``stage``: the name its lines carry."""

    def __init__(self, log: Callable[[str], None] = print, progress: bool = True):
        self.log, self.progress = log, progress  # progress: a line every WAIT_LOG_S while a stage maps
        self.hosts: dict[tuple[float, float], list] = {}

    def map(self, stage: str, factory: Callable, kwargs: dict, method: str, items: list, *, actors: int,
            num_cpus: float, num_gpus: float = 0) -> list:
        """``getattr(factory(**kwargs), method)(item)`` for each item, on at most ``actors`` actors
        of ``num_cpus`` and ``num_gpus`` each, each building its worker once; results in the
        order of ``items``."""
        title = f"{getattr(factory, '__name__', 'worker')}.{method}"
        return self._drive(stage, items, actors, (float(num_cpus), float(num_gpus)), self.progress,
                           build=lambda host: host.build.remote(factory, kwargs),
                           call=lambda host, item: host.call.remote(method, item, title))

    def run(self, stage: str, fn: Callable, calls: list[dict], *, actors: int, num_cpus: float,
            num_gpus: float = 0) -> list:
        """``fn(**kwargs)`` for each of ``calls`` on the pool's actors (no worker object)."""
        return self._drive(stage, calls, actors, (float(num_cpus), float(num_gpus)), False,
                           build=lambda host: host.__ray_ready__.remote(),
                           call=lambda host, kwargs: host.run.remote(fn, **kwargs))

    def take(self, n: int, shape: tuple[float, float], ready_s: float = 2.0) -> list:
        """``n`` warm actors of ``shape`` that are up, out of the pool (the caller stops them when
        done with them), or none when there are fewer; every other actor is stopped."""
        import ray

        hosts = self.hosts.pop(shape, [])
        self.release()
        refs = [h.__ray_ready__.remote() for h in hosts]
        answered = set(ray.wait(refs, num_returns=len(refs), timeout=ready_s)[0]) if refs else set()
        ready = [i for i, ref in enumerate(refs) if ref in answered and _alive(ref)][:n]
        if len(ready) < n:
            ready = []
        self._stop([h for i, h in enumerate(hosts) if i not in ready])
        return [hosts[i] for i in ready]

    def release(self) -> None:
        """Stop every actor (their CPUs and GPUs are wanted elsewhere, or the run is over)."""
        for shape in list(self.hosts):
            self._stop(self.hosts.pop(shape))

    # ------------------------------------------------------------------------------------------

    def _take(self, shape: tuple[float, float], n: int) -> tuple[list, int]:
        """``n`` actors of ``shape``, the warm ones first (more warm ones are kept, idle: the
        next stage may want them); actors of other shapes stopped. And how many were warm."""
        for other in [s for s in self.hosts if s != shape]:
            self._stop(self.hosts.pop(other))
        warm = self.hosts.get(shape, [])
        self.hosts[shape] = warm + [self._new(shape) for _ in range(n - len(warm))]
        return self.hosts[shape][:n], min(n, len(warm))

    @staticmethod
    def _new(shape: tuple[float, float]):
        import ray

        return ray.remote(Host).options(num_cpus=shape[0], num_gpus=shape[1], max_restarts=0).remote()

    @staticmethod
    def _stop(hosts: list) -> None:
        import ray

        for host in hosts:
            ray.kill(host, no_restart=True)

    def _drive(self, stage, items, actors, shape, progress, build, call) -> list:
        import ray
        from ray.exceptions import RayActorError

        if not items:
            return []
        hosts, warm = self._take(shape, max(1, min(actors, len(items))))
        cpus, gpus = shape
        self.log(f"[{stage}] {len(items)} items on {len(hosts)} actors ({cpus:g} CPU{f', {gpus:g} GPU' if gpus else ''}"
                 f" each; {warm} warm from an earlier stage)")
        results: list = [None] * len(items)
        todo = list(range(len(items)))  # items not yet given, or to be given again
        tries = [0] * len(items)
        starting = {build(h): h for h in hosts}  # an actor gets items once its worker is built
        running: dict = {}  # ref -> (actor, item index)
        idle: list = []  # built, with nothing to do (until an item is given again)
        done, waited, next_line = 0, 0.0, time.time() + WAIT_LOG_S
        try:
            while todo or running:
                while idle and todo:  # free actors: the next items
                    host, i = idle.pop(0), todo.pop(0)
                    running[call(host, items[i])] = (host, i)
                ready, _ = ray.wait(list(starting) + list(running), num_returns=1, timeout=WAIT_LOG_S)
                if not ready:
                    waited += WAIT_LOG_S
                    if not running:  # no actor has started yet: say what it waits for
                        self.log(f"[{stage}] waiting {waited:g} s for actors of {cpus:g} CPU, {gpus:g} GPU (the "
                                 f"cluster has {ray.available_resources()} free)")
                    continue
                ref = ready[0]
                if ref in starting:
                    host = starting.pop(ref)
                    try:
                        ray.get(ref)
                    except RayActorError:  # died while starting: another in its place
                        new = self._replace(shape, host)
                        starting[build(new)] = new
                        continue
                else:
                    host, i = running.pop(ref)
                    try:
                        results[i] = ray.get(ref)
                        done += 1
                    except RayActorError as e:  # its process or node died: the item again, elsewhere
                        tries[i] += 1
                        if tries[i] >= ITEM_TRIES:
                            raise WorkerDied(f"{stage}: an actor died {tries[i]} times working on item {i} "
                                             f"({_describe(items[i])}): {e}") from None
                        self.log(f"[{stage}] an actor died working on item {i} ({type(e).__name__}); given again")
                        todo.insert(0, i)
                        new = self._replace(shape, host)
                        starting[build(new)] = new
                        continue
                    if progress and time.time() > next_line:
                        next_line = time.time() + WAIT_LOG_S
                        self.log(f"[{stage}] {done}/{len(items)} items done")
                idle.append(host)
        except Exception:
            self.release()  # a failed stage's actors hold what it half did: not reused
            raise
        for host in self.hosts.get(shape, []):
            host.drop.remote()  # the worker object freed now; the process kept for the next stage
        return results

    def _replace(self, shape, dead):
        """A new actor in place of ``dead`` (stopped, in case only its task failed)."""
        self._stop([dead])
        new = self._new(shape)
        self.hosts[shape] = [new if h is dead else h for h in self.hosts.get(shape, [])]
        return new


def _alive(ready_ref) -> bool:
    """An actor's ``__ray_ready__`` answered, and not with its death."""
    import ray
    from ray.exceptions import RayError

    try:
        ray.get(ready_ref)
        return True
    except RayError:
        return False


def _describe(item: Any) -> str:
    if isinstance(item, dict):
        return ", ".join(f"{k}={str(v)[:80]}" for k, v in list(item.items())[:3])
    return str(item)[:200]


_current: WorkerPool | None = None


@contextmanager
def warm_pool(log: Callable[[str], None] = print, progress: bool = True) -> Iterator[WorkerPool]:
    """The pool the stages of one run share (``current``); every actor stopped at the end."""
    global _current
    outer, _current = _current, WorkerPool(log, progress)
    try:
        yield _current
    finally:
        pool, _current = _current, outer
        if _is_connected():
            pool.release()


@contextmanager
def current(log: Callable[[str], None] = print) -> Iterator[WorkerPool]:
    """The run's pool, or (outside a run: a stage's code called directly) one for this use only."""
    if _current is not None:
        yield _current
        return
    with warm_pool(log) as pool:
        yield pool


def take(n: int, num_cpus: float, num_gpus: float = 0) -> list:
    """``n`` of the run's warm actors with ``num_cpus`` and ``num_gpus`` each, for the caller to
    use and stop (the training ranks), or none; the run's other actors are stopped."""
    if _current is None or not _is_connected():
        return []
    return _current.take(n, (float(num_cpus), float(num_gpus)))


def release() -> None:
    """Stop the run's warm actors (before placing something they may stand in the way of)."""
    if _current is not None and _is_connected():
        _current.release()


def _is_connected() -> bool:
    import sys

    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()
