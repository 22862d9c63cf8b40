"""Preference-pair formats: normalise a raw row, then tokenise it into two segments.

A row that cannot be trained on raises ``BadRow(reason)``; the tokenize stage puts it in
quarantine with that reason. Formats accepted here (issue 4 widens the list):

* standard: ``prompt``, ``chosen``, ``rejected`` are strings;
* conversational: ``prompt`` is a list of ``{"role", "content"}`` messages, ``chosen`` and
  ``rejected`` are lists of messages ending with the assistant's turn.

Tokenisation follows TRL: a conversational prompt goes through the tokenizer's chat
template with the generation prompt; prompt + completion are rendered and tokenised
together and the completion starts where the two token streams diverge (so a BPE merge
across the boundary never leaves a prompt token that the full text does not have). Every
completion ends with exactly one EOS / end-of-turn token.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any


class BadRow(ValueError):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class Pair:
    prompt: Any  # str or list of messages
    chosen: Any
    rejected: Any
    conversational: bool


@dataclass
class Segment:
    input_ids: list[int]  # prompt + completion
    prompt_len: int


@dataclass
class TokenizedPair:
    chosen: Segment
    rejected: Segment
    truncated: bool
    prefix_mismatch: bool

    @property
    def num_tokens(self) -> int:
        return len(self.chosen.input_ids) + len(self.rejected.input_ids)


def _check_messages(value: Any, key: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise BadRow("malformed_messages", f"{key} is not a non-empty list of messages")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRow("malformed_messages", f"{key}[{i}] has no string 'role'")
        if not isinstance(m.get("content"), str):
            raise BadRow("malformed_messages", f"{key}[{i}] has no string 'content'")
    return value


def normalize(row: dict, prompt_key: str, chosen_key: str, rejected_key: str) -> Pair:
    for key in (prompt_key, chosen_key, rejected_key):
        if row.get(key) is None:
            raise BadRow("missing_field", key)
    prompt, chosen, rejected = row[prompt_key], row[chosen_key], row[rejected_key]
    if all(isinstance(v, str) for v in (prompt, chosen, rejected)):
        if not chosen.strip() or not rejected.strip():
            raise BadRow("empty_completion")
        if chosen == rejected:
            raise BadRow("chosen_equals_rejected")
        return Pair(prompt, chosen, rejected, conversational=False)
    if all(isinstance(v, list) for v in (prompt, chosen, rejected)):
        _check_messages(prompt, prompt_key)
        for key, side in ((chosen_key, chosen), (rejected_key, rejected)):
            _check_messages(side, key)
            if side[-1]["role"] != "assistant":
                raise BadRow("malformed_messages", f"last turn of {key} is not the assistant's")
            if not side[-1]["content"].strip():
                raise BadRow("empty_completion", key)
        if chosen == rejected:
            raise BadRow("chosen_equals_rejected")
        return Pair(prompt, chosen, rejected, conversational=True)
    types_ = {k: type(row[k]).__name__ for k in (prompt_key, chosen_key, rejected_key)}
    raise BadRow("bad_type", f"expected three strings or three message lists, got {types_}")


def _ids(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _segment(
    tokenizer, prompt_text: str, full_text: str, add_special_tokens: bool, eos_id: int
) -> tuple[list[int], list[int], bool]:
    prompt_ids = _ids(tokenizer, prompt_text, add_special_tokens)
    full_ids = _ids(tokenizer, full_text, add_special_tokens)
    split = _common_prefix(prompt_ids, full_ids)
    mismatch = split < len(prompt_ids)
    completion = full_ids[split:]
    # Exactly one EOS at the end: drop what a template renders after the last end-of-turn
    # (ChatML's trailing newline), or append EOS when the text has none.
    if eos_id in completion:
        last = len(completion) - 1 - completion[::-1].index(eos_id)
        completion = completion[: last + 1]
    else:
        completion = completion + [eos_id]
    return full_ids[:split], completion, mismatch


def _truncate(
    prompt: list[int],
    completion: list[int],
    max_length: int,
    max_prompt_length: int | None,
    mode: str,
) -> tuple[list[int], list[int], bool]:
    truncated = False
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        prompt = prompt[-max_prompt_length:] if mode == "keep_end" else prompt[:max_prompt_length]
        truncated = True
    if len(prompt) >= max_length:
        raise BadRow("prompt_too_long", f"prompt has {len(prompt)} tokens, max_length {max_length}")
    if len(prompt) + len(completion) > max_length:
        completion = completion[: max_length - len(prompt)]
        truncated = True
    return prompt, completion, truncated


def tokenize_pair(
    pair: Pair,
    tokenizer,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    truncation_mode: str = "keep_end",
) -> TokenizedPair:
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError("the tokenizer has no eos_token: set one (completions must end with it)")
    segments = []
    truncated_any = mismatch_any = False
    for completion in (pair.chosen, pair.rejected):
        if pair.conversational:
            # The template adds BOS itself where it has one: no special tokens on top.
            prompt_text = tokenizer.apply_chat_template(
                pair.prompt, tokenize=False, add_generation_prompt=True
            )
            full_text = tokenizer.apply_chat_template(pair.prompt + completion, tokenize=False)
            prompt, comp, mismatch = _segment(tokenizer, prompt_text, full_text, False, eos_id)
        else:
            prompt, comp, mismatch = _segment(
                tokenizer, pair.prompt, pair.prompt + completion, True, eos_id
            )
        if not prompt:
            raise BadRow("empty_prompt", "the prompt tokenises to nothing")
        prompt, comp, truncated = _truncate(
            prompt, comp, max_length, max_prompt_length, truncation_mode
        )
        segments.append(Segment(prompt + comp, len(prompt)))
        truncated_any |= truncated
        mismatch_any |= mismatch
    chosen, rejected = segments
    if chosen.input_ids == rejected.input_ids:
        raise BadRow("identical_after_tokenization")
    return TokenizedPair(chosen, rejected, truncated_any, mismatch_any)


def pair_id(tp: TokenizedPair, source: str, row_index: int) -> str:
    """Content hash of the tokenised pair plus its source row (duplicates stay distinct)."""
    h = hashlib.sha256()
    for seg in (tp.chosen, tp.rejected):
        h.update(len(seg.input_ids).to_bytes(4, "little"))
        h.update(seg.prompt_len.to_bytes(4, "little"))
        h.update(b"".join(t.to_bytes(4, "little") for t in seg.input_ids))
    h.update(f"{source}\0{row_index}".encode())
    return h.hexdigest()[:24]


def prompt_key(tp: TokenizedPair) -> bytes:
    """Key of the chosen side's prompt tokens: the unit of the train/eval split."""
    ids = tp.chosen.input_ids[: tp.chosen.prompt_len]
    return hashlib.sha256(b"".join(t.to_bytes(4, "little") for t in ids)).digest()
