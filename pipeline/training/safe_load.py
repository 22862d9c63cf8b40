"""Checkpoints are read without unpickling code.

DeepSpeed 0.19.8 reads every checkpoint file through its engine's ``checkpoint_engine``
(``TorchCheckpointEngine.load``), which calls ``torch.load(..., weights_only=False)``: a
full unpickle, so a file that holds a pickled callable runs it. Auto-resume loads the
newest complete checkpoint from the run directory, often a bucket, on every rank: anyone
who can write there would run code on every training node.

``SafeTorchCheckpointEngine`` is DeepSpeed's engine with ``weights_only=True`` and an
allow-list of the only non-builtin types a checkpoint of this pipeline holds (found by
saving one with every ZeRO stage, dtype, optimizer and with and without LoRA, and listing
what torch's weights_only unpickler refuses). All three are plain data; none runs code
when it is rebuilt:

* ``LossScaler``: the ZeRO optimizer state's ``loss_scaler`` (a static scale of 1 in fp32
  and bf16; plain attributes);
* ``ZeroStageEnum``: the ZeRO optimizer state's ``zero_stage`` (an int enum);
* ``fragment_address``: ZeRO-1/2's ``param_slice_mappings`` (a dataclass of two ints).

Everything else a checkpoint holds (tensors, the RNG states, the step, the LR schedule's
state, the config) is what the weights_only unpickler allows by default. A file holding
anything else is refused with ``UnsafeCheckpointError``, naming the file.

``install`` puts it on an engine right after ``deepspeed.initialize``. Every load of the
resume path (``engine.load_checkpoint`` with optimizer states: the model-states file via
``SDLoaderFactory``, the ZeRO partitions via ``_get_all_zero_checkpoint_state_dicts``)
goes through ``engine.checkpoint_engine``. DeepSpeed's universal-checkpoint code calls
``torch.load(..., weights_only=False)`` itself (``ds_to_universal`` reading the partitions,
ZeRO-3's universal load reading each parameter's files): the pipeline runs both inside
``weights_only_loads``, where every ``torch.load`` is ``safe_load`` (and the converter's
worker processes with ``install_safe_loads``). ``install`` refuses an
engine configured to load universal checkpoints outside it.
"""

from __future__ import annotations

import pickle
import re
from contextlib import contextmanager

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

CHECKPOINT_SAFE_GLOBALS = [LossScaler, ZeroStageEnum, fragment_address]
_torch_load = torch.load  # the real one (weights_only_loads replaces torch.load for a while)


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file holds something other than tensors, plain data and the allow-list."""


def safe_load(path: str, map_location=None):
    """``torch.load`` with ``weights_only=True`` and the checkpoint allow-list; refuses,
    naming the file, what the weights_only unpickler refuses."""
    try:
        with torch.serialization.safe_globals(CHECKPOINT_SAFE_GLOBALS):
            return _torch_load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        reason = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
        what = (f"a pickled reference to {found.group(1)}" if found
                else f"what torch's weights_only unpickler refuses ({reason.group(1).strip() if reason else e})")
        allowed = ", ".join(f"{g.__module__}.{g.__name__}" for g in CHECKPOINT_SAFE_GLOBALS)
        raise UnsafeCheckpointError(
            f"refused to load checkpoint file {path}: it holds {what}, which is not a tensor, plain data or an "
            f"allow-listed type ({allowed}). A checkpoint this pipeline writes never does: something else "
            f"wrote this file. Delete the checkpoint (or resume from another one)") from None


def _load_safely(f, map_location=None, weights_only=None, **_):
    return safe_load(f, map_location=map_location)


@contextmanager
def weights_only_loads():
    """Within the block every ``torch.load`` is ``safe_load``, whatever its caller asks for:
    for DeepSpeed code that calls ``torch.load(weights_only=False)`` itself."""
    torch.load = _load_safely
    try:
        yield
    finally:
        torch.load = _torch_load


def install_safe_loads() -> None:
    """Every ``torch.load`` of this process is ``safe_load`` from now on: the initializer of
    a process that only reads checkpoints (``universal_convert.spawned_workers``)."""
    torch.load = _load_safely


class SafeTorchCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, loading with ``weights_only=True`` (``safe_load``)."""

    def __init__(self, config_params=None):
        super().__init__(config_params)
        self.name = "SafeTorchCheckpointEngine"

    def load(self, path: str, map_location=None):
        return safe_load(path, map_location=map_location)


def install(engine) -> None:
    """Give a DeepSpeed engine the safe checkpoint engine (after ``deepspeed.initialize``)."""
    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:
        raise RuntimeError(f"checkpoint loading: DeepSpeed chose {type(engine.checkpoint_engine).__name__}, and "
                           f"only its TorchCheckpointEngine has a weights_only replacement (pipeline/training/safe_load.py)")
    if engine.load_universal_checkpoint():
        raise RuntimeError("checkpoint loading: DeepSpeed's universal checkpoints are unpickled with "
                           "weights_only=False, which pipeline/training/safe_load.py does not allow")
    engine.checkpoint_engine = SafeTorchCheckpointEngine(engine._config)
