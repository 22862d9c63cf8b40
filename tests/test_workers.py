"""The run's warm actors (cluster.workers) on the test session's Ray cluster: a second stage
of the same shape runs in the same processes with its imports done, a stage of another
shape gets new ones, an actor killed during an item is replaced and the item given again,
an item's exception is raised as itself, and no actor is left after the run."""

from __future__ import annotations

import os
import re
import signal
import sys
import time

import pytest
from ray import cloudpickle

from cluster.workers import ITEM_TRIES, WorkerDied, release, warm_pool
from cluster.rank_group import run_ranks

# The worker classes below travel by value: the actors cannot import this test module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


class Square:
    """A worker: says which process it is in and what it imported before it was built."""

    def __init__(self, offset: int = 0):
        self.offset = offset
        self.torch_before = "torch" in sys.modules
        import torch  # noqa: F401 - what a tokenizer or a model pays on an actor's first stage

    def work(self, x: int) -> tuple:
        return x * x + self.offset, os.getpid(), self.torch_before


class Faulty:
    def __init__(self, out: str):
        self.out, self.built = out, time.time()

    def work(self, x: int) -> int:
        if x == 3:
            raise ValueError(f"item {x} is bad")
        return x

    def die_once(self, x: int) -> tuple:
        marker = f"{self.out}/died-{x}"
        if x == 2 and not os.path.exists(marker):  # the first try of item 2 kills its process, 3 s in
            open(marker, "w").close()
            time.sleep(3.0)
            os.kill(os.getpid(), signal.SIGKILL)
        return x, self.built


    def die(self, x: int) -> int:
        os.kill(os.getpid(), signal.SIGKILL)


class SlowSecond:
    """The first actor to build it is ready at once, the second 3 s later."""

    def __init__(self, out: str):
        try:
            os.close(os.open(f"{out}/first", os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            time.sleep(3.0)
        open(f"{out}/built-{os.getpid()}", "w").close()

    def work(self, x: int) -> int:
        return x


class DiesBuilding:
    def __init__(self):
        os.kill(os.getpid(), signal.SIGKILL)


def _alive_hosts() -> list:
    import ray
    from ray.util.state import list_actors

    return list_actors(address=ray.get_runtime_context().gcs_address,
                       filters=[("class_name", "=", "Host"), ("state", "=", "ALIVE")])


def _pids(pool, shape) -> set:
    import ray

    return set(ray.get([h.run.remote(os.getpid) for h in pool.hosts[shape]]))


def _gone(pids: set, timeout: float = 10.0) -> bool:
    import psutil

    deadline = time.time() + timeout
    while time.time() < deadline:
        if not any(psutil.pid_exists(p) for p in pids):
            return True
        time.sleep(0.1)
    return False


def test_a_stage_of_the_same_shape_runs_in_the_warm_actors_and_none_outlive_the_run(ray_cluster):
    logged = []
    with warm_pool(logged.append) as pool:
        first = pool.map("tokenize", Square, {}, "work", list(range(6)), actors=2, num_cpus=0.5)
        assert [r[0] for r in first] == [x * x for x in range(6)]  # in the items' order
        pids = _pids(pool, (0.5, 0.0))
        assert len(pids) == 2 and {r[1] for r in first} <= pids  # the first actor ready may do them all
        assert not any(r[2] for r in first)  # new processes: torch not yet imported
        second = pool.map("score", Square, {"offset": 1}, "work", list(range(4)), actors=2, num_cpus=0.5)
        assert [r[0] for r in second] == [x * x + 1 for x in range(4)]  # the new worker object, not the old
        assert {r[1] for r in second} <= pids and all(r[2] for r in second)  # the same processes, torch imported
        assert logged[-1] == "[score] 4 items on 2 actors (0.5 CPU each; 2 warm from an earlier stage)"
        # another shape: new processes, the old ones stopped (they held CPUs the new ones may need)
        third = pool.map("generate", Square, {}, "work", [5], actors=2, num_cpus=1)
        assert third[0][0] == 25 and third[0][1] not in pids and _gone(pids)
        last = {third[0][1]}
    assert _gone(last) and not _alive_hosts()


def test_an_actor_killed_during_an_item_is_replaced_and_the_item_given_again(ray_cluster, tmp_path):
    logged = []
    with warm_pool(logged.append) as pool:
        got = pool.map("score", Faulty, {"out": str(tmp_path)}, "die_once", list(range(3)), actors=2, num_cpus=0.5)
    assert [x for x, _ in got] == list(range(3))
    # given again to the other actor, built before the death (and free: its items were done),
    # not kept for the one started in place of the dead
    death = (tmp_path / "died-2").stat().st_mtime + 3.0
    assert got[2][1] < death, (got, death)
    assert [line for line in logged if "died" in line] == [
        "[score] an actor died working on item 2 (ActorDiedError); given again"]
    assert not _alive_hosts()


def test_an_item_that_kills_every_actor_it_is_given_to_stops_the_stage(ray_cluster, tmp_path):
    with warm_pool(lambda _: None) as pool:
        with pytest.raises(WorkerDied, match=f"score: an actor died {ITEM_TRIES} times working on item 0"):
            pool.map("score", Faulty, {"out": str(tmp_path)}, "die", [0], actors=1, num_cpus=0.5)
        assert not pool.hosts
    assert not _alive_hosts()


def test_actors_that_die_building_their_worker_stop_the_stage_after_a_few_tries(ray_cluster):
    logged = []
    with warm_pool(logged.append) as pool:
        with pytest.raises(WorkerDied, match=f"score: actors died {ITEM_TRIES} times while building their worker"):
            pool.map("score", DiesBuilding, {}, "work", [0, 1], actors=1, num_cpus=0.5)
        assert not pool.hosts
    assert len([line for line in logged if "died building" in line]) == ITEM_TRIES - 1
    assert not _alive_hosts()


def test_an_items_exception_is_raised_as_itself_and_the_actors_are_stopped(ray_cluster, tmp_path):
    with warm_pool(lambda _: None) as pool:
        with pytest.raises(ValueError, match="item 3 is bad"):
            pool.map("tokenize", Faulty, {"out": str(tmp_path)}, "work", list(range(5)), actors=2, num_cpus=0.5)
        assert not pool.hosts and not _alive_hosts()


def _ranks_ran(config: dict) -> None:
    with open(f"{config['out']}/rank-{os.environ['RANK']}", "w") as f:
        f.write(str(os.getpid()))


def _rank_pids(out) -> dict:
    return {p.name: int(p.read_text()) for p in sorted(out.iterdir())}


def test_warm_actors_of_the_ranks_shape_become_the_ranks(ray_cluster, tmp_path):
    """On CPUs, as many warm actors as ranks, each of the ranks' CPUs: the ranks run in them
    (torch and transformers imported), leave the pool, and are stopped after."""
    with warm_pool(lambda _: None) as pool:
        pool.map("score", Square, {}, "work", [1, 2], actors=2, num_cpus=1)
        warm = _pids(pool, (1.0, 0.0))
        run_ranks(_ranks_ran, {"out": str(tmp_path)}, num_workers=2, resources={"CPU": 1}, log=print)
        ranks = _rank_pids(tmp_path)
        assert list(ranks) == ["rank-0", "rank-1"] and set(ranks.values()) == warm
        assert not pool.hosts and _gone(warm)


def test_a_warm_actor_dead_before_the_ranks_start_is_no_failure_of_theirs(ray_cluster, tmp_path):
    """One of the two warm actors of the ranks' shape dies (its node lost, say) before the
    ranks start: the ranks start in new actors, and no restart is used (max_failures 0)."""
    logged = []
    with warm_pool(logged.append) as pool:
        pool.map("score", Square, {}, "work", [1, 2], actors=2, num_cpus=1)
        warm = _pids(pool, (1.0, 0.0))
        os.kill(min(warm), signal.SIGKILL)
        assert _gone({min(warm)})
        run_ranks(_ranks_ran, {"out": str(tmp_path)}, num_workers=2, resources={"CPU": 1}, max_failures=0,
                  log=logged.append)
        ranks = _rank_pids(tmp_path)
        assert list(ranks) == ["rank-0", "rank-1"] and not set(ranks.values()) & warm
        assert not pool.hosts and _gone(warm)
    assert not [line for line in logged if "restart" in line or "failed" in line], logged


def test_a_warm_actor_that_dies_once_taken_leaves_the_ranks_to_new_actors(ray_cluster, tmp_path, monkeypatch):
    """Taken as a rank, then dead before the ranks' environment is set (its node lost between
    the two): new actors in a placement group hold the ranks, with no restart used."""
    import ray

    from cluster import workers

    taken = workers.take

    def take_then_lose_one(*args):
        hosts = taken(*args)
        pid = ray.get(hosts[0].run.remote(os.getpid))
        os.kill(pid, signal.SIGKILL)
        assert _gone({pid})
        return hosts

    monkeypatch.setattr(workers, "take", take_then_lose_one)
    logged = []
    with warm_pool(logged.append) as pool:
        pool.map("score", Square, {}, "work", [1, 2], actors=2, num_cpus=1)
        warm = _pids(pool, (1.0, 0.0))
        run_ranks(_ranks_ran, {"out": str(tmp_path)}, num_workers=2, resources={"CPU": 1}, max_failures=0,
                  log=logged.append)
        ranks = _rank_pids(tmp_path)
        assert list(ranks) == ["rank-0", "rank-1"] and not set(ranks.values()) & warm and _gone(warm)
    said = [line for line in logged if line.startswith("[train]")]
    assert len(said) == 1 and re.fullmatch(r"\[train\] the warm actors could not hold the ranks \(Actor\w+Error\): "
                                           r"starting new ones", said[0]), said


def test_a_warm_actor_still_building_when_its_stage_ended_is_waited_for_as_a_rank(ray_cluster, tmp_path):
    """The first actor did both items while the second still built its worker: the ranks take
    both once it is built (lost instead, it would hold a CPU the ranks' placement group waits
    for)."""
    (tmp_path / "ranks").mkdir()
    with warm_pool(lambda _: None) as pool:
        pool.map("score", SlowSecond, {"out": str(tmp_path)}, "work", [1, 2], actors=2, num_cpus=1)
        assert len(pool.up) == 1 and len(pool.building) == 1
        run_ranks(_ranks_ran, {"out": str(tmp_path / "ranks")}, num_workers=2, resources={"CPU": 1}, log=print)
        assert not pool.hosts
    built = {int(p.name.split("-")[1]) for p in tmp_path.glob("built-*")}
    assert set(_rank_pids(tmp_path / "ranks").values()) == built and len(built) == 2


def test_the_ranks_placement_group_is_not_kept_waiting_by_warm_actors(ray_cluster, tmp_path):
    """Warm actors of another shape holding all of the cluster's CPUs (4 x 0.5): the ranks'
    group (2 x 1 CPU) stops them first, instead of waiting for CPUs that no one would free."""
    with warm_pool(lambda _: None) as pool:
        pool.map("score", Square, {}, "work", [1, 2, 3, 4], actors=4, num_cpus=0.5)
        warm = _pids(pool, (0.5, 0.0))
        run_ranks(_ranks_ran, {"out": str(tmp_path)}, num_workers=2, resources={"CPU": 1}, log=print)
        ranks = _rank_pids(tmp_path)
        assert list(ranks) == ["rank-0", "rank-1"] and not set(ranks.values()) & warm
        assert not pool.hosts and _gone(warm)
        release()  # nothing left to stop: a no-op


@pytest.mark.timeout(600)
def test_ranks_in_warm_actors_train_as_ranks_in_new_ones(assets, tmp_path, ray_cluster):
    """The whole pipeline, 2 ranks with accumulation 2: tokenize's and score's actors of the
    ranks' shape (1 CPU) hold the ranks, against actors of another shape (0.5 CPU: new rank
    processes); every logged loss and eval the same, bit for bit."""
    from helpers import tiny_config
    from pipeline import runner
    from pipeline.training.metrics import read_metrics

    records = {}
    for cpus in (1, 0.5):
        logged = []
        cfg = tiny_config(assets, tmp_path / f"run-{cpus}", tokenize={"num_cpus_per_actor": cpus},
                          score={"num_cpus_per_actor": cpus},
                          train={"max_steps": 4, "eval_steps": 2, "gradient_accumulation_steps": 2})
        results = runner.run_pipeline(cfg, log=logged.append)
        assert f"[score] 9 items on 2 actors ({cpus:g} CPU each; 2 warm from an earlier stage)" in logged, logged
        records[cpus] = [{k: v for k, v in r.items() if "loss" in k or "rewards" in k}
                         for r in read_metrics(results["train"]["dir"])]
    assert records[1] == records[0.5] and len(records[1]) >= 6
