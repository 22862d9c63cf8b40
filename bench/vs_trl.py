"""Side by side with TRL 1.16's DPOTrainer on identical tokens: train throughput, scoring
throughput, padding waste, peak memory, loss parity, MFU, and the largest micro-batch.

    .venv/bin/python bench/vs_trl.py [--models tiny,small] [--steps 12] [--row-tokens 2048]
    python3 bench/vs_trl.py --device cuda --models qwen1.5b --row-tokens 8192 --fit  # GPU
    python3 bench/vs_trl.py --report --results DIR   # the tables from saved results

Models (random init from a config; the tokenizer is the demo's, whatever the vocabulary):
``tiny`` (the demo Llama, 0.1M), ``small`` (the same architecture at hidden 512 x 8 layers,
19M), ``qwen0.5b`` and ``qwen1.5b`` (Qwen2.5's architectures: 0.49B and 1.54B).

* data: standard-format text pairs of varied length (``--pair-words``: prompt and completion
  word ranges), tokenised by our tokenize stage and by TRL's ``_prepare_dataset`` into the
  same token ids (checked here: the token totals of every micro-batch are equal);
* micro-batches: the same pairs in both. Our train stage runs one packed row per
  micro-batch; TRL's dataloader is given each packed row's pairs as one padded batch (a
  batch sampler built from our rows, in our step order), so both see the same pairs per
  optimizer step and their losses can be compared step by step;
* the same initial weights, dtype (``--dtype``: fp32 on CPU, bf16 on GPU; TRL with
  ``bf16=True`` on a bf16-loaded model, ours DeepSpeed bf16), AdamW (lr 1e-4, no weight
  decay, clip 1.0), linear schedule, gradient checkpointing (``--grad-ckpt``) and dropout
  off in both, one process;
* ours: the train stage core in-process (``stages.train.run_in_process``: DeepSpeed on one rank,
  ZeRO-3 and ZeRO-0); TRL: ``DPOTrainer`` with a live reference model, and with
  ``precompute_ref_log_probs=True`` (its precompute pass over the whole dataset, timed on
  its own, is the scoring peer of our score stage).

Each variant runs in a fresh subprocess and saves its result as JSON under ``--results``;
the tables are built from those files, so a GPU session can run the variants over several
calls. Peak memory is ``torch.cuda.max_memory_allocated`` on a GPU, the process's peak RSS
on CPU. Throughput counts pair tokens (prompt + completion of both sides, no padding: what
TRL computes per pair) per second; the train figures are over the optimizer steps after the
first two (warm-up). Our rows store each prompt once (``tokenize.share_prompt``; the
``-unshared`` variants store it on both sides), so we compute fewer tokens than the pairs
have; MFU counts the tokens actually computed: 6·N·tokens/s (train) and 2·N·tokens/s
(scoring) over the matmul peak measured in the same run (8192³ bf16 on a GPU, 4096³ fp32 on CPU), N the parameters that multiply (the input
embedding excluded; a tied LM head counted once).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LR = 1e-4
BETA = 0.1
QWEN = {  # Qwen2.5's published architectures (config.json), random init here
    "qwen0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                     num_key_value_heads=2),
    "qwen1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                     num_key_value_heads=2),
}


# ----------------------------------------------------------------------------- setup


def make_text_pairs(n: int, seed: int, words: str = "10-80,5-150") -> list[dict]:
    from pipeline.demo import make_pairs

    (p_lo, p_hi), (c_lo, c_hi) = [tuple(int(x) for x in part.split("-")) for part in words.split(",")]
    vocab = sorted({w for p in make_pairs(400, seed=0) for side in ("prompt", "chosen", "rejected")
                    for m in p[side] for w in m["content"].split()})
    rng = random.Random(seed)

    def text(lo, hi):
        return " ".join(rng.choice(vocab) for _ in range(rng.randint(lo, hi)))

    return [{"prompt": text(p_lo, p_hi), "chosen": " " + text(c_lo, c_hi), "rejected": " " + text(c_lo, c_hi)}
            for _ in range(n)]


def build_model(name: str, vocab_size: int, dtype: str):
    import torch

    from pipeline.demo import build_model as demo_model

    if name == "small":
        return demo_model(vocab_size, seed=0, hidden_size=512, layers=8)
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768,
                         rope_theta=1e6, rms_norm_eps=1e-6, **QWEN[name])
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # random init of 1.5B is quick there
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    return model.to({"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]).cpu()


def build_assets(out: Path, model: str, a) -> dict:
    """Tokenizer + model + pairs: the demo tokenizer, a model of the named size."""
    from pipeline.demo import make_assets, write_jsonl

    out.mkdir(parents=True, exist_ok=True)
    demo = make_assets(out / "demo")
    model_dir = demo["model"]
    if model != "tiny":
        model_dir = out / f"{model}-{a.dtype}"
        if not (model_dir / "config.json").exists():
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(demo["model"])
            build_model(model, len(tok), a.dtype).save_pretrained(model_dir, safe_serialization=True)
            tok.save_pretrained(model_dir)
    data = out / f"pairs-{a.pairs}-{a.pair_words.replace(',', '_')}-max{a.max_length}.jsonl"
    if not data.exists():
        from transformers import AutoTokenizer

        write_jsonl(whole_pairs(a, AutoTokenizer.from_pretrained(demo["model"])), data)
    return {"model": str(model_dir), "data": str(data)}


def whole_pairs(a, tokenizer) -> list[dict]:
    """``a.pairs`` pairs whose both sides fit ``--max-length`` whole. TRL and the pipeline
    truncate a long pair differently (TRL cuts the concatenation, the pipeline the
    completion with the prompt kept), so a pair either would cut is left out: both then
    train on the same tokens, which the comparison checks step by step."""
    def fits(p):
        return all(len(tokenizer(p["prompt"] + p[side])["input_ids"]) <= a.max_length
                   for side in ("chosen", "rejected"))

    candidates = make_text_pairs(4 * a.pairs, seed=1, words=a.pair_words)
    kept = [p for p in candidates if fits(p)][:a.pairs]
    if len(kept) < a.pairs:
        raise SystemExit(f"only {len(kept)} of {4 * a.pairs} generated pairs fit --max-length {a.max_length} "
                         f"whole; shorten --pair-words ({a.pair_words}) or raise --row-tokens")
    return kept


def our_config(out: Path, assets: dict, a, zero_stage: int | None = None, share_prompt: bool = True):
    from pipeline.core.config import config_from_dict

    threads = os.cpu_count() or 1
    gpu = a.device == "cuda"
    return config_from_dict({
        "run_dir": str(out / "run"),
        "model": {"path": assets["model"], "dtype": a.dtype, "attn_implementation": "segment_sdpa"},
        "data": {"train_files": [assets["data"]], "eval_fraction": 0.02},
        "tokenize": {"max_length": a.max_length, "max_tokens_per_row": a.row_tokens, "rows_per_shard": 64,
                     "share_prompt": share_prompt},
        "score": {"cpu_threads": threads},
        "train": {"loss_type": "sigmoid", "beta": BETA, "learning_rate": LR, "lr_scheduler_type": "linear",
                  "max_steps": a.steps, "eval_steps": 10**6, "num_workers": 1, "cpus_per_worker": threads,
                  "use_gpu": gpu, "gradient_checkpointing": a.grad_ckpt,
                  "zero_stage": a.zero_stage if zero_stage is None else zero_stage, "report_to": []},
    })


def pair_tokens(row: dict) -> int:
    """A packed row's tokens counted as TRL counts them, prompt on both sides: the row's
    own tokens plus the prompt tokens its shared-prompt rejected segments do not store."""
    prompts = row["prompt_lens"]
    return row["num_tokens"] + sum(prompts[i - 1] for i in range(1, len(prompts), 2) if prompts[i] == 0)


def step_batches(cfg, steps: int) -> tuple[list[list[str]], list[int], list[int]]:
    """Our first ``steps`` optimizer steps (1 rank, 1 micro-batch each): the pair ids of
    each packed row in order, each row's token count and its pair tokens (``pair_tokens``)."""
    from pipeline import runner
    from pipeline.core.packing import epoch_plan
    from pipeline.core.rows import RowReader, split_files

    rows = RowReader(split_files(runner.plan_stages(cfg)["tokenize"].dir, "train"),
                     columns=["pair_ids", "num_tokens", "prompt_lens"])
    plan = epoch_plan(rows.num_rows, 1, 1, cfg.train.seed, 0)[:steps]
    picked = [rows[step[0][0].row] for step in plan]
    return [r["pair_ids"] for r in picked], [r["num_tokens"] for r in picked], [pair_tokens(r) for r in picked]


def pair_index(cfg) -> dict[str, int]:
    """pair_id -> row index of the input file (our tokenizer, in-process)."""
    from pipeline.core import sources
    from pipeline.core.config import to_dict
    from pipeline.tokenizing.tokenize import TokenizeChunk, resolve_sources

    tok = TokenizeChunk(to_dict(cfg))
    out = {}
    for chunk in sources.plan_chunks(resolve_sources(cfg), 10**9):
        for rec in tok.tokenize_chunk(chunk):
            if rec.get("pair_id"):
                out[rec["pair_id"]] = rec["row_index"]
    return out


# ----------------------------------------------------------------------------- variants


def peak_mem_mib(device: str) -> float:
    """Peak memory of this process: the GPU allocator's peak, or the peak RSS on CPU."""
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synchronize(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def variant_prepare(out: Path, assets: dict, a) -> dict:
    """Our tokenize and score stages (in-process), in a subprocess of their own so the
    driver never holds GPU memory."""
    from pipeline import runner

    for share in (True, False):
        runner.run_pipeline(our_config(out, assets, a, share_prompt=share), stages=["tokenize", "score"],
                            use_ray=False, log=lambda _: None)
    return {}


def variant_peak(out: Path, assets: dict, a) -> dict:
    """The matmul peak of this machine, measured as the MFU denominator."""
    import torch

    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[a.dtype]
    n = 8192 if a.device == "cuda" else 4096
    torch.set_num_threads(os.cpu_count() or 1)
    x = torch.randn(n, n, dtype=dtype, device=a.device)
    y = torch.randn(n, n, dtype=dtype, device=a.device)
    reps = 20 if a.device == "cuda" else 3
    for _ in range(3 if a.device == "cuda" else 1):
        x @ y
    synchronize(a.device)
    start = time.perf_counter()
    for _ in range(reps):
        x @ y
    synchronize(a.device)
    seconds = (time.perf_counter() - start) / reps
    import deepspeed
    import transformers
    import trl

    return {"n": n, "dtype": a.dtype, "tflops": 2 * n**3 / seconds / 1e12, "machine": machine(a),
            "versions": f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, "
                        f"deepspeed {deepspeed.__version__}"}


def variant_ours_score(out: Path, assets: dict, a, share_prompt: bool = True) -> dict:
    import torch

    from pipeline import runner
    from pipeline.core.config import to_dict
    from pipeline.core.rundir import read_manifest
    from stages.score import ShardScorer

    cfg = our_config(out, assets, a, share_prompt=share_prompt)
    tok_dir = runner.plan_stages(cfg)["tokenize"].dir
    manifest = read_manifest(tok_dir)
    scratch = out / "score-bench"
    scratch.mkdir(exist_ok=True)
    scorer = ShardScorer(to_dict(cfg))
    torch.set_num_threads(os.cpu_count() or 1)
    shards = [s for s in manifest["shards"] if s["name"] != "quarantine.parquet"]
    synchronize(a.device)
    start = time.perf_counter()
    with profiled(a) as prof:
        for s in shards:
            scorer.score_shard(str(tok_dir / s["name"]), str(scratch / s["name"]))
        synchronize(a.device)
    seconds = time.perf_counter() - start
    stats = manifest["stats"]
    computed = stats["tokens"]
    tokens = computed + stats["train"]["shared_prompt_tokens"] + stats["eval"]["shared_prompt_tokens"]
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "computed_tokens_per_s": computed / seconds, "peak_mib": peak_mem_mib(a.device),
            "attention": attention_path(a), "profile": prof.summary(seconds),
            **dict(zip(("params", "matmul_params"), matmul_params(assets["model"])))}


def variant_ours_train(out: Path, assets: dict, a, zero_stage: int | None = None, share_prompt: bool = True) -> dict:
    from pipeline import runner
    from pipeline.core.rundir import read_manifest
    from pipeline.training.metrics import read_metrics

    cfg = our_config(out, assets, a, zero_stage, share_prompt)
    results = runner.run_pipeline(cfg, stages=["train"], force=True, use_ray=False, log=lambda _: None)
    steps = [r for r in read_metrics(results["train"]["dir"]) if "loss" in r]
    _, row_tokens, row_pair_tokens = step_batches(cfg, a.steps)
    if [r["tokens"] for r in steps] != row_tokens[:len(steps)]:  # one packed row per step, in plan order
        raise RuntimeError(f"steps ran other rows than planned: {[r['tokens'] for r in steps]} vs {row_tokens}")
    timed = steps[2:]
    seconds = sum(r["tokens"] / r["tokens_per_second"] for r in timed)
    computed = sum(r["tokens"] for r in timed)
    tokens = sum(row_pair_tokens[2:len(steps)])
    total, n_mm = matmul_params(assets["model"])
    stats = read_manifest(runner.plan_stages(cfg)["tokenize"].dir)["stats"]
    return {"losses": [r["loss"] for r in steps], "grad_norms": [r["grad_norm"] for r in steps],
            "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "computed_tokens_per_s": computed / seconds,
            "micro_batch_tokens": max(r["tokens"] for r in steps), "peak_mib": peak_mem_mib(a.device),
            "params": total, "matmul_params": n_mm, "waste": stats["train"]["waste_fraction"],
            "attention": attention_path(a)}


def attention_path(a) -> str:
    """Which kernel ran ``segment_sdpa``: torch's varlen flash attention (one call per
    layer; a GPU in bf16) or the per-segment SDPA loop."""
    import torch

    from pipeline.core import attention

    probe = torch.zeros(1, 1, 1, 64, dtype=getattr(torch, a.dtype), device=a.device)
    return "varlen" if attention.varlen_usable(probe) else "per-segment"


class profiled:
    """``with profiled(a) as p:`` runs the block under torch.profiler when ``--profile`` is
    given; ``p.summary(wall_seconds)`` is then where the time went (self time per op, on
    the GPU its kernels' time), else None. Profiling slows the block: its throughput is
    not comparable with an unprofiled run."""

    MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_mm")
    ATTENTION = ("scaled_dot_product", "flash_attention", "efficient_attention", "varlen")

    def __init__(self, a):
        self.a, self.prof = a, None

    def __enter__(self):
        if self.a.profile:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.a.device == "cuda" else [])
            self.prof = profile(activities=acts)
            self.prof.__enter__()
        return self

    def __exit__(self, *exc):
        if self.prof is not None:
            self.prof.__exit__(*exc)

    def summary(self, wall: float) -> dict | None:
        if self.prof is None:
            return None
        attr = "self_device_time_total" if self.a.device == "cuda" else "self_cpu_time_total"
        ops = {e.key: getattr(e, attr) / 1e6 for e in self.prof.key_averages()}
        ops = {k: v for k, v in ops.items() if v > 0}
        return {"wall_s": wall, "ops_s": sum(ops.values()), "ops": ops}


def merge_profiles(profiles: list) -> dict | None:
    """TRL's precompute runs once per split: one summary of all of them."""
    profiles = [p for p in profiles if p]
    if not profiles:
        return None
    ops: dict = {}
    for p in profiles:
        for k, v in p["ops"].items():
            ops[k] = ops.get(k, 0.0) + v
    return {"wall_s": sum(p["wall_s"] for p in profiles), "ops_s": sum(ops.values()), "ops": ops}


def profile_row(label: str, p: dict, top: int = 5) -> str:
    """Where a profiled pass spent its time: matmuls, attention, the largest other ops."""
    def share(words):
        return sum(v for k, v in p["ops"].items() if any(k.startswith(w) or w in k for w in words))
    matmul, attention = share(profiled.MATMUL), share(profiled.ATTENTION)
    others = sorted(((v, k) for k, v in p["ops"].items()
                     if not any(k.startswith(w) or w in k for w in profiled.MATMUL + profiled.ATTENTION)), reverse=True)
    rest = ", ".join(f"{k} {v / p['ops_s']:.1%}" for v, k in others[:top])
    return (f"| {label} | {p['wall_s']:.2f} | {p['ops_s']:.2f} | {matmul / p['ops_s']:.1%} | "
            f"{attention / p['ops_s']:.1%} | {rest} |")


def per_segment(variant):
    """The variant with ``segment_sdpa``'s one-call varlen path off (the per-segment loop)."""
    def run(out, assets, a):
        from pipeline.core import attention

        attention.use_varlen = False
        return variant(out, assets, a)
    return run


def variant_trl(out: Path, assets: dict, a, precompute: bool, weights: str | None = None,
                extra: dict | None = None, same_tokens: bool = True) -> dict:
    """``extra``: more DPOConfig settings (bench/tr_dpo.py: TR-DPO's). The result's
    ``wall_s``: from building the trainer (TRL tokenises there) to the end of ``train``.
    ``same_tokens``: refuse a micro-batch whose TRL token count is not ours (the loss
    parity needs it; a timing over an epoch only counts the ones that differ)."""
    import shutil

    import datasets
    import torch
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(os.cpu_count() or 1)
    cfg = our_config(out, assets, a)
    batches_ids, _, row_tokens = step_batches(cfg, a.steps)
    index = pair_index(cfg)
    batches = [[index[p] for p in ids] for ids in batches_ids]  # rows of the input file
    cache = out / "hf-cache"  # fresh: TRL would otherwise reuse reference log-probs cached by an earlier run
    shutil.rmtree(cache, ignore_errors=True)
    dataset = datasets.load_dataset("json", data_files=assets["data"], split="train", cache_dir=str(cache))

    timings: dict = {"precompute_s": 0.0, "steps": [], "losses": []}

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            synchronize(a.device)
            timings["t0"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            synchronize(a.device)
            timings["steps"].append(time.perf_counter() - timings["t0"])

    class SameBatches(DPOTrainer):
        def get_train_dataloader(self):
            return self.accelerator.prepare(DataLoader(self.train_dataset, batch_sampler=batches,
                                                       collate_fn=self.data_collator))

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if model.training:
                timings["losses"].append(float((loss[0] if return_outputs else loss).detach()))
            return loss

        def _precompute_ref_logps(self, dataset, name, batch_size):
            synchronize(a.device)
            start = time.perf_counter()
            with profiled(a) as prof:
                result = super()._precompute_ref_logps(dataset, name, batch_size)
                synchronize(a.device)
            seconds = time.perf_counter() - start
            timings["precompute_s"] += seconds
            timings.setdefault("precompute_profiles", []).append(prof.summary(seconds))
            timings["precompute_peak_mib"] = peak_mem_mib(a.device)
            return result

    mean_pairs = max(1, round(sum(len(b) for b in batches) / len(batches)))
    bf16 = a.dtype == "bfloat16"
    args = DPOConfig(
        output_dir=str(out / f"trl-{'pre' if precompute else 'live'}"), per_device_train_batch_size=mean_pairs,
        max_steps=a.steps, learning_rate=LR, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, beta=BETA, loss_type=["sigmoid"], max_length=None, logging_steps=1,
        report_to="none", save_strategy="no", eval_strategy="no", bf16=bf16, fp16=False,
        use_cpu=a.device == "cpu", gradient_checkpointing=a.grad_ckpt, dataloader_num_workers=0,
        precompute_ref_log_probs=precompute, precompute_ref_batch_size=mean_pairs, seed=cfg.train.seed,
        disable_tqdm=True, **(extra or {}),
    )
    tokenizer = AutoTokenizer.from_pretrained(assets["model"])
    # bf16 weights and Adam states (the usual TRL recipe: load in bf16, bf16=True), or, with
    # weights="float32", fp32 master weights under bf16 autocast, as DeepSpeed keeps ours
    weights = weights or a.dtype
    model = AutoModelForCausalLM.from_pretrained(assets["model"], attn_implementation="sdpa",
                                                 dtype=torch.bfloat16 if weights == "bfloat16" else torch.float32)
    wall = time.perf_counter()
    trainer = SameBatches(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                          callbacks=[Timer()])
    # identical tokens: TRL's tokenisation of these pairs has our token count
    ds = trainer.train_dataset
    prompt, chosen, rejected = ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"]
    real = [2 * len(p) + len(c) + len(r) for p, c, r in zip(prompt, chosen, rejected)]
    padded = [2 * len(b) * max(len(prompt[i]) + max(len(chosen[i]), len(rejected[i])) for i in b)
              for b in batches]
    trainer.train()
    wall = time.perf_counter() - wall
    losses = timings["losses"]  # unrounded (the Trainer's log rounds to 4 digits)
    step_tokens = [sum(real[i] for i in b) for b in batches]
    differ = sum(a != b for a, b in zip(step_tokens, row_tokens))
    if differ and same_tokens:  # TRL's token ids of each micro-batch are ours
        raise RuntimeError(f"token counts differ: TRL {step_tokens} vs ours {row_tokens}")
    seconds = sum(timings["steps"][2:])
    tokens = sum(step_tokens[2:len(timings["steps"])])
    grad_norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    return {"losses": losses, "grad_norms": grad_norms, "tokens": tokens, "seconds": seconds, "wall_s": wall,
            "micro_batches_differing": differ,
            "tokens_per_s": tokens / seconds, "micro_batch_tokens": max(padded), "micro_batch_pairs": mean_pairs,
            "precompute_s": timings["precompute_s"],
            "precompute_tokens_per_s": sum(real) / timings["precompute_s"] if precompute else None,
            "precompute_peak_mib": timings.get("precompute_peak_mib"),
            "precompute_profile": merge_profiles(timings.get("precompute_profiles", [])),
            "waste": 1 - sum(step_tokens) / sum(padded), "peak_mib": peak_mem_mib(a.device)}


VARIANTS = {
    "prepare": variant_prepare,
    "peak": variant_peak,
    "ours-score": variant_ours_score,
    "ours-score-unshared": lambda out, assets, a: variant_ours_score(out, assets, a, share_prompt=False),
    "ours-train": variant_ours_train,
    "ours-train-zero0": lambda out, assets, a: variant_ours_train(out, assets, a, zero_stage=0),
    "ours-train-unshared": lambda out, assets, a: variant_ours_train(out, assets, a, share_prompt=False),
    # the GPU's one-call varlen attention off: what it gains (on CPU these equal the above)
    "ours-score-persegment": per_segment(variant_ours_score),
    "ours-train-persegment": per_segment(variant_ours_train),
    "trl-live": lambda out, assets, a: variant_trl(out, assets, a, precompute=False),
    "trl-precompute": lambda out, assets, a: variant_trl(out, assets, a, precompute=True),
    # TRL with fp32 master weights and Adam states under bf16 autocast (ours keeps them so too)
    "trl-live-fp32-master": lambda out, assets, a: variant_trl(out, assets, a, precompute=False, weights="float32"),
}
MEASURED = [v for v in VARIANTS if v != "prepare"]
# fp32 master weights matter in bf16 only, and the varlen path runs on a GPU only
DEFAULT_VARIANTS = [v for v in MEASURED if v != "trl-live-fp32-master" and not v.endswith("-persegment")]


# ----------------------------------------------------------------------------- waste


def waste_realistic(row_tokens: int, pairs: int = 20000, seed: int = 0) -> dict:
    """Padding over computed tokens on the length mix of the README (prompts 50-800,
    completions 20-1000 tokens): our packing vs TRL's collator on random batches holding
    about as many real tokens as one of our rows."""
    import numpy as np
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from pipeline.core.packing import first_fit_decreasing

    rng = np.random.default_rng(seed)
    p = rng.integers(50, 801, pairs)
    c = rng.integers(20, 1001, pairs)
    r = rng.integers(20, 1001, pairs)
    lengths = 2 * p + c + r
    bins = first_fit_decreasing(lengths, row_tokens)
    ours = 1 - lengths.sum() / (len(bins) * row_tokens)
    shared = p + c + r  # tokenize.share_prompt: the prompt stored once
    shared_bins = first_fit_decreasing(shared, row_tokens)
    batch = max(1, round(row_tokens / lengths.mean()))
    collator = DataCollatorForPreference(pad_token_id=0)
    order = rng.permutation(pairs)
    real = computed = 0
    for start in range(0, pairs - batch + 1, batch):
        ex = [{"prompt_ids": [1] * int(p[i]), "chosen_ids": [1] * int(c[i]), "rejected_ids": [1] * int(r[i])}
              for i in order[start:start + batch]]
        out = collator(ex)
        real += int(out["attention_mask"].sum())
        computed += out["attention_mask"].numel()
    return {"row_tokens": row_tokens, "ours": float(ours), "trl_batch": batch, "trl": 1 - real / computed,
            "ours_shared": float(1 - shared.sum() / (len(shared_bins) * row_tokens)),
            # computed tokens (padding included) per pair token
            "ours_computed": len(bins) * row_tokens / lengths.sum(),
            "ours_shared_computed": len(shared_bins) * row_tokens / lengths.sum(), "trl_computed": computed / real}


# ----------------------------------------------------------------------------- driver


def result_path(a, model: str, name: str, row_tokens: int | None = None) -> Path:
    return Path(a.results) / f"{model}-{name}-{row_tokens or a.row_tokens}.json"


def run_variant(name: str, model: str, a, row_tokens: int | None = None, steps: int | None = None,
                tag: str = "", pairs: int | None = None) -> dict | None:
    """One variant in a fresh process; its result is saved as ``<model>-<name><tag>-<row
    tokens>.json``. None: a ``tag``-ged try ran out of memory."""
    cmd = [sys.executable, __file__, "--one", name, "--models", model, "--steps", str(steps or a.steps),
           "--row-tokens", str(row_tokens or a.row_tokens), "--max-length", str(a.max_length),
           "--pairs", str(pairs or a.pairs), "--pair-words", a.pair_words, "--out", str(a.out),
           "--zero-stage", str(a.zero_stage), "--device", a.device, "--dtype", a.dtype]
    if a.grad_ckpt:
        cmd.append("--grad-ckpt")
    if a.profile:
        cmd.append("--profile")
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TQDM_DISABLE="1"))
    print(f"  {model} {name} rows={row_tokens or a.row_tokens}: rc {proc.returncode}, "
          f"{time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    if proc.returncode != 0:
        tail = proc.stderr[-3000:]
        if tag and "out of memory" in tail.lower():
            result_path(a, model, name + tag + "-oom", row_tokens).write_text(json.dumps({"oom": True}))
            return None
        raise RuntimeError(f"{name} ({model}) failed:\n{tail}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if name != "prepare":
        result_path(a, model, name + tag, row_tokens).write_text(json.dumps(dict(
            result, model=model, variant=name, device=a.device, dtype=a.dtype, row_tokens=row_tokens or a.row_tokens,
            steps=steps or a.steps, grad_ckpt=a.grad_ckpt, date=time.strftime("%Y-%m-%d"))))
    return result


def fit_search(model: str, a) -> None:
    """Double the micro-batch (our row tokens; TRL's pairs of such a row) until it no longer
    fits: 3 optimizer steps per try, in a process of its own, on ``--fit-pairs`` pairs."""
    for side in a.fit.split(","):
        tokens = a.row_tokens
        while tokens <= a.fit_limit:
            run_variant("prepare", model, a, row_tokens=tokens, steps=3, pairs=a.fit_pairs)
            if run_variant(side, model, a, row_tokens=tokens, steps=3, tag="-fit", pairs=a.fit_pairs) is None:
                break
            tokens *= 2


def machine(a) -> str:
    """Called inside a variant, on the machine measured."""
    import torch

    if a.device == "cuda":
        return f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)"
    return f"{platform.machine()} CPU, {os.cpu_count()} cores"


def matmul_params(model_dir: str) -> tuple[int, int]:
    """(all parameters, the ones that multiply: input embedding out, a tied head counted once)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight
    tied = embed is model.get_output_embeddings().weight
    return total, total if tied else total - embed.numel()


def load_results(a, model: str, row_tokens: int | None = None) -> dict:
    found = {}
    for name in MEASURED:
        path = result_path(a, model, name, row_tokens)
        if path.exists():
            found[name] = json.loads(path.read_text())
    return found


def fmt(x, spec=".0f", missing="-"):
    return missing if x is None else format(x, spec)


def report(a) -> str:
    mem = "peak GPU MiB (max_memory_allocated)" if a.device == "cuda" else "peak RSS MiB"
    lines = []
    for model in a.models.split(","):
        r = load_results(a, model)
        first = r.get("ours-train") or r.get("ours-score")  # a scoring-only run (--profile) has no train
        if not first or "peak" not in r:
            continue
        if not lines:
            p = r["peak"]
            lines = [f"# vs TRL DPOTrainer: {p['machine']}, {p['versions']}, {a.dtype}, gradient checkpointing "
                     f"{'on' if a.grad_ckpt else 'off'}, {a.steps} steps (first 2 untimed), rows of {a.row_tokens} "
                     f"tokens, {first['date']}"]
        total, n_mm = first["params"], first["matmul_params"]
        peak = r["peak"]["tflops"]

        def mfu(tokens_per_s, factor):
            return None if not peak else factor * n_mm * tokens_per_s / (peak * 1e12)

        ours, zero0, unshared, live, pre, score, score_unshared, live32, seg_train, seg_score = (
            r.get(k, {}) for k in ("ours-train", "ours-train-zero0", "ours-train-unshared", "trl-live", "trl-precompute",
                                   "ours-score", "ours-score-unshared", "trl-live-fp32-master",
                                   "ours-train-persegment", "ours-score-persegment"))
        lines += ["", f"## {model}: {total / 1e6:.2f}M parameters ({n_mm / 1e6:.2f}M multiply per token)"
                  + (f"; matmul peak {peak:.3g} TFLOP/s ({r['peak']['n']}³ {r['peak']['dtype']})" if peak else "")]
        if ours:
            lines += [f"| train | pair tokens/s | ours / it | {mem} | ours / it | MFU | step-1 loss |",
                      "|---|---:|---:|---:|---:|---:|---:|"]
        base = ours.get("tokens_per_s")
        for label, v in ((f"ours: train stage (ZeRO-{a.zero_stage}, packed rows, shared prompts, "
                          f"{ours.get('attention', 'per-segment')} attention)", ours),
                         ("ours: the same, ZeRO-0 (one rank: no partitioning to pay for)", zero0),
                         (f"ours: ZeRO-{a.zero_stage}, prompts not shared (tokenize.share_prompt: false)", unshared),
                         ("ours: the same as the first, per-segment attention loop (no varlen)", seg_train),
                         ("TRL, live reference", live),
                         ("TRL, live reference, fp32 master weights under bf16 autocast", live32),
                         ("TRL, precomputed reference (train steps only)", pre)):
            if not v or not ours:
                continue
            mine = v is zero0 or v is unshared or v is seg_train  # ours: it over ours; the others: ours over it
            ratio = "1.00" if v is ours else (f"{v['tokens_per_s'] / base:.2f} (over the first)"
                                              if mine else f"{base / v['tokens_per_s']:.2f}")
            mem_ratio = "1.00" if v is ours else (f"{v['peak_mib'] / ours['peak_mib']:.2f} (over the first)"
                                                  if mine else f"{ours['peak_mib'] / v['peak_mib']:.2f}")
            computed = v.get("computed_tokens_per_s", v["tokens_per_s"])  # MFU counts what was computed
            lines.append(f"| {label} | {v['tokens_per_s']:.0f} | {ratio} | {v['peak_mib']:.0f} | {mem_ratio} | "
                         f"{fmt(mfu(computed, 6), '.1%')} | {v['losses'][0]:.6f} |")
        if score and pre:
            lines += ["", f"| scoring | pair tokens/s | ours / TRL | {mem} | MFU |", "|---|---:|---:|---:|---:|"]
            for label, v in ((f"ours: score stage core (packed rows, shared prompts, "
                              f"{score.get('attention', 'per-segment')} attention)", score),
                             ("ours: the same, prompts not shared", score_unshared),
                             ("ours: the same as the first, per-segment attention loop (no varlen)", seg_score)):
                if v:
                    lines.append(f"| {label} | {v['tokens_per_s']:.0f} | "
                                 f"{v['tokens_per_s'] / pre['precompute_tokens_per_s']:.2f} | {v['peak_mib']:.0f} | "
                                 f"{fmt(mfu(v.get('computed_tokens_per_s', v['tokens_per_s']), 2), '.1%')} |")
            lines.append(f"| TRL precompute_ref_log_probs pass (whole dataset, batches of {pre['micro_batch_pairs']} "
                         f"pairs) | {pre['precompute_tokens_per_s']:.0f} | 1.00 | "
                         f"{fmt(pre.get('precompute_peak_mib'))} | {fmt(mfu(pre['precompute_tokens_per_s'], 2), '.1%')} |")
            if score.get("profile") and pre.get("precompute_profile"):
                lines += ["", "Where the scoring time goes (`--profile`: torch.profiler self time per op"
                          + (", GPU kernels" if a.device == "cuda" else "") + "; a profiled run is slower):", "",
                          "| scoring pass | wall s | in ops s | matmul | attention | largest other ops |",
                          "|---|---:|---:|---:|---:|---|",
                          profile_row("ours: score stage core", score["profile"]),
                          profile_row("TRL precompute pass", pre["precompute_profile"])]
        if live and ours:
            k = min(len(ours["losses"]), len(live["losses"]), len(pre.get("losses", live["losses"])))
            diff_live = max(abs(x - y) for x, y in zip(ours["losses"][:k], live["losses"][:k]))
            diff_pre = max(abs(x - y) for x, y in zip(ours["losses"][:k], pre.get("losses", live["losses"])[:k]))
            lines += ["", f"- parity: max |loss ours - TRL| over the first {k} steps: live {diff_live:.2e}, "
                      f"precomputed {diff_pre:.2e}; step 1: ln 2 = {math.log(2):.6f}; step-1 grad norm ours "
                      f"{ours['grad_norms'][0]:.6f}, TRL live {live['grad_norms'][0]:.6f}"
                      + (f", precomputed {pre['grad_norms'][0]:.6f}" if pre else ""),
                      f"- padding waste on these micro-batches: TRL {live['waste']:.1%} (same pairs per batch), "
                      f"ours {ours['waste']:.1%} (packing, whole train split)"]
        fits = fit_table(a, model)
        if fits:
            lines += ["", "| largest micro-batch that fits (3 steps) | token budget | tokens computed (max) | " + mem
                      + " | first that did not fit |", "|---|---:|---:|---:|---:|"] + fits
    lines += ["", "## waste on the realistic length mix (20k pairs; prompts 50-800, completions 20-1000 tokens)",
              "Padding over computed tokens, and computed tokens (padding included) per pair token.", "",
              "| row tokens | ours, prompts shared | ours, not shared | TRL batch (pairs) | TRL collator, random "
              "batches | computed per pair token: ours shared / not shared / TRL |",
              "|---:|---:|---:|---:|---:|---:|"]
    for row_tokens in (4096, 8192):
        w = waste_realistic(row_tokens)
        lines.append(f"| {row_tokens} | {w['ours_shared']:.2%} | {w['ours']:.2%} | {w['trl_batch']} | {w['trl']:.2%} "
                     f"| {w['ours_shared_computed']:.3f} / {w['ours_computed']:.3f} / {w['trl_computed']:.3f} |")
    return "\n".join(lines)


def fit_table(a, model: str) -> list[str]:
    """The largest budget that ran, per side, and the first that did not."""
    lines = []
    for side, label in (("ours-train", "ours (one packed row)"), ("trl-live", "TRL, live reference (the same pairs)")):
        tries = {int(p.stem.rsplit("-", 1)[1]): json.loads(p.read_text())
                 for p in Path(a.results).glob(f"{model}-{side}-fit*-*.json")}
        fitted = sorted(n for n, r in tries.items() if not r.get("oom"))
        ooms = sorted(n for n, r in tries.items() if r.get("oom"))
        if not fitted:
            continue
        best = tries[fitted[-1]]
        lines.append(f"| {label} | rows of {fitted[-1]} | {best['micro_batch_tokens']} | {best['peak_mib']:.0f} | "
                     f"{'rows of ' + str(ooms[0]) if ooms else 'not reached (--fit-limit)'} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="tiny,small")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--row-tokens", type=int, default=2048)
    ap.add_argument("--max-length", type=int, default=None, help="pair length cap (default: row tokens / 2)")
    ap.add_argument("--pairs", type=int, default=400)
    ap.add_argument("--pair-words", default="10-80,5-150", help="prompt and completion word ranges")
    ap.add_argument("--zero-stage", type=int, default=3)
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when there is one")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: bf16 on cuda")
    ap.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing in both")
    ap.add_argument("--profile", action="store_true", help="run the scoring passes (ours-score, trl-precompute) "
                    "under torch.profiler and break their time down (use a separate --results)")
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    ap.add_argument("--fit", default="", help="search the largest micro-batch that fits for these variants "
                    "(ours-train,trl-live)")
    ap.add_argument("--fit-limit", type=int, default=131072)
    ap.add_argument("--fit-pairs", type=int, default=400)
    ap.add_argument("--report", action="store_true", help="only print the tables from --results")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-vs-trl"))
    ap.add_argument("--results", default=None, help="default: <out>/results")
    ap.add_argument("--one")
    a = ap.parse_args()
    if a.device is None:
        import torch

        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    a.dtype = a.dtype or ("bfloat16" if a.device == "cuda" else "float32")
    a.max_length = a.max_length or a.row_tokens // 2
    a.results = a.results or str(Path(a.out) / "results")
    Path(a.results).mkdir(parents=True, exist_ok=True)
    if a.one:
        out = Path(a.out) / a.models
        assets = build_assets(out, a.models, a)
        print(json.dumps(VARIANTS[a.one](out, assets, a)))
        return
    if not a.report:
        for model in a.models.split(","):
            run_variant("prepare", model, a)
            for name in filter(None, a.variants.split(",")):
                run_variant(name, model, a)
            if a.fit:
                fit_search(model, a)
    print(report(a))


if __name__ == "__main__":
    main()
