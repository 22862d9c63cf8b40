"""Peak memory of the log-prob pass: chunked LM head (pipeline.core.logps) vs naive
log_softmax + gather, forward + backward, at a 150k and an 8k vocabulary.

Each variant runs in a fresh subprocess; on CPU the figure is the growth of the peak RSS
over the inputs already allocated, on GPU torch.cuda.max_memory_allocated over the same.

    .venv/bin/python bench/logps_memory.py [--tokens 4096] [--hidden 512] [--chunk 1024]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time


def measure(variant: str, vocab: int, tokens: int, hidden: int, chunk: int) -> dict:
    import torch

    from pipeline.core.logps import lm_head_target_logps

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    torch.manual_seed(0)
    h = torch.randn(tokens, hidden, device=device, requires_grad=True)
    head = torch.nn.Linear(hidden, vocab, bias=False).to(device)
    targets = torch.randint(0, vocab, (tokens,), device=device)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    if variant == "chunked":
        logps, _, _ = lm_head_target_logps(head, h, targets, chunk)
    else:
        logps = torch.log_softmax(head(h).float(), -1).gather(-1, targets[:, None]).squeeze(-1)
    logps.sum().backward()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"variant": variant, "vocab": vocab, "peak_mib": peak / 2**20, "seconds": time.perf_counter() - start}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--one", nargs=2, metavar=("VARIANT", "VOCAB"))
    a = ap.parse_args()
    if a.one:
        print(json.dumps(measure(a.one[0], int(a.one[1]), a.tokens, a.hidden, a.chunk)))
        return
    rows = []
    for vocab in (150_000, 8_000):
        for variant in ("naive", "chunked"):
            out = subprocess.run([sys.executable, __file__, "--one", variant, str(vocab), "--tokens", str(a.tokens),
                                  "--hidden", str(a.hidden), "--chunk", str(a.chunk)],
                                 capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    import torch

    print(f"# log-prob pass, forward + backward: {a.tokens} tokens, hidden {a.hidden}, chunk {a.chunk}, "
          f"fp32, {'cuda' if torch.cuda.is_available() else 'cpu'} ({platform.processor() or platform.machine()}), "
          f"torch {torch.__version__}")
    print("| vocab | naive peak MiB | chunked peak MiB | ratio | naive s | chunked s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for vocab in (150_000, 8_000):
        n = next(r for r in rows if r["vocab"] == vocab and r["variant"] == "naive")
        c = next(r for r in rows if r["vocab"] == vocab and r["variant"] == "chunked")
        print(f"| {vocab} | {n['peak_mib']:.0f} | {c['peak_mib']:.0f} | {c['peak_mib'] / n['peak_mib']:.3f} | "
              f"{n['seconds']:.2f} | {c['seconds']:.2f} |")


if __name__ == "__main__":
    main()
