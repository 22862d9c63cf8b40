"""ZeRO-3 prefetches parameters: DeepSpeed starts each step of its trace in a pre-forward
hook of the top-level module, which runs because the log-prob pass is that module's
forward, called as ``engine(row)`` (pipeline/training/forward.py). On 2 ranks: the trace completes
within the first steps, stays complete across evals and checkpoints, prefetches run, and
the losses are bitwise those of the run without prefetching."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import tiny_config, write_config
from pipeline import runner
from pipeline.training.engine import free_port

HERE = Path(__file__).parent


def probe(assets, tmp_path, mode: str) -> tuple[list[dict], list[dict]]:
    cfg = tiny_config(assets, tmp_path / mode, tokenize={"max_tokens_per_row": 256},
                      train={"max_steps": 6, "eval_steps": 2, "save_steps": 2, "num_workers": 2,
                             "gradient_accumulation_steps": 2, "zero_stage": 3, "cpus_per_worker": 1})
    runner.run_pipeline(cfg, stages=["tokenize", "score"], use_ray=False, log=lambda _: None)
    path = write_config(cfg, tmp_path / f"{mode}.yaml")
    prefix = tmp_path / f"{mode}-stats"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()), str(HERE / "zero3_trace_probe.py"),
                           str(path), mode, str(prefix)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    stats = [json.loads(Path(f"{prefix}.rank{r}.json").read_text()) for r in (0, 1)]
    train_dir = Path(runner.plan_stages(cfg)["train"].dir)
    records = [json.loads(x) for x in (train_dir / "metrics.jsonl").read_text().splitlines()]
    return stats, records


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_zero3_trace_completes_prefetches_and_leaves_the_losses_bitwise(assets, tmp_path):
    fixed, fixed_records = probe(assets, tmp_path, "fixed")
    unfixed, unfixed_records = probe(assets, tmp_path, "unfixed")
    for rank in fixed:
        states = rank["complete_after_reset"]
        # 6 steps x 2 micro-batches, 4 evals (steps 0, 2, 4, 6) of this rank's eval rows
        assert len(states) > 12
        # A trace recorded on a forward alone (the load-time probe's, or the step-0 eval's)
        # does not match the first training backward: DeepSpeed drops it, records forward +
        # backward, and from then on the trace is complete and never lost again: not by the
        # later evals, not by checkpoints.
        events = rank["events"]
        first_checkpoint = next(i for i, e in enumerate(events) if e.startswith("checkpoint"))
        assert not any(e.startswith("invalidated") for e in events[first_checkpoint:]), events
        settled = max(int(e.split()[-1]) for e in events if e.startswith("invalidated")) + 2
        assert all(states[settled:]), (states, events)
        assert rank["prefetches"] > 0
    for rank in unfixed:  # the hook removed: only the load-time probe's forwards start a step
        assert rank["complete_after_reset"].count(True) <= 1 and rank["prefetches"] == 0, rank
    assert [r for r in fixed_records if "loss" in r] != []
    strip = ("tokens_per_second", "time", "elapsed", "eta_seconds")
    assert ([{k: v for k, v in r.items() if k not in strip} for r in fixed_records]
            == [{k: v for k, v in r.items() if k not in strip} for r in unfixed_records])
