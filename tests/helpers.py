"""Shared test helpers (imported by test modules as ``from helpers import ...``); the
fixtures live in conftest.py."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from pipeline.core.config import config_from_dict, dump_yaml


class FastTierViolation(RuntimeError):
    """Raised by conftest's guard when a test outside the slow tier starts a process."""


def tiny_config(assets, run_dir, data_file=None, **groups):
    """The demo config, pointed at the session's assets; ``groups`` update sub-configs."""
    raw = {
        "run_dir": str(run_dir),
        "model": {"path": str(assets["model"])},
        "data": {"train_files": [str(data_file or assets["data"])], "eval_fraction": 0.1},
        "tokenize": {"max_length": 64, "max_tokens_per_row": 1024, "rows_per_shard": 32,
                     "rows_per_task": 1000, "actors": 2},
        "score": {"actors": 2},
        "train": {"learning_rate": 1e-3, "lr_scheduler_type": "cosine", "min_lr_ratio": 0.1,
                  "warmup_ratio": 0.05, "eval_steps": 20, "num_workers": 2},
        "cluster": {"num_cpus": 2},
    }
    for group, values in groups.items():
        raw.setdefault(group, {}).update(values)
    return config_from_dict(raw)


def write_config(cfg, path: Path) -> Path:
    """The config as the YAML file a user would write."""
    path.write_text(dump_yaml(cfg))
    return path


def run_cli(config: Path, *args: str, command: str = "run", env: dict | None = None, ray: bool = False,
            timeout: float = 540, check: bool = True) -> subprocess.CompletedProcess:
    """``python -m pipeline COMMAND CONFIG [--no-ray] ARGS`` in a subprocess, as a user runs it.
    ``check``: fail the test (with the command's stderr) on a non-zero exit."""
    cmd = [sys.executable, "-m", "pipeline", command, str(config)]
    if command == "run" and not ray:
        cmd.append("--no-ray")
    proc = subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=timeout,
                          env=None if env is None else dict(os.environ, **env))
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def agent_ports() -> list[str]:
    """Ports of a node's own agents. Ray's defaults are fixed numbers (the job agent's is
    52365): a second node on this machine, or the test session's own Ray cluster, already
    holds them, and the job agent that cannot bind leaves `ray job submit` answering
    "No available agent" for ever."""
    from pipeline.training.engine import free_port

    return [f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}"]


def train_dir(cfg) -> Path:
    """The train stage's output directory for ``cfg`` (its fingerprint's folder)."""
    from pipeline import runner

    return Path(runner.plan_stages(cfg)["train"].dir)


def train_metrics(cfg) -> list[dict]:
    """The records of the train stage's metrics.jsonl, in order (a local or URI run dir)."""
    from pipeline import runner
    from pipeline.training.metrics import read_metrics

    return read_metrics(runner.plan_stages(cfg)["train"].dir)


def run_and_read_metrics(cfg, tmp_path: Path, *args: str, **kwargs) -> list[dict]:
    """Write ``cfg`` as YAML, run the pipeline on it in a subprocess (one rank, no Ray),
    and return the train metrics."""
    run_cli(write_config(cfg, tmp_path / f"{Path(cfg.run_dir).name}.yaml"), *args, **kwargs)
    return train_metrics(cfg)


def biased_qwen2(assets, tmp_path) -> Path:
    """A tiny Qwen2 (biases on q/k/v, set large so they matter) with the demo tokenizer, bf16."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(assets["model"])
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(std=0.5)
    model_dir = tmp_path / "qwen2-tiny"
    model.to(torch.bfloat16).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    return model_dir


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


def hub_cache(hub_cache_dir: Path, repo: str, files_dir: Path, refs: tuple[str, ...] = ("main",)) -> str:
    """Put ``files_dir`` into a Hugging Face Hub cache (``HF_HUB_CACHE``) as ``huggingface_hub``
    lays out a downloaded snapshot: ``models--org--name/blobs/<etag>`` (the sha256 of an LFS
    file such as weights, the git blob sha1 of any other), ``snapshots/<commit>/<file>``
    relative symlinks to the blobs, and ``refs/<revision>`` holding the commit. The commit is
    the hash of the files, as a git commit's is of its tree. Returns the commit."""
    import hashlib

    files = sorted(f for f in files_dir.rglob("*") if f.is_file())
    commit = hashlib.sha1(b"".join(hashlib.sha256(f.read_bytes()).digest() for f in files)).hexdigest()
    repo_dir = hub_cache_dir / ("models--" + repo.replace("/", "--"))
    for f in files:
        data = f.read_bytes()
        lfs = f.suffix in (".safetensors", ".bin")
        etag = hashlib.sha256(data).hexdigest() if lfs else \
            hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        blob = repo_dir / "blobs" / etag
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo_dir / "snapshots" / commit / f.relative_to(files_dir)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo_dir / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / ref).write_text(commit)
    return commit
