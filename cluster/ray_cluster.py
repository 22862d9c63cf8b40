"""Connecting to Ray: an explicit address, RAY_ADDRESS, or a private local cluster.

A bare ``ray.init()`` joins whatever cluster is running on the machine; the pipeline never
does that by accident. The address in use is printed.
"""

from __future__ import annotations

import contextlib
import os

from pipeline.core.config import ClusterConfig


# The local cluster this process started. It stops when the process exits (Ray's atexit
# shutdown): a ray.shutdown() called earlier races the driver's Ray Data and Ray Train
# threads, one of which then finds the core worker gone and Ray ends the process with exit
# code 1 (seen once in 9 runs of bench/startup_cost.py).
_STARTED = []


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
        _STARTED.append(ray.get_runtime_context().gcs_address)
        log(f"[ray] started a local cluster at {ray.get_runtime_context().gcs_address}")
    return ray.get_runtime_context().gcs_address


@contextlib.contextmanager
def ray_train_env(user_env: dict | None = None):
    """Ray Train's settings for a training stage's ranks, where the user's environment does
    not give them (the driver's values reach its controller), for the stage's duration:
    - RAY_TRAIN_HEALTH_CHECK_INTERVAL_S 0.5 (Ray's default 2): the controller polls its
      ranks that often, so a stage's end was seen up to 2 s late; a poll is a small RPC a rank;
    - on the private local cluster ``connect`` started, RAY_TRAIN_ENABLE_PREEMPTION_WATCHER 0:
      the watcher of nodes being drained (spot preemption) is one more process to start with
      every training stage, and this cluster's one node is never drained.
    ``user_env``: the variables the run gives its workers (``cluster.runtime_env``'s
    ``env_vars``), which these defaults do not override."""
    import ray

    defaults = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
    if _STARTED and ray.is_initialized() and ray.get_runtime_context().gcs_address == _STARTED[-1]:
        defaults["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
    added = [k for k in defaults if k not in os.environ and k not in (user_env or {})]
    os.environ.update({k: defaults[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)
