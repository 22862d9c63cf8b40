"""SFT row formats, for the sft stage's own data (``sft.data: {train_files | hf_dataset |
sources, ...}``): a row becomes a one-sided ``ExampleText`` (a prompt and one completion, no
rejected side), which ``formats.tokenize_pair`` tokenises exactly as it does a preference
pair's chosen side: the same chat template, prompt prefix, single EOS and truncation. The
tokenize stage's reading, quarantine, split and packing then run unchanged.

Formats, detected per row (one dataset holds one):

* ``messages_conversational``: a list of messages (``messages_key``); the prompt is every
  turn but the last, which must be the assistant's and is the completion. Earlier
  assistant turns are context, as in a preference pair's prompt: the loss mask has one
  completion per sequence.
* ``prompt_completion_standard``: ``prompt`` and ``completion`` strings.
* ``prompt_completion_conversational``: ``prompt`` and ``completion`` message lists (TRL's
  prompt-completion format); the completion ends with the assistant's turn.

A row without a prompt (TRL's language-modelling ``text`` rows) has nothing to condition
on and no prompt to mask: it is quarantined as ``missing_field``.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.core.formats import BadRow, ExampleText, _check_messages, _template_kwargs

SFT_FORMATS = ("messages_conversational", "prompt_completion_standard", "prompt_completion_conversational")


@dataclass(frozen=True)
class SequenceRows:
    """How the tokenize stage reads SFT rows: their column names (``sft.data``)."""

    messages_key: str = "messages"
    prompt_key: str = "prompt"
    completion_key: str = "completion"

    def normalize(self, row: dict) -> list[ExampleText]:
        kwargs = _template_kwargs(row)
        if row.get(self.messages_key) is not None:
            messages = _check_messages(row[self.messages_key], self.messages_key)
            if len(messages) < 2:
                raise BadRow("malformed_messages", f"{self.messages_key} needs a prompt turn before the assistant's")
            return [ExampleText(messages[:-1], _completion_turn(messages[-1:], self.messages_key), None,
                         "messages_conversational", 0, kwargs)]
        if row.get(self.completion_key) is None:
            raise BadRow("missing_field", f"{self.messages_key} or {self.completion_key}")
        if row.get(self.prompt_key) is None:
            raise BadRow("missing_field", f"{self.prompt_key} (a completion needs a prompt: its tokens are the "
                                          f"ones the loss masks)")
        prompt, completion = row[self.prompt_key], row[self.completion_key]
        if isinstance(prompt, str) and isinstance(completion, str):
            if not prompt.strip():
                raise BadRow("empty_prompt", self.prompt_key)
            if not completion.strip():
                raise BadRow("empty_completion", self.completion_key)
            return [ExampleText(prompt, completion, None, "prompt_completion_standard", 0, kwargs)]
        if isinstance(prompt, list) and isinstance(completion, list):
            _check_messages(prompt, self.prompt_key)
            return [ExampleText(prompt, _completion_turn(completion, self.completion_key), None,
                         "prompt_completion_conversational", 0, kwargs)]
        raise BadRow("bad_type", f"expected two strings or two message lists, got {self.prompt_key}: "
                                 f"{type(prompt).__name__}, {self.completion_key}: {type(completion).__name__}")


def _completion_turn(messages: list, key: str) -> list[dict]:
    _check_messages(messages, key)
    if messages[-1]["role"] != "assistant":
        raise BadRow("malformed_messages", f"last turn of {key} is not the assistant's")
    if not messages[-1]["content"].strip():
        raise BadRow("empty_completion", key)
    return messages
