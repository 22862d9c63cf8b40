"""The tokenizer a run uses, and the token that closes an assistant turn."""

from __future__ import annotations

from pathlib import Path

from pipeline.core.config import PipelineConfig
from pipeline.core.models import local_dir


def load_tokenizer(cfg: PipelineConfig):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(local_dir(cfg.tokenizer_path, cfg.model, "tokenizer"),
                                              trust_remote_code=cfg.model.trust_remote_code)
    if cfg.tokenize.chat_template:
        tokenizer.chat_template = Path(cfg.tokenize.chat_template).read_text()
    return tokenizer


def end_of_turn_id(tokenizer) -> int | None:
    """The special token that closes an assistant turn in the chat template (ChatML's
    ``<|im_end|>``, Llama-3's ``<|eot_id|>``): the first special token after the content of
    a rendered assistant turn. None without a template, or when the turn ends in plain text."""
    marker = "END-OF-TURN-PROBE"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": marker}], tokenize=False)
    except Exception:  # noqa: BLE001 - no template, or one that refuses this conversation
        return None
    if marker not in text:
        return None
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    after = tokenizer(text.split(marker, 1)[1], add_special_tokens=False)["input_ids"]
    return next((i for i in after if i in special), None)
