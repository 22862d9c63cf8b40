"""On a new run directory Ray's local cluster begins with the process, beside the driver's
imports and checks (``cluster.ray_cluster.connect_early``, #37). Whatever ends such a run
early, no process of that cluster outlives it: a config its checks refuse, a SIGTERM while
Ray starts. (A finished run: tests/test_phases.py.)"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from helpers import tiny_config, write_config
from pipeline.cli import new_run_dir


def test_only_a_new_local_run_directory_starts_ray_before_the_checks(tmp_path):
    run_dir = tmp_path / "run"
    assert new_run_dir({"run_dir": str(run_dir)})  # not there yet
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("{}\n")  # a run the checks refused: still no stage's output
    assert new_run_dir({"run_dir": str(run_dir)})
    (run_dir / "tokenize").mkdir()  # a rerun: its checks and fingerprints decide whether Ray starts
    assert not new_run_dir({"run_dir": str(run_dir)})
    assert not new_run_dir({"run_dir": "s3://bucket/run"})  # a bucket is not listed before the checks
    assert not new_run_dir({"run_dir": str(tmp_path / "other"), "trian": {}})  # the checks say what is wrong


@pytest.fixture
def ray_tmp():
    """A Ray temp dir of this test's own (short: Ray's socket paths must fit 107 bytes)."""
    tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    yield tmp
    shutil.rmtree(tmp, ignore_errors=True)


def cluster_processes(tmp: str, driver: int | None = None) -> list[str]:
    """Processes of the cluster started with RAY_TMPDIR=tmp, but the ``driver`` that started
    it: its environment is every one's, workers included (their command line is Ray's
    process title)."""
    found = []
    for p in psutil.process_iter(["pid"]):
        try:
            if p.environ().get("RAY_TMPDIR") == tmp and p.pid != driver:
                found.append(" ".join(p.cmdline())[:100])
        except (psutil.NoSuchProcess, psutil.AccessDenied):  # gone, or a zombie
            pass
    return found


def left_after(tmp: str, seconds: float = 15.0) -> list[str]:
    """The cluster's processes still there ``seconds`` after the run ended (a worker notices
    its raylet's end within about a second)."""
    deadline = time.time() + seconds
    while (left := cluster_processes(tmp)) and time.time() < deadline:
        time.sleep(0.5)
    return left


def started(tmp: str) -> bool:
    return any(Path(tmp).glob("ray/session_2*"))


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_a_config_its_checks_refuse_stops_the_cluster_begun_for_it(assets, tmp_path, ray_tmp):
    config = write_config(tiny_config(assets, tmp_path / "run"), tmp_path / "run.yaml")
    proc = subprocess.run([sys.executable, "-m", "pipeline", "run", str(config), "train.beta=-1"],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ, RAY_TMPDIR=ray_tmp))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "error: train.beta: must be > 0" in proc.stderr, proc.stderr[-3000:]
    assert started(ray_tmp)  # Ray had begun before the checks
    assert not left_after(ray_tmp)
    assert not (tmp_path / "run" / "tokenize").exists()


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_a_sigterm_while_ray_starts_leaves_no_process_of_it(assets, tmp_path, ray_tmp):
    config = write_config(tiny_config(assets, tmp_path / "run"), tmp_path / "run.yaml")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, RAY_TMPDIR=ray_tmp))
    deadline = time.time() + 60
    while not cluster_processes(ray_tmp, proc.pid) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert cluster_processes(ray_tmp, proc.pid) and proc.poll() is None  # Ray's first processes are up (the GCS)
    proc.send_signal(signal.SIGTERM)  # as `ray job stop` or a scheduler ends a job
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == signal.SIGTERM, err[-3000:]  # the handler's exit: the cluster stopped first
    assert "Traceback" not in err, err[-3000:]
    assert not left_after(ray_tmp)


def test_only_a_private_local_cluster_on_the_main_thread_begins_early(monkeypatch):
    """Joining a cluster by its address is quick (one that does not answer would keep the
    run's end waiting for it), and Ray's SIGTERM handler can be set from the main thread only."""
    import threading

    from cluster import ray_cluster
    from pipeline.core.config import ClusterConfig

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ray_cluster.connect_early(ClusterConfig(address="10.0.0.1:6379"))
    assert not ray_cluster._early
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    ray_cluster.connect_early(ClusterConfig())
    assert not ray_cluster._early
    monkeypatch.delenv("RAY_ADDRESS")
    off_main = threading.Thread(target=ray_cluster.connect_early, args=(ClusterConfig(),))
    off_main.start()
    off_main.join()
    assert not ray_cluster._early
