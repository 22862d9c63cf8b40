"""Preference-pair formats: normalise a raw row into pairs, then tokenise each pair.

A row that cannot be trained on raises ``BadRow(reason)``; the tokenize stage puts it in
quarantine with that reason. Formats, detected per row (the stage then checks that one
dataset holds one format):

* ``standard``: ``prompt``, ``chosen``, ``rejected`` are strings;
* ``conversational``: ``prompt`` is a list of ``{"role", "content"}`` messages (system
  turns included), ``chosen`` / ``rejected`` are message lists ending with the assistant;
* ``implicit_standard`` / ``implicit_conversational``: no prompt; ``chosen`` and
  ``rejected`` hold the whole exchange (Anthropic HH-RLHF's ``"\\n\\nHuman: ...
  \\n\\nAssistant: ..."`` strings, or message lists) and the prompt is their shared
  prefix, extracted as TRL's ``extract_prompt`` does;
* one chosen with several rejected: ``rejected`` is a list of completions (strings, or
  message lists); it expands into pairs that share the prompt, numbered by ``expansion``.

Optional per-row ``chat_template_kwargs`` (a mapping) and ``tools`` go to the chat template.

Tokenisation follows TRL 1.16's DPO path: a conversational prompt is rendered with the
generation prompt; prompt + chosen and prompt + rejected are rendered and tokenised whole;
the prompt is their common token prefix with the tokenised prompt (the min over both sides,
so both sides share it) and each completion starts there. One deliberate difference: each
completion ends with exactly one EOS / end-of-turn token, so what a template renders after
the last end-of-turn (ChatML's trailing newline) is dropped; TRL keeps it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

FORMATS = ("standard", "conversational", "implicit_standard", "implicit_conversational")


class BadRow(ValueError):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class ExampleText:
    """One example's text before tokenisation, in a named format: the prompt, the chosen
    completion and one rejected completion (None for an SFT sequence), each a string or
    a list of messages."""

    prompt: Any  # str or list of messages
    chosen: Any
    rejected: Any
    format: str  # one of FORMATS
    expansion: int = 0  # index among the rejected completions of one row
    template_kwargs: dict = field(default_factory=dict)

    @property
    def conversational(self) -> bool:
        return self.format.endswith("conversational")


@dataclass
class Segment:
    input_ids: list[int]  # prompt + completion
    prompt_len: int


@dataclass
class TokenizedPair:
    chosen: Segment
    rejected: Segment | None  # None: a one-sided pair (an SFT sequence: pipeline/core/sft_formats.py)
    truncated: bool
    prefix_mismatch: bool
    prompt_truncated: bool = False  # the prompt was cut (max_prompt_length, or prompt_too_long: truncate)

    @property
    def segments(self) -> list[Segment]:
        return [self.chosen] if self.rejected is None else [self.chosen, self.rejected]

    @property
    def num_tokens(self) -> int:
        return sum(len(s.input_ids) for s in self.segments)


@dataclass(frozen=True)
class PreferenceColumns:
    """The column names preference rows are read by (``data``'s prompt, chosen and
    rejected keys), and the row turned into examples with them."""

    prompt_key: str = "prompt"
    chosen_key: str = "chosen"
    rejected_key: str = "rejected"

    def normalize(self, row: dict) -> list[ExampleText]:
        return normalize(row, self.prompt_key, self.chosen_key, self.rejected_key)


# ----------------------------------------------------------------------------- normalising


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) for m in value)


def _check_messages(value: Any, key: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise BadRow("malformed_messages", f"{key} is not a non-empty list of messages")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRow("malformed_messages", f"{key}[{i}] has no string 'role'")
        if not isinstance(m.get("content"), str):
            raise BadRow("malformed_messages", f"{key}[{i}] has no string 'content'")
    return value


def extract_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """TRL's ``extract_prompt``: the longest common prefix (characters, or whole turns) is
    the prompt; for strings, a space right before the split point goes to the completions."""
    idx = 0
    n = min(len(chosen), len(rejected))
    while idx < n and chosen[idx] == rejected[idx]:
        idx += 1
    if idx < n and idx > 0 and isinstance(chosen, str) and chosen[idx - 1] == " ":
        idx -= 1
    return chosen[:idx], chosen[idx:], rejected[idx:]


def _template_kwargs(row: dict) -> dict:
    kwargs = row.get("chat_template_kwargs") or {}
    if isinstance(kwargs, str):
        try:
            kwargs = json.loads(kwargs)
        except json.JSONDecodeError:
            raise BadRow("bad_type", "chat_template_kwargs is not a JSON mapping") from None
    if not isinstance(kwargs, dict):
        raise BadRow("bad_type", "chat_template_kwargs is not a mapping")
    tools = row.get("tools")
    if tools is not None:
        kwargs = {**kwargs, "tools": json.loads(tools) if isinstance(tools, str) else tools}
    return kwargs


def _rejected_list(rejected: Any) -> tuple[list, bool]:
    """(the rejected completions, whether the row had several)."""
    if isinstance(rejected, list) and rejected and all(isinstance(r, (str, list)) for r in rejected):
        return rejected, True  # list of strings, or list of message lists
    return [rejected], False


def normalize(row: dict, prompt_key: str, chosen_key: str, rejected_key: str) -> list[ExampleText]:
    """One row -> its pairs (several when it has several rejected completions)."""
    for key in (chosen_key, rejected_key):
        if row.get(key) is None:
            raise BadRow("missing_field", key)
    implicit = row.get(prompt_key) is None
    chosen = row[chosen_key]
    rejected_all, multi = _rejected_list(row[rejected_key])
    kwargs = _template_kwargs(row)
    pairs = []
    for k, rejected in enumerate(rejected_all):
        where = f"{rejected_key}[{k}]" if multi else rejected_key
        if implicit:
            if isinstance(chosen, str) and isinstance(rejected, str):
                prompt, c, r = extract_prompt(chosen, rejected)
                fmt = "implicit_standard"
            elif _is_messages(chosen) and _is_messages(rejected):
                _check_messages(chosen, chosen_key)
                _check_messages(rejected, where)
                prompt, c, r = extract_prompt(chosen, rejected)
                fmt = "implicit_conversational"
            else:
                raise BadRow("bad_type", f"without {prompt_key!r}, {chosen_key!r} and {where!r} must be "
                                         "two strings or two message lists")
            if not prompt:
                raise BadRow("no_shared_prompt", f"{chosen_key!r} and {where!r} share no prefix")
        else:
            prompt, c, r = row[prompt_key], chosen, rejected
            if all(isinstance(v, str) for v in (prompt, c, r)):
                fmt = "standard"
            elif isinstance(prompt, list) and isinstance(c, list) and isinstance(r, list):
                _check_messages(prompt, prompt_key)
                fmt = "conversational"
            else:
                types_ = {prompt_key: type(prompt).__name__, chosen_key: type(c).__name__,
                          where: type(r).__name__}
                raise BadRow("bad_type", f"expected three strings or three message lists, got {types_}")
        if fmt.endswith("conversational"):
            for key, side in ((chosen_key, c), (where, r)):
                _check_messages(side, key)
                if side[-1]["role"] != "assistant":
                    raise BadRow("malformed_messages", f"last turn of {key} is not the assistant's")
                if not side[-1]["content"].strip():
                    raise BadRow("empty_completion", key)
        elif not c.strip() or not r.strip():
            raise BadRow("empty_completion", chosen_key if not c.strip() else where)
        if c == r:
            raise BadRow("chosen_equals_rejected", where)
        pairs.append(ExampleText(prompt, c, r, fmt, k, kwargs))
    return pairs


# ----------------------------------------------------------------------------- tokenising


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _render_ids(tokenizer, pair: ExampleText, completion: Any | None) -> list[int]:
    """Token ids of the prompt (completion None) or of prompt + completion."""
    if pair.conversational:
        messages = pair.prompt if completion is None else pair.prompt + completion
        # The template adds BOS itself where it has one: no special tokens on top.
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=completion is None, **pair.template_kwargs
        )
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    text = pair.prompt if completion is None else pair.prompt + completion
    return list(tokenizer(text)["input_ids"])


def _end_with_one_eos(completion: list[int], eos_id: int) -> list[int]:
    if eos_id in completion:
        last = len(completion) - 1 - completion[::-1].index(eos_id)
        return completion[: last + 1]
    return completion + [eos_id]


def _keep(ids: list[int], n: int, mode: str) -> list[int]:
    return ids[-n:] if mode == "keep_end" else ids[:n]


def _fit_prompt(prompt: list[int], completions: list[list[int]], max_length: int, max_prompt_length: int | None,
                mode: str, min_completion_tokens: int, too_long: str) -> tuple[list[int], bool]:
    """The pair's prompt (one for both sides), cut to ``max_prompt_length`` and so that
    each completion keeps ``min_completion_tokens`` (or all of itself when shorter):
    a prompt that leaves less room is quarantined, or with ``too_long: truncate`` cut
    as ``mode`` says (TRL's behaviour: the pair is trained on its truncated prompt)."""
    cut = False
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        prompt, cut = _keep(prompt, max_prompt_length, mode), True
    room = min(min_completion_tokens, max(len(c) for c in completions))
    if len(prompt) + room > max_length:
        if too_long != "truncate":
            need = f", and completions keep {min_completion_tokens}" if min_completion_tokens > 1 else ""
            raise BadRow("prompt_too_long", f"prompt has {len(prompt)} tokens, max_length {max_length}{need}")
        prompt, cut = _keep(prompt, max_length - room, mode), True
    return prompt, cut


def tokenize_pair(
    pair: ExampleText,
    tokenizer,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    truncation_mode: str = "keep_end",
    strict: bool = False,
    max_completion_length: int | None = None,
    min_completion_tokens: int = 1,
    prompt_too_long: str = "quarantine",
) -> TokenizedPair:
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError("the tokenizer has no eos_token: set one (completions must end with it)")
    prompt_ids = _render_ids(tokenizer, pair, None)
    sides = (pair.chosen,) if pair.rejected is None else (pair.chosen, pair.rejected)  # None: one-sided
    full = [_render_ids(tokenizer, pair, side) for side in sides]
    prompt_len = min(_common_prefix(prompt_ids, ids) for ids in full)
    mismatch = prompt_len < len(prompt_ids)
    if mismatch and strict:
        raise BadRow("prompt_not_prefix", "the tokenised prompt is not a prefix of prompt + completion")
    prompt = full[0][:prompt_len]
    if not prompt:
        raise BadRow("empty_prompt", "the prompt tokenises to nothing")
    completions = [_end_with_one_eos(ids[prompt_len:], eos_id) for ids in full]
    truncated = False
    if max_completion_length is not None and any(len(c) > max_completion_length for c in completions):
        completions, truncated = [c[:max_completion_length] for c in completions], True
    prompt, prompt_cut = _fit_prompt(prompt, completions, max_length, max_prompt_length, truncation_mode,
                                     min_completion_tokens, prompt_too_long)
    room = max_length - len(prompt)
    truncated |= prompt_cut or any(len(c) > room for c in completions)
    chosen, *rejected = (Segment(prompt + c[:room], len(prompt)) for c in completions)
    if rejected and chosen.input_ids == rejected[0].input_ids:
        raise BadRow("identical_after_tokenization")
    return TokenizedPair(chosen, rejected[0] if rejected else None, truncated, mismatch, prompt_cut)


def _ids_bytes(ids: list[int]) -> bytes:
    return b"".join(t.to_bytes(4, "little") for t in ids)


def content_key(tp: TokenizedPair) -> str:
    """Hash of the pair's tokens only: equal for duplicate pairs."""
    h = hashlib.sha256()
    for seg in tp.segments:
        h.update(len(seg.input_ids).to_bytes(4, "little"))
        h.update(seg.prompt_len.to_bytes(4, "little"))
        h.update(_ids_bytes(seg.input_ids))
    return h.hexdigest()[:24]


def pair_id(tp: TokenizedPair, source: str, row_index: int, expansion: int = 0) -> str:
    """Content hash of the tokenised pair plus its source row and expansion index, so
    duplicates that are kept stay distinct."""
    h = hashlib.sha256(content_key(tp).encode())
    h.update(f"{source}\0{row_index}\0{expansion}".encode())
    return h.hexdigest()[:24]


def prompt_key(pair: ExampleText) -> bytes:
    """Key of the row's prompt as written: the unit of the train/eval split. Not of its
    tokens: a prompt that does not tokenise as a prefix of prompt + completion is cut to
    a different length per completion, and the pairs of one row would then fall on both
    sides of the split."""
    return hashlib.sha256(json.dumps(pair.prompt, sort_keys=True, ensure_ascii=False).encode()).digest()
