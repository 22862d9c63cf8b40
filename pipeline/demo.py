"""Demo assets made locally, deterministic from a seed: preference pairs, a byte-level BPE
tokenizer with a ChatML template, and a tiny random-init Llama. No download.

The preference rule is one a tiny model can learn and carry to held-out prompts: the
chosen answer describes the item with positive words, the rejected one with negative
words, in the same sentence frame. The train/eval split is by prompt, so eval measures
whether the preference generalises to items and questions never trained on.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ITEMS = (
    "apple bicycle camera desk engine forest guitar harbor island jacket kettle lamp "
    "market notebook orchard piano quilt river saddle tower umbrella valley wagon yacht "
    "bakery canyon dragon garden hammer ladder mirror novel pencil rocket sofa tunnel "
    "violin window bridge castle meadow lantern compass teapot statue balloon candle "
    "blanket museum library theater stadium fountain"
).split()
POSITIVE = (
    "great lovely useful bright sturdy elegant pleasant charming reliable delightful "
    "wonderful clean friendly graceful excellent"
).split()
NEGATIVE = (
    "awful broken ugly dull flimsy clumsy unpleasant shabby unreliable dreadful terrible "
    "dirty rude gloomy useless"
).split()
QUESTIONS = (
    "What do you think of the {item}?",
    "Describe the {item}.",
    "Give a short review of the {item}.",
    "How would you describe the {item} to a friend?",
)
FRAMES = (
    "The {item} is {a} and {b}.",
    "I find the {item} {a}, even {b}.",
    "In short: a {a}, {b} {item}.",
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_pairs(num_pairs: int = 3000, seed: int = 0) -> list[dict]:
    """Conversational pairs: prompt/chosen/rejected as lists of chat messages."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(num_pairs):
        item = rng.choice(ITEMS)
        question = rng.choice(QUESTIONS).format(item=item)
        frame = rng.choice(FRAMES)
        good = frame.format(item=item, a=rng.choice(POSITIVE), b=rng.choice(POSITIVE))
        bad = frame.format(item=item, a=rng.choice(NEGATIVE), b=rng.choice(NEGATIVE))
        pairs.append(
            {
                "prompt": [{"role": "user", "content": question}],
                "chosen": [{"role": "assistant", "content": good}],
                "rejected": [{"role": "assistant", "content": bad}],
            }
        )
    return pairs


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")


def _corpus(pairs: list[dict]) -> list[str]:
    texts = []
    for p in pairs:
        for side in ("prompt", "chosen", "rejected"):
            texts.extend(m["content"] for m in p[side])
    return texts + ["user", "assistant", "system"]


def build_tokenizer(pairs: list[dict], vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(pairs), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )


def build_model(vocab_size: int, seed: int = 0, hidden_size: int = 64, layers: int = 2):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def make_assets(out_dir: str | Path, num_pairs: int = 3000, seed: int = 0) -> dict[str, Path]:
    """Write ``pairs.jsonl`` and ``model/`` (tokenizer + weights) under ``out_dir``.

    Idempotent: existing assets are kept, so their bytes (and the fingerprints that hash
    them) stay the same across reruns.
    """
    out = Path(out_dir)
    data_path, model_dir = out / "pairs.jsonl", out / "model"
    pairs = make_pairs(num_pairs, seed)
    if not data_path.exists():
        write_jsonl(pairs, data_path)
    if not (model_dir / "model.safetensors").exists():
        tokenizer = build_tokenizer(pairs)
        model = build_model(len(tokenizer), seed)
        model_dir.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(model_dir)
        model.save_pretrained(model_dir, safe_serialization=True)
    return {"data": data_path, "model": model_dir}
