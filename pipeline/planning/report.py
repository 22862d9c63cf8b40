"""The plan as text: one table per stage, its formulas beside its numbers."""

from __future__ import annotations

from .memory import GiB
from .plan import NOT_MODELLED, Plan, StagePlan


def gib(n: int | float) -> str:
    return f"{n / GiB:.2f}"


def _time(flops: int, devices: int, plan: Plan) -> str:
    if not plan.peak_tflops:
        return "its time: set device.peak_tflops"
    seconds = flops / (devices * plan.peak_tflops * 1e12 * plan.mfu)
    return (f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds:.1f} s") + f" at {plan.mfu:.0%} MFU"


def stage_text(s: StagePlan, plan: Plan) -> list[str]:
    m = s.memory
    on_gpu = s.overhead is None
    where = "per actor" if s.stage == "score" else "per rank"
    out = [f"## {s.stage}: {m.what if s.stage != 'score' else f'{s.world} actor(s)'}", "",
           f"| {where} | GiB | formula | phase | where |", "|---|---:|---|---|---|"]
    for x in m.lines:
        out.append(f"| {x.name} | {gib(x.bytes)} | {x.formula} | {', '.join(x.phases)} | {x.place} |")
    for phase in sorted({p for x in m.lines for p in x.phases}):  # a GPU's device memory; a CPU rank's is its host's
        device = m.total(phase, "device" if on_gpu else None)
        host = m.total(phase, "host") if on_gpu else 0
        out.append(f"| **total, {phase}** | {gib(device)} | | | " + (f"+ {gib(host)} host |" if host else "|"))
    out.append("| fixed overhead of the process | " + ("not modelled | CUDA context, NCCL workspace | | |" if on_gpu else
               f"{gib(s.overhead)} | measured on CPU (bench/plan_memory.py) | | |"))
    peak, phase = m.peak(place="device" if on_gpu else None)
    total = peak + (s.overhead or 0)
    verdict = ""
    if s.limit:
        room = s.limit - total
        share = "" if s.limit == plan.memory_gib * GiB else f" (its share: {gib(s.limit)} GiB)"
        verdict = f" of device.memory_gib {plan.memory_gib:g}{share}: " + ("fits" if room >= 0 else f"over by {gib(-room)} GiB")
    host = m.peak(place="host")[0] if on_gpu else 0
    out.append(f"| **peak ({phase})** | **{gib(total)}** | {verdict.strip()} | | "
               + (f"+ {gib(host)} host |" if host else "|"))
    out += [f"Note: {n}" for n in m.notes]
    if s.others:
        out += ["", f"Other settings, peak {where} (GiB): " + "; ".join(
            f"{label} {gib(dev)}" + (f" (+{gib(host)} host)" if host and on_gpu else "") for label, dev, host in s.others)]
    if s.largest_row is not None:
        out.append(f"Largest tokenize.max_tokens_per_row that fits device.memory_gib: {s.largest_row}")
    if s.flops_step is not None:
        line = f"FLOPs: {s.flops_step:.3e} a step of full rows"
        if s.stage != "score":
            line += f" ({_time(s.flops_step, s.world, plan)})"
        if s.flops_run is not None:
            line += f"; the run {s.flops_run:.3e} ({_time(s.flops_run, s.world, plan)})"
        elif not plan.rows_known:
            line += "; the run: after the tokenize stage (its rows' lengths)"
        out.append(line)
    return out + [""]


def plan_text(plan: Plan, source: str) -> str:
    f = plan.facts
    head = [f"# plan: {source}", "",
            f"Model: {f.params / 1e6:.1f}M parameters (vocab {f.shape.vocab}, hidden {f.shape.hidden}, "
            f"{f.shape.layers} layers, MLP {f.intermediate}, heads {f.heads}/{f.kv_dim // f.head_dim} x {f.head_dim}, "
            f"{'tied' if f.shape.tied else 'untied'} embeddings), {plan.dtype}.",
            f"Device memory: {f'{plan.memory_gib:g} GiB' if plan.memory_gib else 'unknown (device.memory_gib)'}; "
            f"peak: {f'{plan.peak_tflops:g} TFLOP/s' if plan.peak_tflops else 'unknown (device.peak_tflops)'}.", ""]
    head += [*plan.notes, ""] if plan.notes else []
    if not f.modelled:
        head += [f"Not modelled: {f.why_not}. The lines below count a dense model of the same widths.", ""]
    body = [line for s in plan.stages for line in stage_text(s, plan)]
    tail = ["Modelled: dense decoders (Llama, Qwen2, Mistral types), LoRA (a frozen base), activation offloading, "
            "gradient checkpointing, ZeRO 0-3, offload_optimizer and offload_param.",
            "Not modelled: " + "; ".join(NOT_MODELLED) + ". Formulas: docs/plan.md."]
    return "\n".join(head + body + tail) + "\n"
