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

import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from cluster.host import Host, stop

ITEM_TRIES = 4  # an item whose actor died is given again: at most this many tries in all
WAIT_LOG_S = 30.0  # a line every this many seconds while no actor is up, and of progress


class WorkerDied(RuntimeError):
    """An item's actor died ``ITEM_TRIES`` times while working on it, or the actors kept dying
    while they built their worker."""


class WorkerPool:
    """Warm ``Host`` actors, by shape (CPUs, GPUs); ``up``: those that have built a worker;
    ``building``: {ref: actor} of builds a stage left running (it ended first)."""

    def __init__(self, log: Callable[[str], None] = print, progress: bool = True):
        self.log, self.progress = log, progress  # progress: a line every WAIT_LOG_S while a stage maps
        self.hosts: dict[tuple[float, float], list] = {}
        self.up: set = set()
        self.building: dict = {}

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

    def take(self, n: int, shape: tuple[float, float], ready_s: float = 60.0) -> list:
        """``n`` warm actors of ``shape`` that are up, out of the pool (the caller stops them when
        done with them), or none when there are fewer; every other actor is stopped. Each is
        waited for while it drops its last worker (a collection: seconds for a big model), and
        while it builds one a stage left building, when the others are too few."""
        import ray

        self._refresh()
        every = self.hosts.pop(shape, [])
        up = [h for h in every if h in self.up]
        pending = {} if len(up) >= n else {r: h for r, h in self.building.items() if h in every}
        self.release()
        if pending:
            ray.wait(list(pending), num_returns=len(pending), timeout=ready_s)
            up += [h for r, h in pending.items() if _alive(r, timeout=0)]
        alive, lost = _ask_alive(up, ready_s)  # not one whose raylet just died: it would die as a rank
        if lost:
            self.log(f"[workers] {len(lost)} warm actor(s) whose raylet is gone (a node lost?): not taken")
        taken = alive[:n] if len(alive) >= n else []
        stop([h for h in every if h not in taken])
        return taken

    def release(self) -> None:
        """Stop every actor (their CPUs and GPUs are wanted elsewhere, or the run is over)."""
        for shape in list(self.hosts):
            self._stop_shape(shape)
        self.up.clear()
        self.building.clear()

    def _stop_shape(self, shape: tuple[float, float]) -> None:
        hosts = self.hosts.pop(shape)
        stop(hosts)
        self.up -= set(hosts)
        self.building = {r: h for r, h in self.building.items() if h not in hosts}

    def _refresh(self) -> None:
        """The builds a stage left running that have finished since: those actors are up."""
        import ray

        if self.building:
            for ref in ray.wait(list(self.building), num_returns=len(self.building), timeout=0)[0]:
                host = self.building.pop(ref)
                if _alive(ref):
                    self.up.add(host)

    # ------------------------------------------------------------------------------------------

    def _take(self, shape: tuple[float, float], n: int) -> tuple[list, int]:
        """``n`` actors of ``shape``: the warm ones that are up first, then the others, then new
        ones (more warm ones are kept, idle: the next stage may want them); actors of other
        shapes stopped. And how many of the ``n`` were up already."""
        for other in [s for s in self.hosts if s != shape]:
            self._stop_shape(other)
        self._refresh()
        warm = sorted(self.hosts.get(shape, []), key=lambda h: h not in self.up)
        self.hosts[shape] = warm + [self._new(shape) for _ in range(n - len(warm))]
        hosts = self.hosts[shape][:n]
        return hosts, sum(h in self.up for h in hosts)

    @staticmethod
    def _new(shape: tuple[float, float]):
        """A new actor, spread over the nodes (as Ray Data's pools; Ray's default fills one first)."""
        import ray

        return ray.remote(Host).options(num_cpus=shape[0], num_gpus=shape[1], max_restarts=0,
                                        scheduling_strategy="SPREAD").remote()

    def _replace(self, shape, dead):
        """A new actor in place of ``dead`` (stopped, in case only its task failed)."""
        stop([dead], timeout=0)
        self.up.discard(dead)
        new = self._new(shape)
        self.hosts[shape] = [new if h is dead else h for h in self.hosts.get(shape, [])]
        return new

    def _drive(self, stage, items, actors, shape, progress, build, call) -> list:
        import ray
        from ray.exceptions import ObjectLostError, RayActorError

        if not items:
            return []
        hosts, warm = self._take(shape, max(1, min(actors, len(items))))
        cpus, gpus = shape
        self.log(f"[{stage}] {len(items)} items on {len(hosts)} actors ({cpus:g} CPU{f', {gpus:g} GPU' if gpus else ''}"
                 f" each; {warm} warm from an earlier stage)")
        results: list = [None] * len(items)
        todo = list(range(len(items)))  # items not yet given, or to be given again
        tries, build_deaths = [0] * len(items), 0
        self.building = {r: h for r, h in self.building.items() if h not in hosts}  # built again now
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
                    if not running:  # no actor is up: say what it waits for
                        self.log(f"[{stage}] waiting {waited:g} s for actors of {cpus:g} CPU, {gpus:g} GPU (the "
                                 f"cluster has {ray.available_resources()} free)")
                    continue
                waited, ref = 0.0, ready[0]
                if ref in starting:
                    host = starting.pop(ref)
                    try:
                        ray.get(ref)
                    except RayActorError as e:  # died while building its worker: another in its place
                        build_deaths += 1
                        if build_deaths >= ITEM_TRIES * len(hosts):
                            raise WorkerDied(f"{stage}: actors died {build_deaths} times while building their "
                                             f"worker (out of memory? a runtime env that fails?): {e}") from None
                        self.log(f"[{stage}] an actor died building its worker ({type(e).__name__}); another "
                                 f"in its place")
                        for dead in [host] + self._dead(idle):  # the idle ones on a lost node too
                            new = self._replace(shape, dead)
                            starting[build(new)] = new
                        continue
                    self.up.add(host)
                else:
                    host, i = running.pop(ref)
                    try:
                        results[i] = ray.get(ref)
                        done += 1
                    except (RayActorError, ObjectLostError) as e:  # its process or node died: the item again
                        tries[i] += 1
                        if tries[i] >= ITEM_TRIES:
                            raise WorkerDied(f"{stage}: an actor died {tries[i]} times working on item {i} "
                                             f"({_describe(items[i])}): {e}") from None
                        self.log(f"[{stage}] an actor died working on item {i} ({type(e).__name__}); given again")
                        todo.insert(0, i)
                        for dead in [host] + self._dead(idle):  # the idle ones on a lost node too
                            new = self._replace(shape, dead)
                            starting[build(new)] = new
                        continue
                    if progress and time.time() > next_line:
                        next_line = time.time() + WAIT_LOG_S
                        self.log(f"[{stage}] {done}/{len(items)} items done")
                idle.append(host)
        except Exception:
            self.release()  # a failed stage's actors hold what it half did: not reused
            raise
        self.building.update(starting)  # still building when the items ran out
        for host in self.hosts.get(shape, []):
            host.drop.remote()  # the worker object freed now; the process kept for the next stage
        return results

    @staticmethod
    def _dead(idle: list, timeout: float = 2.0) -> list:
        """The idle actors dead, or whose raylet is (taken out of ``idle``): after one died,
        those on its node would each be given its item and die with it, using its tries."""
        dead = _ask_alive(idle, timeout)[1]
        idle[:] = [h for h in idle if h not in dead]
        return dead


def _ask_alive(hosts: list, timeout: float) -> tuple[list, list]:
    """Those of ``hosts`` that answer ``Host.alive`` in ``timeout`` seconds that their raylet
    runs, and those that answer it does not, or died (one that does not answer: neither)."""
    import ray

    refs = [h.alive.remote() for h in hosts]
    answered = set(ray.wait(refs, num_returns=len(refs), timeout=timeout)[0]) if refs else set()
    said = {h: _alive(ref) for h, ref in zip(hosts, refs) if ref in answered}
    return [h for h in hosts if said.get(h)], [h for h in hosts if said.get(h) is False]


def _alive(ref, timeout: float | None = None) -> bool:
    """An actor's call answered (``Host.alive``: True; a build: anything) in ``timeout``
    seconds, and not with its death."""
    import ray
    from ray.exceptions import RayError

    try:
        return ray.get(ref, timeout=timeout) is not False
    except (RayError, TimeoutError):
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
