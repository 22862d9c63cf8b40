"""Shared fixtures: demo assets built once, one Ray cluster per test session, and the
guard of the test tiers.

The cluster is started with ``address="local"`` (a private cluster, never a leftover one
on the machine) and every pipeline run in the session reuses it.

Tiers: a test that starts Ray or a subprocess is marked ``slow``; ``make test-fast`` runs
the others (``-m "not slow"``). A test outside the slow tier that starts either fails,
naming itself, so the fast tier stays fast. Helpers shared by test modules are in
helpers.py.
"""

import os
import subprocess
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")

from helpers import FastTierViolation  # noqa: E402
from pipeline.demo import make_assets  # noqa: E402

try:  # matplotlib builds its font cache with fc-list on first import: once, here, not in a test
    import matplotlib.font_manager  # noqa: F401
except ImportError:
    pass


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> dict[str, Path]:
    return make_assets(tmp_path_factory.mktemp("assets"))


@pytest.fixture(scope="session")
def tokenizer(assets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(assets["model"])


S3_BUCKET = "pipeline-test"


@pytest.fixture(scope="session")
def s3_bucket():
    """A standalone S3-compatible server (moto's, in a thread) on 127.0.0.1 with one bucket,
    reached the way users reach MinIO or Ceph: ``AWS_ENDPOINT_URL_S3`` and credentials in
    the environment, which pyarrow's S3 filesystem reads. Ray's workers inherit them (the
    Ray fixture starts after this one)."""

    from moto.server import ThreadedMotoServer
    from pyarrow import fs

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL_S3": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    filesystem, bucket = fs.FileSystem.from_uri(f"s3://{S3_BUCKET}?allow_bucket_creation=true")
    filesystem.create_dir(bucket)
    yield f"s3://{S3_BUCKET}"
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture(scope="session")
def ray_cluster(s3_bucket):
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        object_store_memory=512 * 1024**2,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
    )
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(autouse=True)
def _fast_tier_starts_no_process(request, monkeypatch):
    if request.node.get_closest_marker("slow"):
        return

    def refuse(*args, **kwargs):
        raise FastTierViolation(f"{request.node.nodeid} started a subprocess or Ray but is not marked "
                                f"slow: mark it @pytest.mark.slow (the fast tier starts neither)")

    if "ray_cluster" in request.fixturenames:
        refuse()
    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
    try:
        import ray
    except ImportError:  # nothing to guard
        return
    monkeypatch.setattr(ray, "init", refuse)
