"""Where a train rank's memory goes, phase by phase: ZeRO-3 against ZeRO-0, 1 and 2 ranks.

Each configuration runs in fresh processes (``torchrun``, gloo, CPU): every rank builds the
train stage's engine (``pipeline.training.engine.build_engine``: the policy loaded under
``zero.Init``, the optimizer, the schedule), then runs ``--steps`` optimizer steps of the
train stage's log-prob pass (the completion tokens' NLL, through ``engine(row)``) over a packed row of
``--tokens`` tokens. Each rank records its resident memory (RSS) and its peak so far
after each phase, and the bytes DeepSpeed holds in its own buffers. The arithmetic to
compare with is ``16·N/world`` (fp32 weights, gradients and Adam's two moments).

    .venv/bin/python bench/zero3_memory.py [--model qwen0.5b] [--configs 3x1,3x2,0x1] [--tokens 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MiB = 2**20


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def tensor_bytes(tensors) -> int:
    """Bytes of distinct storages among ``tensors`` (views and shared buffers once)."""
    import torch

    seen, total = set(), 0
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.numel() == 0:
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def zero_buffers(engine) -> dict[str, int]:
    """The bytes of the ZeRO-3 optimizer's own buffers, by role."""
    opt = engine.optimizer
    out = {}
    if hasattr(opt, "fp16_partitioned_groups_flat"):
        out["param partitions"] = tensor_bytes(opt.fp16_partitioned_groups_flat)
        out["fp32 master copies"] = tensor_bytes(
            t for t in opt.fp32_partitioned_groups_flat
            if all(t.untyped_storage().data_ptr() != p.untyped_storage().data_ptr()
                   for p in opt.fp16_partitioned_groups_flat if p is not None))
        grads = getattr(opt, "grad_partitions_flat_buffer", None)
        out["gradient partitions"] = tensor_bytes([grads]) if grads is not None else 0
        out["reduce bucket"] = tensor_bytes(getattr(b, "buffer", None) for b in getattr(opt, "ipg_buckets", {}).values())
    inner = getattr(opt, "optimizer", opt)
    out["optimizer state"] = tensor_bytes(v for s in inner.state.values() for v in s.values())
    return out


def worker(a) -> None:
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // int(os.environ.get("WORLD_SIZE", "1"))))
    from pipeline.core.config import ModelConfig, TrainConfig
    from pipeline.training.engine import build_engine, init_distributed
    from pipeline.training.forward import row_loss
    from stages.sft.objective import SFTObjective

    if a.zero:  # extra zero_optimization settings, over the train stage's own
        import cluster.deepspeed_config as deepspeed_config

        built = deepspeed_config.build_ds_config
        extra = {k: int(float(v)) if float(v).is_integer() else float(v)
                 for k, v in (kv.split("=") for kv in a.zero.split(","))}

        def build_ds_config(*args, **kwargs):
            ds = built(*args, **kwargs)
            ds["zero_optimization"].update(extra)
            return ds

        deepspeed_config.build_ds_config = build_ds_config
    rank, world = init_distributed("gloo")
    phases = [("imports", rss(), peak())]
    offload = {f"offload_{w}": {"device": "cpu"} for w in (getattr(a, "offload", None) or "").split("+") if w}
    train_cfg = TrainConfig(zero_stage=a.stage, num_workers=world, learning_rate=1e-5, report_to=[],
                            gradient_checkpointing=bool(getattr(a, "gc", False)),
                            deepspeed={"zero_optimization": offload} if offload else None)
    model_cfg = ModelConfig(path=a.model_dir, dtype="float32", attn_implementation="segment_sdpa")
    # the NLL of the completion tokens: the log-prob pass and its backward, through engine(row)
    engine = build_engine(train_cfg, model_cfg, world, 10, SFTObjective(1024), torch.device("cpu"))
    phases.append(("engine built", rss(), peak()))
    n = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    seg = a.tokens // 8  # four pairs: chosen and rejected of tokens/8 each, a quarter of it prompt
    vocab = engine.module.config.vocab_size
    row = {"input_ids": [(7 * i + rank) % vocab for i in range(8 * seg)],
           "position_ids": [i % seg for i in range(8 * seg)], "seq_lens": [seg] * 8, "prompt_lens": [seg // 4] * 8,
           "num_tokens": 8 * seg}
    for step in range(a.steps):
        loss = row_loss(engine, row).loss_sum / a.tokens
        phases.append((f"step {step + 1} forward", rss(), peak()))
        engine.backward(loss)
        phases.append((f"step {step + 1} backward", rss(), peak()))
        engine.step()
        phases.append((f"step {step + 1} optimizer", rss(), peak()))
    line = "RESULT " + json.dumps({"rank": rank, "world": world, "stage": a.stage, "params": n,
                                   "phases": phases, "buffers": zero_buffers(engine)}) + "\n"
    sys.stdout.flush()
    os.write(1, line.encode())  # one write: two ranks' lines never interleave on the shared pipe
    import torch.distributed as dist

    dist.barrier()  # every rank done before gloo's threads go: an exit under a live collective aborts
    dist.destroy_process_group()


def run_config(model_dir: str, stage: int, world: int, a) -> list[dict]:
    from pipeline.training.engine import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", f"--master_port={free_port()}",
           __file__, "--worker", "--model-dir", model_dir, "--stage", str(stage), "--tokens", str(a.tokens),
           "--steps", str(a.steps)] + (["--zero", a.zero] if a.zero else []) + (["--gc"] if getattr(a, "gc", False) else []) \
        + (["--offload", a.offload] if getattr(a, "offload", None) else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // world)))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=3600)
    if out.returncode:
        sys.exit(f"ZeRO-{stage} x{world}: {out.stderr[-4000:]}")
    return sorted((json.loads(line[7:]) for line in out.stdout.splitlines() if line.startswith("RESULT ")),
                  key=lambda r: r["rank"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen0.5b")
    ap.add_argument("--configs", default="0x1,3x1,3x2", help="ZeRO stage x ranks, comma-separated")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-zero3-memory"))
    ap.add_argument("--zero", help="extra zero_optimization settings, KEY=VALUE,... (e.g. "
                                   "stage3_max_live_parameters=1e8)")
    ap.add_argument("--gc", action="store_true", help="gradient checkpointing")
    ap.add_argument("--offload", help="optimizer, param or optimizer+param: ZeRO-Offload to the CPU")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--stage", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a)
        return
    from bench.vs_trl import build_assets

    assets = build_assets(Path(a.out), a.model, argparse.Namespace(dtype="float32", pairs=8, pair_words="10-20,5-10",
                                                                    max_length=64))
    results = {}
    for spec in a.configs.split(","):
        stage, world = (int(x) for x in spec.split("x"))
        start = time.perf_counter()
        results[spec] = run_config(assets["model"], stage, world, a)
        print(f"# ZeRO-{stage} x{world}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    (Path(a.out) / "results.json").write_text(json.dumps(results, indent=1))
    report(results, a)


def report(results: dict, a) -> None:
    import deepspeed
    import torch

    first = next(iter(results.values()))[0]
    n = first["params"]
    print(f"# train rank memory: {a.model} ({n / 1e6:.0f}M parameters), fp32, {platform.machine()} CPU, gloo, "
          + (f"zero_optimization + {a.zero}, " if a.zero else "") +
          f"a packed row of {a.tokens} tokens, {a.steps} steps, torch {torch.__version__}, deepspeed "
          f"{deepspeed.__version__}, {time.strftime('%Y-%m-%d')}")
    print("| config | rank | 16·N/world MiB | peak RSS MiB | peak over the imports MiB | over / arithmetic | "
          "at engine built | after step 1 forward | backward | optimizer | after the last step |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for ranks in results.values():
        for r in ranks:
            ph = {name: (cur, pk) for name, cur, pk in r["phases"]}
            arith = 16 * n / r["world"]
            base = ph["imports"][0]
            top = r["phases"][-1][2]
            cols = [ph[k][0] / MiB for k in ("engine built", "step 1 forward", "step 1 backward",
                                                 "step 1 optimizer")] + [r["phases"][-1][1] / MiB]
            print(f"| ZeRO-{r['stage']} x{r['world']} | {r['rank']} | {arith / MiB:.0f} | {top / MiB:.0f} | "
                  f"{(top - base) / MiB:.0f} | {(top - base) / arith:.2f} | "
                  + " | ".join(f"{c:.0f}" for c in cols) + " |")
    print("\nDeepSpeed's buffers per rank (MiB):")
    for ranks in results.values():
        print(f"- ZeRO-{ranks[0]['stage']} x{ranks[0]['world']}: "
              + ", ".join(f"{k} {v / MiB:.0f}" for k, v in ranks[0]["buffers"].items()))


if __name__ == "__main__":
    main()
