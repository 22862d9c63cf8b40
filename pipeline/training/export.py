"""The trained model as a plain HF checkpoint: consolidated weights (or the adapter), the
tokenizer exactly as tokenize used it (its chat template, its remote code), and a
generation config that stops at the end of an assistant turn; with LoRA, optionally the
base model with the adapter merged."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from pipeline.core.config import PipelineConfig
from pipeline.core.modeling import load_causal_lm
from pipeline.core.redaction import redact_values
from pipeline.core.rundir import read_manifest
from pipeline.core.storage import Loc
from pipeline.core.tokenizer import end_of_turn_id, load_tokenizer

EXPORT_DIR = "model"


def generation_config(model, tokenizer):
    """The model's generation config, with ``eos_token_id`` holding the tokenizer's EOS and
    the chat template's end-of-turn token: a chat model trained on turns that end with
    ``<|eot_id|>`` would otherwise generate past them."""
    from transformers import GenerationConfig

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    gen = GenerationConfig.from_model_config(base.config) if base.generation_config is None \
        else GenerationConfig.from_dict(base.generation_config.to_dict())
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    eos = [i for i in eos + [tokenizer.eos_token_id, end_of_turn_id(tokenizer)] if i is not None]
    eos = list(dict.fromkeys(eos))  # unique, in order
    gen.eos_token_id = eos if len(eos) != 1 else eos[0]
    if gen.pad_token_id is None and tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id
    return gen


def export_model(engine, ctx, info: dict) -> None:
    """Consolidated weights + tokenizer + generation config, loadable with ``from_pretrained``."""
    if ctx.train_cfg.zero_stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # every rank takes part
    else:
        state = engine.module.state_dict()
    if ctx.rank == 0:
        export = ctx.out_dir / EXPORT_DIR
        # a PeftModel saves only its adapter (picked out of the full state dict)
        if export.exists() and not export.is_dir():  # save_pretrained only logs this, and returns
            raise NotADirectoryError(f"export: {export} is a file; the trained weights are in the final checkpoint, "
                                     f"move the file away and rerun (only the export runs)")
        engine.module.save_pretrained(export, state_dict=state, safe_serialization=True)
        tokenizer = load_tokenizer(ctx.cfg)  # the chat template and code the rows were made with
        tokenizer.save_pretrained(export)
        generation_config(engine.module, tokenizer).save_pretrained(export)
        (export / "dpo_pipeline.json").write_text(json.dumps(redact_values(info), indent=2))
        if ctx.staged:
            (ctx.out / EXPORT_DIR).upload(export)


def export_digest(out: Loc, export: Loc) -> str:
    """sha256 over an exported model's files as the stage's manifest committed them (their
    names and sha256): which build of a stage's model the stages after it loaded. ``export``:
    the model folder, or its merged LoRA model (``<model>/merged``, whose files the model
    folder's digest leaves out)."""
    import hashlib

    out = Loc(out)
    prefix = Loc(export).relative_to(out) + "/"
    merged = f"{EXPORT_DIR}/merged/"
    files = sorted((s["name"], s["sha256"]) for s in read_manifest(out)["shards"]
                   if s["name"].startswith(prefix) and (prefix == merged or not s["name"].startswith(merged)))
    return hashlib.sha256(json.dumps(files).encode()).hexdigest()


def merge_adapter(cfg: PipelineConfig, out: Loc) -> None:
    """model/merged: the base model with the trained adapter merged (peft's
    merge_and_unload), a plain HF checkpoint. Runs on the driver, after training."""
    from peft import PeftModel
    from transformers import GenerationConfig
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
        load_tokenizer(cfg).save_pretrained(export / "merged")
        GenerationConfig.from_pretrained(export).save_pretrained(export / "merged")
        (out / EXPORT_DIR / "merged").upload(export / "merged")
