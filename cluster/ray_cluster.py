"""Connecting to Ray: an explicit address, RAY_ADDRESS, or a private local cluster.

A bare ``ray.init()`` joins whatever cluster is running on the machine; the pipeline never
does that by accident. The address in use is printed.

On a run that certainly needs Ray (``pipeline.cli``: a new run directory), a private local
cluster begins in a thread at the process's start (``connect_early``), beside the driver's
imports and config checks: a local cluster's start spends most of its 4-5 s waiting (for its API
server, in 0.1 s sleeps, then for its raylet, in a 1 s poll), not computing. ``connect``
then waits for it, and raises what it raised.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

from pipeline.core.config import ClusterConfig


_started_here = False  # this process started the local cluster it is connected to
_early: dict = {}  # connect_early's thread, its events, and what it raised


def stop_local() -> None:
    """Stop the local cluster this process started (its raylet, GCS, dashboard...), once no
    stage needs it: a cluster the pipeline joined is left alone. Ray's own stop at the
    process's exit first sleeps 0.5 s for log lines, then stops the processes one after
    another (up to 1 s each): called beside the report instead, it is over when the report
    is. (While tokenize and score ran on Ray Data, a stop before the exit raced Ray Data's
    threads on the driver: Ray ended the process with exit code 1, once in 9 bench runs.)
    A start begun early is waited for first (a run refused by its checks stops it here)."""
    global _started_here
    if _early:
        _early["ready"].wait()
    if _started_here:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    _started_here = False
    if _early:  # its thread may end now: the processes it started are gone
        _early["stop"].set()
        _early.pop("thread").join()
        _early.clear()


def connect_early(cfg: ClusterConfig) -> None:
    """Begin starting a private local cluster in a thread now; ``connect`` waits for it. Only
    that: joining a cluster by its address is quick, and one that does not answer would
    keep ``stop_local`` waiting; nor where Ray is connected already, or off the main thread.

    - The thread lives until ``stop_local``: Ray starts the cluster's processes with
      PR_SET_PDEATHSIG, which kills them when the *thread* that started them ends.
    - Ray sets its SIGTERM handler (exit, so that its exit hook stops the cluster) only from
      the main thread: it is set here."""
    if (_early or _address(cfg) != "local"
            or threading.current_thread() is not threading.main_thread()
            or ("ray" in sys.modules and sys.modules["ray"].is_initialized())):
        return
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))
    worker_log = logging.getLogger("ray._private.worker")  # its warning, from the thread, that it did not set it
    if not any(isinstance(f, _NoSigtermWarning) for f in worker_log.filters):
        worker_log.addFilter(_NoSigtermWarning())
    ready, stop = threading.Event(), threading.Event()

    def start():
        try:
            _init(cfg)
        except BaseException as e:  # raised again by connect, on the main thread
            _early["error"] = e
        ready.set()
        stop.wait()

    # a daemon: a process that ends without stop_local (an exception's exit) does not wait for it
    _early.update(ready=ready, stop=stop, thread=threading.Thread(target=start, name="ray-start", daemon=True))
    _early["thread"].start()


class _NoSigtermWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "SIGTERM handler" not in record.getMessage()


def connect(cfg: ClusterConfig, log=print) -> str:
    import ray

    if _early and not _early.get("connected"):  # begun early: wait for it
        _early["ready"].wait()
        if "error" in _early:
            raise _early["error"]
        _early["connected"] = True
    elif ray.is_initialized():
        return ray.get_runtime_context().gcs_address
    else:
        _init(cfg)
    address = ray.get_runtime_context().gcs_address
    log(f"[ray] {'started a local cluster' if _started_here else 'connected to cluster'} at {address}")
    return address


def _address(cfg: ClusterConfig) -> str:
    """The cluster to join, or "local": a private one of this process's own."""
    return cfg.address or os.environ.get("RAY_ADDRESS") or "local"


def _init(cfg: ClusterConfig) -> str:
    import ray

    address = _address(cfg)
    kwargs = dict(runtime_env=cfg.runtime_env or None, log_to_driver=True)
    if address != "local":
        ray.init(address=address, **kwargs)
    else:
        ray.init(
            address="local",
            num_cpus=cfg.num_cpus,
            object_store_memory=cfg.object_store_memory,
            include_dashboard=cfg.dashboard,  # on loopback only
            dashboard_host="127.0.0.1",
            **kwargs,
        )
        global _started_here
        _started_here = True
    return ray.get_runtime_context().gcs_address
