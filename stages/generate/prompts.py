"""The prompts the generate stage answers: drawn from the eval split's packed rows (the
prompt tokens exactly as trained on, with the dataset's chosen and rejected answers), or
read from a JSON Lines file and rendered with the chat template and its generation prompt.

They are written once, as ``prompts.parquet`` in the stage's output, before any shard is
generated: every shard, and every resumed attempt, reads its prompts from there."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.rows import split_files
from pipeline.core.storage import Loc

PROMPTS_FILE = "prompts.parquet"

PROMPT_SCHEMA = pa.schema([
    ("prompt_index", pa.int64()),
    ("pair_id", pa.string()),  # null for a prompt from generate.prompts_file
    ("prompt_ids", pa.list_(pa.int32())),
    ("chosen_ids", pa.list_(pa.int32())),  # the dataset's answers (null from a file)
    ("rejected_ids", pa.list_(pa.int32())),
])


def pairs_of_row(input_ids, seq_lens, prompt_lens, pair_ids) -> list[tuple[str, list, list, list]]:
    """(pair id, prompt, chosen completion, rejected completion) token lists of a packed row:
    segments go chosen, rejected, chosen, ...; a rejected segment with prompt length 0 shares
    the prompt of the chosen segment before it (tokenize.share_prompt)."""
    out, start = [], 0
    bounds = []
    for length in seq_lens:
        bounds.append((start, start + length))
        start += length
    for k, pair_id in enumerate(pair_ids):
        (c0, c1), (r0, r1) = bounds[2 * k], bounds[2 * k + 1]
        p = prompt_lens[2 * k]
        prompt, chosen = list(input_ids[c0:c0 + p]), list(input_ids[c0 + p:c1])
        rejected = list(input_ids[r0 + prompt_lens[2 * k + 1]:r1])
        out.append((pair_id, prompt, chosen, rejected))
    return out


def eval_prompts(rows_dir: Loc, num_prompts: int, seed: int) -> pa.Table:
    """``num_prompts`` distinct prompts of the eval split, drawn with ``seed`` (all when
    fewer), in the order they are stored; a prompt with several pairs keeps its first."""
    seen, found = set(), []
    for f in split_files(rows_dir, "eval"):
        with Loc(f).open_input() as fh:
            table = pq.read_table(fh, columns=["input_ids", "seq_lens", "prompt_lens", "pair_ids"])
        for row in table.to_pylist():
            for pair_id, prompt, chosen, rejected in pairs_of_row(row["input_ids"], row["seq_lens"],
                                                                  row["prompt_lens"], row["pair_ids"]):
                if tuple(prompt) not in seen:
                    seen.add(tuple(prompt))
                    found.append((pair_id, prompt, chosen, rejected))
    if not found:
        raise ValueError("generate: the eval split holds no prompts (data.eval_fraction is 0?): set "
                         "data.eval_fraction, or give generate.prompts_file")
    keep = sorted(np.random.default_rng(seed).choice(len(found), size=min(num_prompts, len(found)),
                                                     replace=False).tolist())
    chosen = [found[i] for i in keep]
    return pa.table({"prompt_index": pa.array(range(len(chosen)), pa.int64()),
                     "pair_id": [c[0] for c in chosen], "prompt_ids": [c[1] for c in chosen],
                     "chosen_ids": [c[2] for c in chosen], "rejected_ids": [c[3] for c in chosen]},
                    schema=PROMPT_SCHEMA)


def file_prompts(path: str, tokenizer) -> pa.Table:
    """A JSON Lines file of {"prompt": text or chat messages}, through the chat template
    with the generation prompt, as tokenize renders a conversational prompt (text as the
    user's one message); with a tokenizer that has no template, text as it is, with the
    tokenizer's special tokens (a standard prompt)."""
    ids = []
    with Loc(path).open_input() as f:
        lines = f.read().decode("utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            prompt = json.loads(line)["prompt"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"generate.prompts_file: {path} line {n}: not a JSON object with a \"prompt\" "
                             f"({type(e).__name__}: {e})") from None
        if isinstance(prompt, str) and prompt.strip() and tokenizer.chat_template:
            prompt = [{"role": "user", "content": prompt}]
        if isinstance(prompt, list) and prompt:
            if not all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in prompt):
                raise ValueError(f"generate.prompts_file: {path} line {n}: prompt messages need a role and content")
            text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            ids.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
        elif isinstance(prompt, str) and prompt.strip():
            ids.append(list(tokenizer(prompt)["input_ids"]))
        else:
            raise ValueError(f"generate.prompts_file: {path} line {n}: the prompt is empty or neither text nor "
                             "a list of messages")
    if not ids:
        raise ValueError(f"generate.prompts_file: {path} holds no prompts")
    return pa.table({"prompt_index": pa.array(range(len(ids)), pa.int64()), "pair_id": [None] * len(ids),
                     "prompt_ids": ids, "chosen_ids": [None] * len(ids), "rejected_ids": [None] * len(ids)},
                    schema=PROMPT_SCHEMA)
