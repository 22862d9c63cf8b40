"""Deterministic packing of pairs into token-budget rows, the train/eval split, and the
per-epoch micro-batch plan. numpy only.

Packing runs on the driver over a (pair, length) table, so the rows never depend on Ray's
block boundaries or the cluster's size: the same input gives the same rows everywhere.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np


def first_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Pack items into bins of ``capacity``: longest first, each into the first bin with room.

    Returns bins as lists of item indices. Ties are broken by item index (stable sort), so
    the result is a pure function of ``lengths``. O(n log n): a max segment tree over the
    bins' free space finds the first bin that fits.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and int(lengths.max()) > capacity:
        raise ValueError(f"an item of {int(lengths.max())} tokens exceeds capacity {capacity}")
    order = np.argsort(-lengths, kind="stable")
    n = len(order)
    size = 1
    while size < max(n, 1):
        size *= 2
    tree = np.zeros(2 * size, dtype=np.int64)  # max free space per subtree; unopened bins
    tree[size:] = capacity                       # count as empty bins of full capacity
    for i in range(size - 1, 0, -1):
        tree[i] = max(tree[2 * i], tree[2 * i + 1])
    bins: list[list[int]] = []
    for item in order:
        need = lengths[item]
        node = 1
        while node < size:  # descend to the leftmost leaf with free >= need
            node = 2 * node if tree[2 * node] >= need else 2 * node + 1
        b = node - size
        if b == len(bins):
            bins.append([])
        bins[b].append(int(item))
        tree[node] -= need
        node //= 2
        while node:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node //= 2
    return bins


def stable_fraction(key: bytes, seed: int) -> float:
    """A number in [0, 1) from a key, independent of order and machine."""
    digest = hashlib.sha256(seed.to_bytes(8, "little", signed=True) + key).digest()
    return int.from_bytes(digest[:8], "little") / 2**64


def is_eval(prompt_keys: list[bytes], eval_fraction: float, seed: int) -> np.ndarray:
    """Split by prompt: pairs that share a prompt land on the same side (no eval leakage)."""
    return np.array([stable_fraction(k, seed) < eval_fraction for k in prompt_keys], dtype=bool)


def shuffled(items: list, seed: int) -> list:
    rng = np.random.default_rng(seed)
    return [items[i] for i in rng.permutation(len(items))]


@dataclass(frozen=True)
class MicroBatch:
    row: int  # index into the split's rows
    weight: float  # 1.0, or 0.0 for a filler that only keeps ranks in lock-step


def epoch_plan(
    num_rows: int, world_size: int, grad_accum: int, seed: int, epoch: int
) -> list[list[list[MicroBatch]]]:
    """plan[step][rank] -> the micro-batches (packed rows) that rank runs in that step.

    Rows are shuffled with (seed, epoch). Every rank gets exactly ``grad_accum``
    micro-batches per step (ZeRO-3 hangs when ranks disagree). When the rows do not divide
    evenly, the last step is topped up with fillers of weight 0 (a repeated row whose loss
    counts nothing), so no row is dropped and none counts twice.
    """
    if num_rows <= 0:
        return []
    order = np.random.default_rng([seed, epoch]).permutation(num_rows)
    per_step = world_size * grad_accum
    plan = []
    for start in range(0, num_rows, per_step):
        rows = [int(r) for r in order[start : start + per_step]]
        fill = per_step - len(rows)
        batches = [MicroBatch(r, 1.0) for r in rows] + [
            MicroBatch(rows[i % len(rows)], 0.0) for i in range(fill)
        ]
        # Round-robin keeps real rows spread over ranks when the last step is short.
        plan.append([batches[rank::world_size] for rank in range(world_size)])
    return plan


def eval_plan(num_rows: int, world_size: int) -> list[list[MicroBatch]]:
    """plan[rank] -> eval rows, in order, padded with weight-0 fillers to equal length."""
    if num_rows <= 0:
        return [[] for _ in range(world_size)]
    per_rank = -(-num_rows // world_size)
    batches = [MicroBatch(r, 1.0) for r in range(num_rows)]
    batches += [MicroBatch(i % num_rows, 0.0) for i in range(per_rank * world_size - num_rows)]
    return [batches[rank::world_size] for rank in range(world_size)]
