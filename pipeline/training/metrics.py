"""Training metrics: sums over a step's units, reduced across ranks into means, and the
log they go to (metrics.jsonl, TensorBoard and the configured trackers, rank 0 only)."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict

import torch

from pipeline.core.rundir import atomic_write_text

from .objective import RowLoss

METRICS_FILE = "metrics.jsonl"
RUN_PREFIX = {"train": "dpo"}  # a tracker run is named <prefix>-<fingerprint>, the stage's name otherwise


class MetricSums:
    """Sums over units (a preference objective's pairs); all-reduced across ranks before
    they become means. Counts: rows, units, tokens; sums: ``aux_loss`` and the objective's
    metrics.

    The sums stay on the run's device until ``reduce``: adding a micro-batch never waits
    for its kernels (no ``.item()`` per micro-batch), and the all-reduce gets a tensor of
    the device NCCL needs."""

    def __init__(self, unit: str, metric_names: tuple[str, ...], device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.count_names = ("rows", unit, "tokens", "flops")  # known on the host
        self.sum_names = ("aux_loss",) + tuple(metric_names)  # summed on the device
        self.counts = dict.fromkeys(self.count_names, 0)
        self.sums = torch.zeros(len(self.sum_names), dtype=torch.float64, device=self.device)

    def add(self, out: RowLoss, weight: float, flops: int = 0) -> None:
        """``flops``: the model FLOPs the row cost (``pipeline.core.flops``), for mfu."""
        if weight == 0.0:  # a filler that only keeps the ranks in lock-step
            return
        for name, n in zip(self.count_names, (1, out.units, out.tokens, flops)):
            self.counts[name] += n
        values = dict(out.metric_sums)
        values["aux_loss"] = (out.aux_loss.detach().double() * out.units if out.aux_loss is not None  # unit-weighted
                              else torch.zeros((), dtype=torch.float64, device=out.loss_sum.device))
        self.sums += torch.stack([values[k] for k in self.sum_names]).to(self.device)

    def reduce(self, prefix: str = "") -> dict:
        import torch.distributed as dist

        counts = torch.tensor([float(self.counts[k]) for k in self.count_names], dtype=torch.float64)
        vec = torch.cat([counts.to(self.device), self.sums])
        if dist.is_initialized():
            dist.all_reduce(vec)
        total = dict(zip(self.count_names + self.sum_names, vec.tolist()))
        n = max(total[self.count_names[1]], 1.0)
        out = {f"{prefix}{k}": total[k] / n for k in self.sum_names}
        out.update({f"{prefix}{k}": int(total[k]) for k in self.count_names})
        if total["aux_loss"] == 0.0:  # a dense model: no router loss to report
            del out[f"{prefix}aux_loss"]
        if total["flops"] == 0.0:  # not counted (eval): nothing to make an mfu of
            del out[f"{prefix}flops"]
        return out


class MetricsLog:
    """metrics.jsonl and TensorBoard scalars (rank 0), and a progress line per logged step.

    With a URI run directory both are written locally and uploaded by ``sync`` (at each
    checkpoint and at the end); ``fetch`` brings the uploaded metrics back on resume."""

    def __init__(self, ctx):
        from pipeline.core.tracking import Trackers

        self.ctx, self.start = ctx, time.time()
        self.window: list[dict] = []  # the steps since the last logged one
        self.num_tokens = 0  # tokens trained on so far, all ranks (TRL's num_tokens), restored on resume
        self.path = ctx.out_dir / METRICS_FILE
        self.trackers = None
        if ctx.rank == 0:
            train_cfg = ctx.train_cfg
            config = {"model": asdict(ctx.cfg.model), ctx.stage: asdict(train_cfg)}
            self.trackers = Trackers(train_cfg.report_to, ctx.out_dir,
                                     train_cfg.run_name or f"{RUN_PREFIX.get(ctx.stage, ctx.stage)}-{ctx.out.name}", ctx.out.name, config)

    def flush(self) -> dict | None:
        """Write the window's record; returns it (None for an empty window)."""
        if not self.window:
            return None
        record = window_record(self.window, ("rows", self.ctx.objective.unit, "tokens"))
        self.window = []
        self.write(record)
        return record

    def write(self, record: dict) -> None:
        if self.ctx.rank == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            self.trackers.log(record)

    def close(self) -> None:
        if self.trackers is not None:
            self.trackers.close()

    def sync(self) -> None:
        self.flush()  # a checkpoint's (or the end's) steps are all logged before it is marked
        ctx = self.ctx
        if ctx.rank == 0 and ctx.staged:
            if self.path.exists():
                (ctx.out / METRICS_FILE).upload(self.path)
            if (ctx.out_dir / "tensorboard").is_dir():
                (ctx.out / "tensorboard").upload(ctx.out_dir / "tensorboard")

    def fetch(self) -> None:
        remote = self.ctx.out / METRICS_FILE
        if self.ctx.rank == 0 and self.ctx.staged and remote.is_file():
            remote.download(self.path)

    def truncate_after(self, step: int) -> None:
        """On resume: drop what was logged after the checkpoint (it is logged again)."""
        if self.ctx.rank == 0 and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= step]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
            self.num_tokens = max([json.loads(line).get("num_tokens", 0) for line in kept], default=0)

    def step(self, m: dict) -> None:
        """Log every ``logging_steps`` steps (and the first and the last) the window's
        means, as TRL does, with its counts summed: no step goes uncounted."""
        every, total = self.ctx.train_cfg.logging_steps, self.ctx.total_steps
        self.num_tokens += m["tokens"]
        self.window.append(dict(m, num_tokens=self.num_tokens))
        if m["step"] % every and m["step"] not in (1, total):
            return
        m = self.flush()
        if self.ctx.rank == 0:
            eta = (time.time() - self.start) / m["step"] * (total - m["step"])
            say(f"[{self.ctx.stage}] step {m['step']}/{total} loss {m['loss']:.4f} acc {m[self.ctx.objective.accuracy]:.3f} "
                f"tok/s {m['tokens_per_second']:.0f}" + (f" mfu {m['mfu']:.1%}" if "mfu" in m else "") + f" eta {eta:.0f}s")


def window_record(window: list[dict], counts: tuple[str, ...]) -> dict:
    """One record for several steps: the counts summed, the step, epoch and learning rate of
    the last step, throughput over the window, every other metric the mean of the steps'."""
    last = window[-1]
    record = {}
    for key, value in last.items():
        if key in counts:
            record[key] = sum(r[key] for r in window)
        elif key in ("step", "epoch", "learning_rate", "num_tokens") or not isinstance(value, (int, float)):
            record[key] = value
        elif key == "tokens_per_second":
            seconds = sum(r["tokens"] / r[key] for r in window if r[key])
            record[key] = sum(r["tokens"] for r in window) / seconds if seconds else value
        elif key == "mfu":  # over the window's seconds, as the throughput
            seconds = [r["tokens"] / r["tokens_per_second"] if r["tokens_per_second"] else 0.0 for r in window]
            record[key] = sum(r[key] * t for r, t in zip(window, seconds)) / sum(seconds) if sum(seconds) else value
        else:
            record[key] = sum(r[key] for r in window) / len(window)
    return record


def say(line: str) -> None:
    """A progress line on the rank's stdout, flushed at once (Ray forwards a worker's
    stdout to the driver line by line)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def read_metrics(out) -> list[dict]:
    from pipeline.core.storage import Loc

    path = Loc(out) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
