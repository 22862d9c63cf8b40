"""Connecting to Ray: an explicit address, RAY_ADDRESS, or a private local cluster.

A bare ``ray.init()`` joins whatever cluster is running on the machine; the pipeline never
does that by accident. The address in use is printed.
"""

from __future__ import annotations

import os

from pipeline.core.config import ClusterConfig


_started_here = False  # this process started the local cluster it is connected to


def stop_local() -> None:
    """Stop the local cluster this process started (its raylet, GCS, dashboard...), once no
    stage needs it: a cluster the pipeline joined is left alone. Ray's own stop at the
    process's exit first sleeps 0.5 s for log lines, then stops the processes one after
    another (up to 1 s each): called beside the report instead, it is over when the report
    is. (While tokenize and score ran on Ray Data, a stop before the exit raced Ray Data's
    threads on the driver: Ray ended the process with exit code 1, once in 9 bench runs.)"""
    global _started_here
    import ray

    if _started_here and ray.is_initialized():
        ray.shutdown()
    _started_here = False


def connect(cfg: ClusterConfig, log=print) -> str:
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context().gcs_address
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    kwargs = dict(runtime_env=cfg.runtime_env or None, log_to_driver=True)
    if address and address != "local":
        ray.init(address=address, **kwargs)
        log(f"[ray] connected to cluster at {ray.get_runtime_context().gcs_address}")
    else:
        ray.init(
            address="local",
            num_cpus=cfg.num_cpus,
            object_store_memory=cfg.object_store_memory,
            # The dashboard, on loopback only: a local run's actors and logs to look at (off, a
            # demo run was no faster on 2 cores: 27.9-30.3 s against 29.6-31.6, #37).
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            **kwargs,
        )
        global _started_here
        _started_here = True
        log(f"[ray] started a local cluster at {ray.get_runtime_context().gcs_address}")
    return ray.get_runtime_context().gcs_address
