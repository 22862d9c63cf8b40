"""TR-DPO's reference partitions saved with a checkpoint and loaded on another worker count
(pipeline/training/refresh.py): each new rank's slice of each parameter, reassembled from
the old ranks' parts, is what ZeRO-3 would have given it. Fast: tensors cut by hand as
ZeRO-3 cuts them (a parameter's flat elements padded to a multiple of the ranks, rank r
holding elements [r x part, (r + 1) x part)), no process group."""

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from pipeline.core.storage import Loc
from pipeline.training.refresh import load_partitions, old_ranks, partition_file

SIZES = {"embed": 10, "norm": 7, "bias": 1, "wide": 33}


def parts(full: torch.Tensor, world: int) -> list[torch.Tensor]:
    size = -(-full.numel() // world)
    padded = torch.cat([full, torch.full((size * world - full.numel(),), -1.0)])
    return list(padded.split(size))


@dataclass
class Param:
    ds_tensor: torch.Tensor
    ds_numel: int


class Module:
    def __init__(self, params):
        self.params = params

    def named_parameters(self):
        return iter(self.params.items())


@dataclass
class Reference:
    module: Module


@dataclass
class Rank:
    rank: int
    world: int
    out_dir: Path
    device: torch.device = torch.device("cpu")


def write_checkpoint(root: Path, full: dict, world: int) -> Loc:
    for r in range(world):
        path = root / partition_file(r)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"world_size": world, "params": {n: parts(t, world)[r].clone() for n, t in full.items()}}, path)
    (root / "COMPLETE.json").write_text(json.dumps({"step": 4, "world_size": world}))
    return Loc(root)


@pytest.mark.parametrize("written_by, world", [(3, 2), (2, 3), (4, 3), (2, 2), (1, 3), (3, 1), (2, 5)])
def test_each_rank_gets_its_zero3_slice_from_the_old_ranks_parts(tmp_path, written_by, world):
    full = {n: torch.arange(k, dtype=torch.float32) + 100 * i for i, (n, k) in enumerate(SIZES.items())}
    checkpoint = write_checkpoint(tmp_path / "step-4", full, written_by)
    for rank in range(world):
        ref = Reference(Module({n: Param(torch.zeros(-(-t.numel() // world)), t.numel()) for n, t in full.items()}))
        load_partitions(ref, checkpoint, Rank(rank, world, tmp_path / f"scratch-{rank}"))
        for name, t in full.items():
            want = parts(t, world)[rank]
            got = ref.module.params[name].ds_tensor
            real = max(0, min(want.numel(), t.numel() - rank * want.numel()))  # this rank's elements, not padding
            assert torch.equal(got[:real], want[:real]), (name, rank)
        assert not (tmp_path / f"scratch-{rank}").exists()


def test_a_rank_reads_only_the_old_parts_that_hold_its_elements():
    assert list(old_ranks(100, 4, 0, 2)) == [0, 1]  # 25 a part then, 50 now
    assert list(old_ranks(100, 4, 1, 2)) == [2, 3]
    assert list(old_ranks(100, 2, 1, 4)) == [0]  # elements 25-49 of the old rank 0's 0-49
    assert list(old_ranks(100, 3, 1, 3)) == [1]  # the same worker count: its own
    assert list(old_ranks(1, 2, 1, 2)) == []  # nothing but padding


def test_a_missing_partition_is_refused_naming_it(tmp_path):
    full = {"embed": torch.arange(10, dtype=torch.float32)}
    checkpoint = write_checkpoint(tmp_path / "step-4", full, 2)
    (tmp_path / "step-4" / partition_file(1)).unlink()
    ref = Reference(Module({"embed": Param(torch.zeros(10), 10)}))
    with pytest.raises(FileNotFoundError, match=r"the reference partitions of its TR-DPO refreshes are missing "
                                                r"\(.*zero_pp_rank_1_reference.pt\)"):
        load_partitions(ref, checkpoint, Rank(0, 1, tmp_path / "scratch"))


def frozen(*names: str, numel: int = 4) -> torch.nn.Module:
    """A module whose parameters are frozen ZeRO-3 partitions (``ds_tensor``: one rank's)."""
    module = torch.nn.Module()
    for name in names:
        p = torch.nn.Parameter(torch.zeros(numel), requires_grad=False)
        p.ds_tensor = torch.full((numel,), 1.0)
        module.register_parameter(name, p)
    return module


def test_a_reference_parameter_the_policy_lacks_is_refused_not_left_unmixed():
    """A reference with a weight of its own (an untied lm_head) against a policy without it
    (tied): mixing every other weight and not that one would be a silent half-refresh."""
    from pipeline.training.reference import mix_policy_into

    reference = Reference(frozen("embed", "head"))
    with pytest.raises(ValueError, match=r"the reference's parameters \['head'\] have no counterpart in the policy"):
        mix_policy_into(reference, Reference(frozen("embed")), 0.6)


def test_a_lora_layer_whose_base_weight_is_tied_is_refused():
    """peft's layer on a tied lm_head: its base weight is the embeddings' (named once), so
    its adapter's update would be lost from the mix."""
    from pipeline.training.reference import policy_partitions

    policy = frozen("embed")
    policy.head = torch.nn.Module()
    policy.head.lora_A = torch.nn.ModuleDict({"default": torch.nn.Linear(4, 2, bias=False)})
    with pytest.raises(ValueError, match=r"LoRA adapts \['head'\], whose weight is tied to another parameter"):
        list(policy_partitions(Reference(policy)))
