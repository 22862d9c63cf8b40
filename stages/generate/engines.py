"""The engines that answer prompts: HF ``generate`` (every device) and vLLM (GPUs, where it
is installed). Both take prompts as token ids and return, per prompt, ``num_samples``
completions as token ids, each cut after the first stop token (EOS or the chat
template's end of turn), which it keeps."""

from __future__ import annotations

import dataclasses
import importlib.util

import numpy as np
import torch

# Attention for a left-padded batch: segment_sdpa is for packed rows and takes no padding
# mask (transformers builds none for it), so a batch would attend to its pads.
GENERATE_ATTENTION = {"segment_sdpa": "sdpa"}


def shard_seed(seed: int, shard: int, side: int) -> int:
    """The sampling seed of one shard and model: the same whether the shard runs first, last
    or in a resumed attempt, and different for the policy (side 0) and the reference (1)."""
    return int(np.random.SeedSequence([seed, shard, side]).generate_state(1)[0])


def cut_at_stop(ids: list[int], stop_ids: set[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in stop_ids:
            return ids[:i + 1]
    return ids


def resolve_engine(engine: str, gpus: float) -> str:
    """``auto``: vLLM where it is installed and the actors have GPUs; HF otherwise."""
    if engine != "auto":
        return engine
    return "vllm" if gpus > 0 and importlib.util.find_spec("vllm") is not None else "hf"


class HFEngine:
    """One model, HF ``generate`` on a left-padded batch (a shard's prompts at once), with
    the padding masked (``GENERATE_ATTENTION``)."""

    def __init__(self, path: str, mcfg, device: torch.device, pad_id: int, stop_ids: list[int]):
        from pipeline.core.modeling import load_causal_lm

        attention = GENERATE_ATTENTION.get(mcfg.attn_implementation, mcfg.attn_implementation)
        self.model = load_causal_lm(path, dataclasses.replace(mcfg, attn_implementation=attention), device).eval()
        self.device, self.pad_id, self.stop_ids = device, pad_id, stop_ids

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], g, seed: int) -> list[list[list[int]]]:
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        # only what the config says: no top-k, repetition penalty or other default a checkpoint's
        # generation_config.json (or transformers: top_k 50) would add, as vLLM adds none
        sampling = {"do_sample": True, "temperature": g.temperature, "top_p": g.top_p} if g.temperature > 0 else \
            {"do_sample": False, "temperature": None, "top_p": None}
        sampling.update(top_k=0, repetition_penalty=1.0, no_repeat_ngram_size=0, min_new_tokens=0)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)
            out = self.model.generate(ids, attention_mask=mask, max_new_tokens=g.max_new_tokens,
                                      num_return_sequences=g.num_samples, eos_token_id=self.stop_ids,
                                      pad_token_id=self.pad_id, **sampling)
        new = out[:, width:].tolist()
        stops = set(self.stop_ids)
        return [[cut_at_stop(new[i * g.num_samples + s], stops) for s in range(g.num_samples)]
                for i in range(len(prompts))]


class VLLMEngine:
    """One model in vLLM, split over ``tensor_parallel_size`` GPUs. Two of them (the policy
    and the reference) share an actor's GPUs, so each takes under half of their memory.
    Not yet run here: no GPU has been lent to this project (docs/generate.md)."""

    def __init__(self, path: str, mcfg, g, stop_ids: list[int]):
        from vllm import LLM

        self.llm = LLM(model=path, dtype=mcfg.dtype, tensor_parallel_size=g.tensor_parallel_size,
                       trust_remote_code=mcfg.trust_remote_code, gpu_memory_utilization=0.4, seed=g.seed)
        self.stop_ids = stop_ids

    def generate(self, prompts: list[list[int]], g, seed: int) -> list[list[list[int]]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(n=g.num_samples, temperature=g.temperature, top_p=g.top_p,
                                max_tokens=g.max_new_tokens, seed=seed, stop_token_ids=self.stop_ids)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        stops = set(self.stop_ids)
        return [[cut_at_stop(list(c.token_ids), stops) for c in o.outputs] for o in outs]
