"""The trained model as a plain HF checkpoint: consolidated weights (or the adapter) plus
the tokenizer; with LoRA, optionally the base model with the adapter merged."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from pipeline.config import PipelineConfig
from pipeline.modeling import load_causal_lm
from pipeline.redaction import redact_values
from pipeline.storage import Loc

EXPORT_DIR = "model"


def export_model(engine, ctx, info: dict) -> None:
    """Consolidated weights + tokenizer, loadable with ``from_pretrained``."""
    from transformers import AutoTokenizer

    if ctx.train_cfg.zero_stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # every rank takes part
    else:
        state = engine.module.state_dict()
    if ctx.rank == 0:
        export = ctx.out_dir / EXPORT_DIR
        # a PeftModel saves only its adapter (picked out of the full state dict)
        engine.module.save_pretrained(export, state_dict=state, safe_serialization=True)
        AutoTokenizer.from_pretrained(ctx.cfg.tokenizer_path).save_pretrained(export)
        (export / "dpo_pipeline.json").write_text(json.dumps(redact_values(info), indent=2))
        if ctx.staged:
            (ctx.out / EXPORT_DIR).upload(export)


def merge_adapter(cfg: PipelineConfig, out: Loc) -> None:
    """model/merged: the base model with the trained adapter merged (peft's
    merge_and_unload), a plain HF checkpoint. Runs on the driver, after training."""
    from peft import PeftModel
    from transformers import AutoTokenizer
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()  # a plain load, not a ZeRO-3 partitioned one
    with tempfile.TemporaryDirectory() as tmp:
        export = (out / EXPORT_DIR).local
        if export is None:  # a URI run directory: merge in local scratch, then upload
            export = Path(tmp) / EXPORT_DIR
            (out / EXPORT_DIR).download(export)
        base = load_causal_lm(cfg.model.path, cfg.model)
        merged = PeftModel.from_pretrained(base, export).merge_and_unload()
        merged.save_pretrained(export / "merged", safe_serialization=True)
        AutoTokenizer.from_pretrained(export).save_pretrained(export / "merged")
        (out / EXPORT_DIR / "merged").upload(export / "merged")
