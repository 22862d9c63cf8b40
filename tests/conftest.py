"""Shared fixtures: demo assets built once, one Ray cluster per test session.

The cluster is started with ``address="local"`` (a private cluster, never a leftover one
on the machine) and every pipeline run in the session reuses it.
"""

import os
import signal
import threading
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")

from helpers import tiny_config  # noqa: E402,F401  (moving to helpers)
from pipeline.demo import make_assets  # noqa: E402


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> dict[str, Path]:
    return make_assets(tmp_path_factory.mktemp("assets"))


@pytest.fixture(scope="session")
def tokenizer(assets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(assets["model"])


@pytest.fixture(scope="session")
def ray_cluster():
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


class Killer(threading.Thread):
    """SIGKILLs the first process whose command line names ``name`` (a Ray actor's class)
    once ``ready()`` is true; ``killed`` holds its pid."""

    def __init__(self, name: str, ready, timeout: float = 300.0):
        super().__init__(daemon=True)
        self.name_in_cmdline, self.ready, self.timeout = name, ready, timeout
        self.killed: list[int] = []

    def run(self) -> None:
        import psutil

        deadline = time.time() + self.timeout
        while time.time() < deadline:
            if self.ready():
                pids = [p.pid for p in psutil.process_iter(["cmdline"])
                        if any(self.name_in_cmdline in part for part in (p.info["cmdline"] or []))]
                if pids:
                    os.kill(pids[0], signal.SIGKILL)
                    self.killed.append(pids[0])
                    return
            time.sleep(0.02)


def shared_and_unshared_rows(g, pairs):
    """The same random pairs of (prompt, chosen, rejected) lengths as one packed row twice,
    in the stored row format: unshared segments [P C][P R], and shared ones [P C][R]
    (tokenize.share_prompt)."""
    import torch

    unshared = {"input_ids": [], "position_ids": [], "seq_lens": [], "prompt_lens": []}
    shared = {"input_ids": [], "position_ids": [], "seq_lens": [], "prompt_lens": []}
    for p, c, r in pairs:
        prompt, chosen, rejected = (torch.randint(3, 500, (n,), generator=g).tolist() for n in (p, c, r))
        unshared["input_ids"] += prompt + chosen + prompt + rejected
        unshared["position_ids"] += list(range(p + c)) + list(range(p + r))
        unshared["seq_lens"] += [p + c, p + r]
        unshared["prompt_lens"] += [p, p]
        shared["input_ids"] += prompt + chosen + rejected
        shared["position_ids"] += list(range(p + c)) + list(range(p, p + r))
        shared["seq_lens"] += [p + c, r]
        shared["prompt_lens"] += [p, 0]
    return unshared, shared


def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale=None, enable_gqa=False):
    """The semantics of torch's ``varlen_attn`` with causal attention (flash attention's,
    aligned to the last key), written out in plain torch: the oracle for the CPU, where
    the flash kernel does not exist (tests/test_gpu.py runs the kernel itself)."""
    import torch

    outs = []
    for s in range(cu_q.numel() - 1):
        qs, ks, vs = (x[c[s]:c[s + 1]].transpose(0, 1).double()
                      for x, c in ((q, cu_q), (k, cu_k), (v, cu_k)))
        assert qs.shape[1] <= max_q and ks.shape[1] <= max_k
        if enable_gqa:
            ks, vs = (x.repeat_interleave(qs.shape[0] // x.shape[0], dim=0) for x in (ks, vs))
        scores = qs @ ks.transpose(1, 2) * (scale if scale is not None else qs.shape[-1] ** -0.5)
        keep = torch.ones(qs.shape[1], ks.shape[1], dtype=torch.bool, device=qs.device).tril(ks.shape[1] - qs.shape[1])
        outs.append((scores.masked_fill(~keep, float("-inf")).softmax(-1) @ vs).transpose(0, 1).to(q.dtype))
    return torch.cat(outs)
