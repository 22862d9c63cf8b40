"""``Host.alive``: whether the raylet that started a worker process still runs. Real
processes stand in for the raylet (no Ray needed): one is SIGKILLed and the worker must
say so at once, where Ray's own check leaves the worker answering calls for a second or
more (tests/test_multinode.py loses a real node's raylet)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.host import Host

REPO = Path(__file__).resolve().parents[1]

# the worker: a Host whose raylet (RAY_RAYLET_PID, as Ray sets it) is its parent; it says
# what it sees, waits for a line, and says it again
WORKER = """
import os, sys
os.environ["RAY_RAYLET_PID"] = str(os.getppid())
from cluster.host import Host
h = Host()
print(h.child, h.alive(), flush=True)
sys.stdin.readline()
print(h.alive(), flush=True)
"""


@pytest.mark.slow  # processes, though a second's worth
def test_a_worker_whose_raylet_is_killed_says_so_at_once():
    # the stand-in raylet starts the worker as its child, as a raylet does, and waits
    raylet = subprocess.Popen(
        [sys.executable, "-c", f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {WORKER!r}]).wait()"],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert raylet.stdout.readline().split() == ["True", "True"]  # its child, and it runs
        os.kill(raylet.pid, signal.SIGKILL)
        raylet.wait()
        raylet.stdin.write("\n")
        raylet.stdin.flush()
        assert raylet.stdout.readline().strip() == "False"  # reparented: gone, no second's wait
    finally:
        raylet.kill()


@pytest.mark.slow
def test_a_worker_not_started_by_its_raylet_looks_its_pid_up(monkeypatch):
    # under uv, a container or a wrapper the raylet is not the parent: its pid is looked up
    raylet = subprocess.Popen(["sleep", "60"])
    monkeypatch.setenv("RAY_RAYLET_PID", str(raylet.pid))
    h = Host()
    assert not h.child and h.alive()
    raylet.kill()
    deadline = time.time() + 10
    while Path(f"/proc/{raylet.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.time() < deadline
        time.sleep(0.01)
    assert not h.alive()  # dead, not yet reaped (a zombie): dead
    raylet.wait()
    assert not h.alive()  # reaped: no such process


def test_a_worker_outside_ray_is_alive(monkeypatch):
    monkeypatch.delenv("RAY_RAYLET_PID", raising=False)
    assert Host().alive()


def test_a_worker_builds_with_the_collector_paused_and_on_again_after_even_when_it_fails():
    import gc

    from pipeline.core.placement import starting

    seen = []

    class Worker:
        def __init__(self, fail: bool):
            seen.append(gc.isenabled())
            if fail:
                raise ValueError("no tokenizer")

    host = Host()
    assert gc.isenabled()
    host.build(Worker, {"fail": False})
    with pytest.raises(ValueError, match="no tokenizer"):
        host.build(Worker, {"fail": True})
    assert seen == [False, False] and gc.isenabled()
    gc.disable()  # a process that had it off keeps it off
    try:
        with starting():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
