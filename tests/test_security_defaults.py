"""Security defaults: checkpoints are loaded without unpickling code (pipeline/training/safe_load.py),
and a model directory's code is part of its fingerprint (pipeline/core/rundir.py)."""

import pickle
import re
import shutil

import pytest
import torch

from helpers import run_cli, tiny_config, train_dir, write_config
from pipeline.demo import make_pairs, write_jsonl


class Payload:
    """Unpickled, writes ``marker``: the stand-in for code an attacker's checkpoint runs."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('owned')",)


def test_safe_load_refuses_pickled_code_naming_the_file(tmp_path):
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from pipeline.training.safe_load import SafeTorchCheckpointEngine, UnsafeCheckpointError

    marker, evil = tmp_path / "owned", tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": Payload(marker)}, evil)
    with pytest.raises(UnsafeCheckpointError, match=re.escape(f"refused to load checkpoint file {evil}: it holds "
                                                              f"a pickled reference to exec")):
        SafeTorchCheckpointEngine().load(str(evil), map_location="cpu")
    assert not marker.exists()
    # DeepSpeed's own engine (weights_only=False) runs it: what the safe engine replaces.
    TorchCheckpointEngine().load(str(evil), map_location="cpu")
    assert marker.exists()


def test_safe_load_reads_the_allow_listed_deepspeed_types(tmp_path):
    """Each allow-listed type is one torch's weights_only unpickler refuses by default, and
    with the allow-list a state holding all of them (as DeepSpeed's ZeRO optimizer state
    does) loads intact."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from pipeline.training.safe_load import CHECKPOINT_SAFE_GLOBALS, SafeTorchCheckpointEngine

    assert CHECKPOINT_SAFE_GLOBALS == [LossScaler, ZeroStageEnum, fragment_address]
    state = {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.gradients,
             "param_slice_mappings": [{"w": fragment_address(numel=6, start=2)}],
             "rng": torch.get_rng_state(), "step": 5, "base_optimizer_state": {"state": {0: {"exp_avg": torch.ones(3)}}}}
    path = tmp_path / "state.pt"
    torch.save(state, path)
    for key, refused in (("loss_scaler", LossScaler), ("zero_stage", ZeroStageEnum),
                         ("param_slice_mappings", fragment_address)):
        torch.save(state[key], tmp_path / "one.pt")
        with pytest.raises(pickle.UnpicklingError, match=f"GLOBAL {refused.__module__}.{refused.__name__} "):
            torch.load(tmp_path / "one.pt", weights_only=True)
    got = SafeTorchCheckpointEngine().load(str(path), map_location="cpu")
    assert isinstance(got["loss_scaler"], LossScaler) and got["loss_scaler"].cur_scale == 1.0
    assert got["zero_stage"] is ZeroStageEnum.gradients
    assert got["param_slice_mappings"] == [{"w": fragment_address(numel=6, start=2)}]
    assert torch.equal(got["rng"], state["rng"]) and got["step"] == 5
    assert torch.equal(got["base_optimizer_state"]["state"][0]["exp_avg"], torch.ones(3))
    # the allow-list is scoped to the load
    assert not set(CHECKPOINT_SAFE_GLOBALS) & set(torch.serialization.get_safe_globals())


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_auto_resume_refuses_a_checkpoint_file_that_holds_pickled_code(assets, tmp_path):
    """A run's manifest is removed, so the rerun auto-resumes from the newest complete
    checkpoint (the final one, step 6). With the model-states file (which
    also holds the pipeline's step and RNG state) or the ZeRO optimizer-state file replaced
    by a pickled callable, the rerun refuses it, naming the file, and the callable never
    runs; with the real files back the rerun resumes."""
    data = tmp_path / "pairs.jsonl"
    write_jsonl(make_pairs(400, seed=8), data)
    cfg = tiny_config(assets, tmp_path / "run", data_file=data, tokenize={"max_tokens_per_row": 256},
                      train={"max_steps": 6, "save_steps": 5, "eval_steps": 1000, "num_workers": 1})
    path = write_config(cfg, tmp_path / "c.yaml")
    run_cli(path)
    out = train_dir(cfg)
    # the newest complete checkpoint: the final one, written before the export
    ckpt = out / "checkpoints" / "step-00000006"
    assert (ckpt / "COMPLETE.json").is_file() and (out / "checkpoints" / "step-00000005").is_dir()
    (out / "_MANIFEST.json").unlink()

    marker = tmp_path / "owned"
    for pattern in ("*model_states.pt", "*optim_states.pt"):
        (target,) = ckpt.glob(pattern)
        original = target.read_bytes()
        torch.save({"optimizer_state_dict": Payload(marker)}, target)
        proc = run_cli(path, check=False)
        assert not marker.exists(), f"{target.name}: the pickled callable ran"
        assert proc.returncode != 0
        assert f"refused to load checkpoint file {target}" in proc.stderr, proc.stderr[-3000:]
        assert "resumed from" not in proc.stdout
        target.write_bytes(original)

    proc = run_cli(path)
    assert f"resumed from {ckpt} at step 6" in proc.stdout


def test_editing_remote_code_changes_the_model_fingerprint(assets, tmp_path):
    from pipeline import runner

    model = tmp_path / "model"
    shutil.copytree(assets["model"], model)
    code = model / "modeling_x.py"
    code.write_text("def forward(x):\n    return x\n")
    cfg = tiny_config(assets, tmp_path / "run", model={"path": str(model), "trust_remote_code": True})
    before = {name: plan.fingerprint for name, plan in runner.plan_stages(cfg).items()}
    code.write_text("def forward(x):\n    return x + 1  # changed\n")
    after = {name: plan.fingerprint for name, plan in runner.plan_stages(cfg).items()}
    assert before["score"] != after["score"] and before["train"] != after["train"]
