"""TR-DPO's reference refresh in the ranks: a step hook of the preference objective.

Every ``every`` (τ) steps, after the optimizer's step, the reference held by the ranks
(``reference.py``) becomes α·π_θ + (1 − α)·π_ref, each rank on its own partition, and
each rank scores with it the rows it trains on until the next refresh, and its eval rows.
Those scores replace the stored reference column of those rows (``RescoredRows``); every
other row reads the score stage's column, which is the reference before any refresh. So
over an epoch each train row is scored once, by the reference its step trains against
(docs/tr-dpo.md).

TRL's ``SyncRefModelCallback`` syncs at the end of a step whose number τ divides, before
that step's eval: ``after_step`` runs at the same moment, so the eval at a refresh step
reads the new reference, as TRL's does.

The reference's partitions are saved with each checkpoint (after the first refresh), so a
resumed run continues from the reference of its step, on the same worker count or another
(each rank reassembles its new slice of every parameter from the old partitions).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from pipeline.core.packing import eval_plan
from pipeline.core.storage import Loc

from .checkpoints import checkpoint_to_resume
from .plan import planned_steps
from .reference import build_reference, mix_policy_into, score_row

REFERENCE_DIR = "reference"  # in a checkpoint's folder: each rank's partition of the reference


def partition_file(rank: int) -> str:
    """A rank's reference partition in a checkpoint; named as ZeRO names a rank's files, so
    a rank fetching its own part of a checkpoint (``checkpoints.rank_files``) fetches this too."""
    return f"{REFERENCE_DIR}/zero_pp_rank_{rank}_reference.pt"


class RescoredRows:
    """Packed rows whose reference column is replaced, for the rows in ``values``, by their
    scores under the refreshed reference; every other row as stored."""

    def __init__(self, rows, column: str):
        self.rows, self.column, self.values = rows, column, {}
        self.num_rows = rows.num_rows

    def read_column(self, name: str) -> list:
        if name == self.column:
            raise ValueError(f"{name} is rescored row by row; read it through the rows")
        return self.rows.read_column(name)

    def __getitem__(self, row: int) -> dict:
        stored = self.rows[row]
        if row in self.values:
            return {**stored, self.column: self.values[row]}
        if stored[self.column] is None:  # the score stage scored the first segment's rows only
            raise RuntimeError(f"train: row {row} has no {self.column}: the score stage scored the rows of another "
                               "first TR-DPO segment, and no refresh rescored it (rescore: --from score --force)")
        return stored


class ReferenceRefresh:
    """The step hook that refreshes the reference every ``every`` steps with ``alpha``."""

    def __init__(self, alpha: float, every: int, column: str = "ref_logps"):
        self.alpha, self.every, self.column = alpha, every, column
        self.reference = None  # built in the rank by ``start``

    def __getstate__(self) -> dict:  # the settings travel to the ranks, never a built engine
        return {"alpha": self.alpha, "every": self.every, "column": self.column, "reference": None}

    def start(self, engine, ctx, done: int) -> None:
        """Build the reference (the model the score stage scored with), partitioned; on a
        resume past a refresh, load the reference of that step and rescore the rows of the
        segment's remaining steps. A run resumed with every step done (its export failed)
        trains nothing more: no reference."""
        if done >= ctx.total_steps or ctx.total_steps < self.every:  # nothing left to train, or no refresh to come
            return
        with torch.random.fork_rng(devices=[ctx.device] if ctx.device.type == "cuda" else []):
            # loading draws from the RNG (weights initialised, then overwritten): the policy's steps must not see it
            self.reference = build_reference(ctx.train_cfg, ctx.cfg.model, ctx.cfg.reference_path, ctx.world,
                                             ctx.device)
        ctx.train_rows = RescoredRows(ctx.train_rows, self.column)
        ctx.eval_rows = RescoredRows(ctx.eval_rows, self.column)
        if done >= self.every:
            load_partitions(self.reference, checkpoint_to_resume(ctx.train_cfg, ctx.out, ctx.stage), ctx)
            self.rescore(ctx, done)

    def after_step(self, engine, ctx, step: int) -> dict | None:
        """At a refresh step: mix, rescore, and return the record the metrics log."""
        if step % self.every:
            return None
        t0 = time.time()
        mixed = _all_ranks(mix_policy_into(self.reference, engine, self.alpha), "SUM", ctx.device)
        forwards = self.rescore(ctx, step)
        return {"step": step, "reference_refresh": step // self.every, "refresh_seconds": time.time() - t0,
                "rescored_rows": forwards, "mixed_elements": mixed}

    def save(self, ctx, folder: Path, step: int) -> None:
        """This rank's partition of the reference, beside its ZeRO files (none before the
        first refresh: the reference is then the model the run started from)."""
        if step < self.every:
            return
        path = Path(folder) / partition_file(ctx.rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        params = {name: p.ds_tensor.detach().cpu().clone() for name, p in self.reference.module.named_parameters()}
        torch.save({"world_size": ctx.world, "params": params}, path)

    def rescore(self, ctx, done: int) -> int:
        """Score, with the reference as it is, this rank's rows of the steps after ``done`` up
        to the next refresh, and its eval rows. Returns the rows each rank scored, summed
        (a row two ranks both train on in the segment counts twice)."""
        end = min((done // self.every + 1) * self.every, ctx.total_steps)
        mine = [mb.row for _, plan in planned_steps(ctx.train_rows.num_rows, ctx.world,
                                                   ctx.train_cfg.gradient_accumulation_steps, ctx.train_cfg.seed,
                                                   end, done)
                for mb in plan[ctx.rank]]
        ctx.train_rows.values = self._score(ctx, ctx.train_rows, mine)
        ctx.eval_rows.values = self._score(ctx, ctx.eval_rows, [mb.row for mb in
                                                                 eval_plan(ctx.eval_rows.num_rows, ctx.world)[ctx.rank]])
        return _all_ranks(len(ctx.train_rows.values) + len(ctx.eval_rows.values), "SUM", ctx.device)

    def _score(self, ctx, rows: RescoredRows, wanted: list[int]) -> dict:
        """Each row once. Every rank runs as many forwards as the rank with the most rows
        (the reference's forward gathers parameters collectively): the others score a row
        again and drop it."""
        unique = list(dict.fromkeys(wanted))
        count = _all_ranks(len(unique), "MAX", ctx.device)
        if count == 0:
            return {}
        stored = rows.rows
        scores = {}
        for i in range(count):
            row = unique[i] if i < len(unique) else (unique[0] if unique else 0)
            logps, _ = score_row(self.reference, stored[row])
            if i < len(unique):
                scores[row] = logps
        return scores


def load_partitions(reference, checkpoint: Loc, ctx) -> None:
    """The reference's partitions from ``checkpoint`` into this rank's: its own file when
    the checkpoint was written by this worker count; otherwise this rank's slice of each
    parameter, reassembled from the old ranks' partitions that hold part of it (ZeRO-3 cuts
    a parameter's flat elements, padded to a multiple of the ranks, into equal consecutive
    parts). Files in a bucket are fetched to scratch, read memory-mapped, then removed."""
    import json
    import shutil

    from .checkpoints import COMPLETE

    written_by = json.loads((checkpoint / COMPLETE).read_text())["world_size"]
    params = list(reference.module.named_parameters())
    needed = sorted({j for _, p in params for j in old_ranks(p.ds_numel, written_by, ctx.rank, ctx.world)})
    files = {j: checkpoint / partition_file(j) for j in needed}
    missing = [str(f) for f in files.values() if not f.is_file()]
    if _all_ranks(len(missing), "SUM", ctx.device):  # every rank refuses, none waits in a collective
        raise FileNotFoundError(f"checkpoint {checkpoint}: the reference partitions of its TR-DPO refreshes are "
                                f"missing ({', '.join(missing) or 'on another rank'}); it cannot resume the refreshed "
                                f"reference (start a new run with --force)")
    scratch = ctx.out_dir / "reference-resume"
    try:
        old = {}
        for j, f in files.items():
            if f.remote:
                f.download(scratch / f.name)
            old[j] = torch.load(scratch / f.name if f.remote else f.local, weights_only=True, map_location="cpu",
                                mmap=True)["params"]
        with torch.no_grad():
            for name, p in params:
                part = p.ds_tensor.data.view(-1)
                lo, hi = ctx.rank * part.numel(), min((ctx.rank + 1) * part.numel(), p.ds_numel)
                size = -(-p.ds_numel // written_by)  # an old rank's part: the padded numel / its ranks
                pos = lo
                while pos < hi:
                    j, offset = divmod(pos, size)
                    take = min(hi - pos, size - offset)
                    part[pos - lo:pos - lo + take].copy_(old[j][name].view(-1)[offset:offset + take])
                    pos += take
    finally:
        old = None
        shutil.rmtree(scratch, ignore_errors=True)


def old_ranks(numel: int, written_by: int, rank: int, world: int) -> range:
    """The ranks of ``written_by`` whose partition of a parameter of ``numel`` elements
    holds part of what ``rank`` of ``world`` holds."""
    size, new = -(-numel // written_by), -(-numel // world)
    lo, hi = rank * new, min((rank + 1) * new, numel)
    return range(lo // size, (hi - 1) // size + 1) if hi > lo else range(0)


def _all_ranks(n: int, op: str, device: torch.device) -> int:
    import torch.distributed as dist

    if not dist.is_initialized():
        return n
    t = torch.tensor([n], dtype=torch.int64, device=device)  # NCCL reduces device tensors only
    dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
    return int(t.item())
