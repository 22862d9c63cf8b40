"""Connecting to Ray: an explicit address, RAY_ADDRESS, or a private local cluster.

A bare ``ray.init()`` joins whatever cluster is running on the machine; the pipeline never
does that by accident. The address in use is printed.
"""

from __future__ import annotations

import os

from pipeline.core.config import ClusterConfig


# A local cluster this process starts stops when the process exits (Ray's atexit
# shutdown): a ray.shutdown() called earlier raced the driver's Ray Data threads (when
# tokenize and score ran on Ray Data), one of which then found the core worker gone and Ray
# ended the process with exit code 1 (seen once in 9 runs of bench/startup_cost.py).


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
        log(f"[ray] started a local cluster at {ray.get_runtime_context().gcs_address}")
    return ray.get_runtime_context().gcs_address
