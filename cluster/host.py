"""One warm worker process of a run (``cluster.workers``, ``cluster.rank_group``): a Ray
actor that builds the worker object a stage sends it (a tokenizer, a reference model), runs
items on it, drops it at the stage's end and stays up with its imports; or holds a training
rank (``where``, ``environ``, ``run``). And how to stop such actors and wait until they are."""

from __future__ import annotations

import gc
import os
import socket
import sys
import time
from typing import Any, Callable


class Host:
    def __init__(self):
        self.worker = None
        pid = os.environ.get("RAY_RAYLET_PID", "")  # set by Ray for the processes a raylet starts
        self.raylet = int(pid) if pid.isdigit() else None
        self.child = self.raylet == os.getppid()  # exec'd by it (not under uv, a container, a wrapper)

    def alive(self) -> bool:
        """Whether the raylet that started this process is: a worker whose raylet died (its
        node lost, say) still answers calls until its own check of it, once a second, ends it.
        Its child is reparented the moment it dies; otherwise its pid is looked up. (Only the
        raylet's death: a node cut off from the network looks alive, or does not answer.)"""
        if self.raylet is None:
            return True
        if self.child:
            return os.getppid() == self.raylet
        return _running(self.raylet)

    def build(self, factory: Callable, kwargs: dict) -> float:
        """Drop the last worker object, build this one; returns when it was ready."""
        from pipeline.core.placement import starting

        self.drop()
        with starting():  # no automatic collection while it builds (it settles once, when built)
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
        view once built (``placement.settle``): taken back first, or its cycles stay. On a GPU
        the allocator's cached blocks are given back too: the next stage's worker (vLLM's
        engine, say) counts them as used."""
        if self.worker is not None:
            self.worker = None
            gc.unfreeze()
            gc.collect()
            torch = sys.modules.get("torch")
            if torch is not None and torch.cuda.is_initialized():
                torch.cuda.empty_cache()


def _running(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: it exists
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:  # gone since
        return False
    except (OSError, IndexError):  # no /proc here: it exists
        return True


def _title(title: str) -> None:
    """The process's title while it works (``ps``, ``top``): ``ray::ShardScorer.score_item``
    rather than the generic ``ray::Host.call``; Ray sets it back after the call."""
    import ray

    set_title = getattr(getattr(ray, "_raylet", None), "setproctitle", None)
    if set_title is not None:
        set_title(f"ray::{title}")


def stop(actors: list, timeout: float = 10.0) -> None:
    """Kill the actors, and return once they are dead (their processes exit), so that what
    is placed next does not find their CPUs and GPUs (and a GPU's memory) still held; at
    most ``timeout`` seconds (0: kill only, as for an actor that died already)."""
    import ray
    from ray.exceptions import ActorUnavailableError, GetTimeoutError

    for a in actors:
        ray.kill(a, no_restart=True)
    deadline = time.time() + timeout
    for a in actors:
        while time.time() < deadline:
            try:
                ray.get(a.__ray_ready__.remote(), timeout=0.5)
            except (GetTimeoutError, ActorUnavailableError):  # busy in its function, or dying: not dead yet
                pass
            except Exception:  # noqa: BLE001 - dead, or never started (a runtime env that failed): gone
                break
            time.sleep(0.05)
