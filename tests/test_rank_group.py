"""The training ranks' group on Ray (cluster.rank_group): torchrun's environment for each
rank, worked out by hand for a layout Ray can hand out; then real groups on the test
session's Ray cluster: a gloo process group across the ranks, a rank's error raised as
itself, a failed attempt started again, and no actor left after any of them."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
from ray import cloudpickle

from cluster.rank_group import RanksFailed, Slot, cause, rank_envs, run_ranks

# The ranks' functions below travel by value: the workers cannot import this test module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def test_rank_envs_order_ranks_by_node_then_gpu_and_make_local_rank_the_gpus_index():
    """4 ranks, 2 nodes. Bundles 0 and 2 landed on node a with GPUs 3 and 1 (Ray's ids
    come in no order), bundles 1 and 3 on node b with GPUs 0 and 2. Node a holds bundle 0,
    so it is node 0: its ranks are 0 and 1, by GPU id: bundle 2 (GPU 1) is rank 0, bundle 0
    (GPU 3) rank 1. Each node's CUDA_VISIBLE_DEVICES is its ranks' GPUs in rank order, and
    LOCAL_RANK the index of the rank's own GPU in it: cuda:LOCAL_RANK is that GPU. Rank 0's
    host and port are the master's."""
    slots = [Slot(0, "a", "10.0.0.1", ("3",), 5000), Slot(1, "b", "10.0.0.2", ("2",), 5001),
             Slot(2, "a", "10.0.0.1", ("1",), 5002), Slot(3, "b", "10.0.0.2", ("0",), 5003)]
    envs = rank_envs(slots)
    common = {"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "5002"}
    assert envs[2] == {**common, "RANK": "0", "LOCAL_RANK": "0", "NODE_RANK": "0", "CUDA_VISIBLE_DEVICES": "1,3"}
    assert envs[0] == {**common, "RANK": "1", "LOCAL_RANK": "1", "NODE_RANK": "0", "CUDA_VISIBLE_DEVICES": "1,3"}
    assert envs[3] == {**common, "RANK": "2", "LOCAL_RANK": "0", "NODE_RANK": "1", "CUDA_VISIBLE_DEVICES": "0,2"}
    assert envs[1] == {**common, "RANK": "3", "LOCAL_RANK": "1", "NODE_RANK": "1", "CUDA_VISIBLE_DEVICES": "0,2"}


def test_rank_envs_on_cpus_number_a_nodes_ranks_by_bundle_and_set_no_devices():
    """GPU ids sort as numbers (10 after 9), and without GPUs the bundle order decides."""
    cpu = rank_envs([Slot(0, "n", "127.0.0.1", (), 7000), Slot(1, "n", "127.0.0.1", (), 7001)])
    assert [(e["RANK"], e["LOCAL_RANK"], e["MASTER_PORT"]) for e in cpu] == [("0", "0", "7000"), ("1", "1", "7000")]
    assert not any("CUDA_VISIBLE_DEVICES" in e for e in cpu)
    gpus = rank_envs([Slot(0, "n", "h", ("10",), 1), Slot(1, "n", "h", ("9",), 2)])
    assert [e["RANK"] for e in gpus] == ["1", "0"] and gpus[0]["CUDA_VISIBLE_DEVICES"] == "9,10"
    assert [e["LOCAL_RANK"] for e in gpus] == ["1", "0"]


def test_a_dead_rank_is_the_cause_before_the_peers_whose_collectives_it_broke():
    from ray.exceptions import RayActorError, RayTaskError

    peer = RayTaskError("run", "RuntimeError: Connection closed by peer", RuntimeError("Connection closed by peer"))
    dead = RayActorError()
    raised = RayTaskError("run", "ValueError: a bad row", ValueError("a bad row"))
    assert cause([(1, peer), (0, dead)]) == (0, dead)  # seen second, named first
    assert cause([(1, peer), (0, raised)]) == (1, peer)  # no process died: the first seen
    assert cause([(0, raised)]) == (0, raised)


def _all_reduce(config: dict) -> None:
    """A rank: its environment, and a gloo all-reduce of every rank's number."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")  # env://: what DeepSpeed's init_distributed reads
    total = torch.tensor([float(os.environ["RANK"]) + 1])
    dist.all_reduce(total)
    out = Path(config["out"]) / f"rank-{os.environ['RANK']}.txt"
    out.write_text(f"{total.item()} {os.environ['WORLD_SIZE']} {os.environ['LOCAL_RANK']} {os.getpid()}")
    dist.destroy_process_group()


def _fail_first(config: dict) -> None:
    """Rank 1 raises in the first attempt (no marker yet), every rank succeeds in the next."""
    marker = Path(config["out"]) / "failed-once"
    attempts = Path(config["out"]) / f"attempts-{os.environ['RANK']}"
    attempts.write_text(str(int(attempts.read_text()) + 1 if attempts.exists() else 1))
    if os.environ["RANK"] == "1" and not marker.exists():
        marker.write_text("")
        raise ValueError("rank 1: a bad row")


def _raise(config: dict) -> None:
    if os.environ["RANK"] == "1":
        raise ValueError("rank 1: a bad row")
    time.sleep(60)  # rank 0 would wait in a collective: stopped with the group


def _die(config: dict) -> None:
    if os.environ["RANK"] == "0":
        os._exit(3)  # the process dies (OOM killer, a lost node): no exception to carry
    time.sleep(60)


def _die_in_a_collective(config: dict) -> None:
    """Rank 0's process dies while rank 1 waits for it in an all-reduce: rank 1's gloo error
    ("connection closed") is the consequence, rank 0's death the cause."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    if os.environ["RANK"] == "0":
        time.sleep(0.5)
        os._exit(3)
    dist.all_reduce(torch.ones(1))


def _alive_ranks() -> list:
    import ray
    from ray.util.state import list_actors

    return list_actors(address=ray.get_runtime_context().gcs_address,  # this session's cluster, not another
                       filters=[("class_name", "=", "Host"), ("state", "=", "ALIVE")])


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_two_ranks_form_a_process_group_and_leave_nothing(ray_cluster, tmp_path):
    logged = []
    start = time.perf_counter()
    run_ranks(_all_reduce, {"out": str(tmp_path)}, num_workers=2, resources={"CPU": 1}, log=logged.append)
    took = time.perf_counter() - start
    got = sorted((tmp_path / f"rank-{r}.txt").read_text().split()[:3] for r in range(2))
    assert got == [["3.0", "2", "0"], ["3.0", "2", "1"]]  # 1 + 2 on both ranks; one node: local rank = rank
    assert logged == [] and not _alive_ranks()
    assert took < 60, took


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_failed_attempt_starts_every_rank_again_once(ray_cluster, tmp_path):
    logged = []
    run_ranks(_fail_first, {"out": str(tmp_path)}, num_workers=2, resources={"CPU": 1}, max_failures=1,
              name="sft", log=logged.append)
    assert [(tmp_path / f"attempts-{r}").read_text() for r in range(2)] == ["2", "2"]
    assert len(logged) == 1 and logged[0].startswith(
        "[sft] rank 1 failed (RayTaskError(ValueError): ValueError: rank 1: a bad row): "
        "starting the 2 ranks again (restart 1 of 1)"), logged
    assert not _alive_ranks()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_ranks_error_is_raised_as_itself_once_no_restart_is_left(ray_cluster, tmp_path):
    start = time.perf_counter()
    with pytest.raises(ValueError, match="rank 1: a bad row"):
        run_ranks(_raise, {}, num_workers=2, resources={"CPU": 1}, log=lambda _: None)
    assert time.perf_counter() - start < 45  # rank 0's sleep was cut short
    assert not _alive_ranks()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_dead_rank_names_the_rank_and_the_setting(ray_cluster):
    with pytest.raises(RanksFailed, match=r"train: rank 0 died, and no restart is left \(train.max_failures: 0\)"):
        run_ranks(_die, {}, num_workers=2, resources={"CPU": 1}, log=lambda _: None)
    assert not _alive_ranks()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_group_waiting_for_cpus_says_so_and_starts_when_they_free(ray_cluster, tmp_path):
    """An actor holds one of the cluster's 2 CPUs: the 2 ranks' placement group waits, and
    says what for, every wait_log_s; once the CPU is free the group starts and finishes."""
    import threading

    import ray

    holder = ray.remote(num_cpus=1)(_Holder).remote()
    ray.get(holder.ping.remote())
    logged = []

    def free_after_the_first_line():
        while not logged:
            time.sleep(0.05)
        ray.kill(holder)

    threading.Thread(target=free_after_the_first_line, daemon=True).start()
    run_ranks(_all_reduce, {"out": str(tmp_path)}, num_workers=2, resources={"CPU": 1}, log=logged.append,
              wait_log_s=0.5)
    assert logged[0].startswith("[train] waiting 0.5 s for 2 x {'CPU': 1.0} (the cluster has "), logged
    assert "train.num_workers, cpus_per_worker and use_gpu ask for them" in logged[0]
    assert sorted((tmp_path / f"rank-{r}.txt").read_text().split()[0] for r in range(2)) == ["3.0", "3.0"]


class _Holder:
    def ping(self) -> bool:
        return True


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_rank_dying_in_a_collective_is_blamed_not_the_peer_it_left_waiting(ray_cluster):
    with pytest.raises(RanksFailed, match=r"train: rank 0 died"):
        run_ranks(_die_in_a_collective, {}, num_workers=2, resources={"CPU": 1}, log=lambda _: None)
    assert not _alive_ranks()


@pytest.mark.slow
def test_the_process_group_waits_30_minutes_for_the_slowest_rank():
    """DeepSpeed's own default is 10 minutes; the ranks' group keeps Ray Train's 30 (a
    resume's per-node checkpoint load must fit in it), or DEEPSPEED_TIMEOUT's minutes."""
    import subprocess

    code = ("import torch, torch.distributed as dist; from pipeline.training.engine import init_distributed; "
            "init_distributed('gloo'); print(dist.group.WORLD._get_backend(torch.device('cpu')).options._timeout)")
    for env, want in (({}, "0:30:00"), ({"DEEPSPEED_TIMEOUT": "45"}, "0:45:00")):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**{k: v for k, v in os.environ.items() if k != "DEEPSPEED_TIMEOUT"}, **env}).stdout
        assert out.splitlines()[-1] == want, out
