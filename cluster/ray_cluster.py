"""Connecting to Ray: an explicit address, RAY_ADDRESS, or a private local cluster.

A bare ``ray.init()`` joins whatever cluster is running on the machine; the pipeline never
does that by accident. The address in use is printed.
"""

from __future__ import annotations

import os

from pipeline.core.config import ClusterConfig


# A local cluster this process starts stops when the process exits (Ray's atexit
# shutdown): a ray.shutdown() called earlier races the driver's Ray Data threads, one of
# which then finds the core worker gone and Ray ends the process with exit code 1 (seen
# once in 9 runs of bench/startup_cost.py).


def connect(cfg: ClusterConfig, log=print) -> str:
    import ray

    # Ray Data's progress bars for tokenize and score (rows done, rows/s, per operator).
    ray.data.DataContext.get_current().enable_progress_bars = cfg.progress_bars
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
            # The dashboard serves the state API that Ray Train's placement-group cleaner
            # polls (without it, it logs a warning every second); loopback only.
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            **kwargs,
        )
        log(f"[ray] started a local cluster at {ray.get_runtime_context().gcs_address}")
    return ray.get_runtime_context().gcs_address
