"""Per-rank memory of a training stage and of a score actor, line by line, each with its
formula (docs/plan.md derives them).

Notation: N parameters (Nt of them trained: all, or LoRA's adapters), W ranks, b bytes a
parameter in model.dtype, T tokens of one packed row (tokenize.max_tokens_per_row), C
the LM head's chunk (model.logp_chunk_tokens), V vocabulary, h hidden, i MLP width, a
query heads x head_dim, k key/value heads x head_dim, H query heads, L layers.

A rank's memory goes through two phases, and its peak is the larger:

- **forward and backward**: the model states, the activations one packed row saves for
  its backward, and the backward's own buffers at its largest point, the LM head's (its
  fp32 weight-gradient accumulator and one chunk of logits), where every activation is
  still held;
- **optimizer step**: the model states with every gradient, and the step's temporaries.

Activations are counted from what autograd saves in a Llama/Qwen2-type decoder layer
(RMSNorm computing in fp32, GQA attention through SDPA, SwiGLU MLP), per token:
b·(4i + 4h + n·a + 2k) + 4·(2h + H + 2) bytes (the MLP's gate, up, act and product; the
norms' outputs and the projections' inputs; q, the attention output and, where
segment_sdpa runs a segment at a time (on a CPU, or fp32), its concatenation: n = 3, else
n = 2; k and v; the norms' fp32 inputs, the attention's log-sum-exp per head, two rsqrt),
checked against autograd's saved tensors in tests/test_plan.py. ``eager`` attention also
saves its H·T² probabilities, which the lines leave out (docs/plan.md).

Where a rank's tensors live differs between a GPU and the CPU: on a GPU a buffer DeepSpeed
allocates whole (a ZeRO-1/2 gradient bucket) is resident at once; on the CPU only the
pages written are, so its lines count what is written. Offloaded states are "host".
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .model import ModelFacts

GiB = 1024**3
# DeepSpeed 0.19's defaults for what the pipeline does not set (deepspeed/runtime/zero/config.py)
DS_DEFAULTS = {"reduce_bucket_size": 500_000_000, "stage3_max_live_parameters": 1_000_000_000,
               "stage3_prefetch_bucket_size": 50_000_000, "sub_group_size": 1_000_000_000}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Line:
    name: str
    bytes: int
    formula: str
    phases: tuple[str, ...]  # "backward", "step"
    place: str = "device"  # "host": offloaded (the same memory as the device's on a CPU rank)


@dataclass
class RankMemory:
    """One rank's (or actor's) lines; totals per phase and place."""

    what: str
    lines: list[Line] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, name: str, nbytes: float, formula: str, phases=("backward", "step"), place: str = "device"):
        if nbytes:
            self.lines.append(Line(name, int(nbytes), formula, tuple(phases), place))

    def total(self, phase: str, place: str | None = None) -> int:
        return sum(x.bytes for x in self.lines if phase in x.phases and (place is None or x.place == place))

    def peak(self, place: str | None = "device") -> tuple[int, str]:
        """The larger phase's total and its name."""
        phases = sorted({p for x in self.lines for p in x.phases})
        return max(((self.total(p, place), p) for p in phases), default=(0, "-"))


@dataclass(frozen=True)
class TrainShape:
    """What a training stage's rank memory depends on, from its settings and DeepSpeed JSON."""

    zero_stage: int
    world: int
    dtype: str
    tokens: int  # T: one packed row
    chunk: int  # C: the LM head's chunk
    gradient_checkpointing: bool = False
    activation_offloading: bool = False
    optimizer: str = "adamw"
    lora_params: int | None = None  # trained adapter parameters; None: full fine-tuning
    offload_optimizer: bool = False
    offload_param: bool = False
    on_gpu: bool = False
    ds: dict = field(default_factory=dict)  # zero_optimization as merged (bucket sizes ...)
    attention: str = "segment_sdpa"  # model.attn_implementation
    accumulation: int = 1  # gradient_accumulation_steps: > 1 keeps the gradients through the next backward

    @property
    def attention_outputs(self) -> int:
        """a-sized tensors the attention saves besides q: its output, and segment_sdpa's
        per-segment loop (CPU, or fp32 on a GPU: no varlen kernel) also the concatenation."""
        loop = self.attention == "segment_sdpa" and (not self.on_gpu or self.dtype == "float32")
        return 2 if loop else 1

    def setting(self, key: str) -> int:
        return int(float(self.ds.get(key, DS_DEFAULTS[key])))


def activations(m: RankMemory, f: ModelFacts, s: TrainShape) -> None:
    """The activations one packed row saves, and the backward's largest buffers."""
    b, T, C = DTYPE_BYTES[s.dtype], s.tokens, s.chunk
    h, i, a, k, H, L, V = f.shape.hidden, f.intermediate, f.shape.attn_dim, f.kv_dim, f.heads, f.shape.layers, f.shape.vocab
    n = 1 + s.attention_outputs
    per_layer = b * (4 * i + 4 * h + n * a + 2 * k) + 4 * (2 * h + H + 2)
    place = "host" if s.activation_offloading and s.on_gpu else "device"
    layer_formula = f"b·(4i+4h+{n}a+2k) + 4·(2h+H+2)"
    if s.gradient_checkpointing:
        m.add("activations: layer inputs (gradient checkpointing)", T * L * b * h, "T·L·b·h", ("backward",), place)
        m.add("activations: one layer recomputed in backward", T * per_layer, f"T·({layer_formula})", ("backward",))
    else:
        m.add("activations: decoder layers", T * L * per_layer, f"T·L·({layer_formula})", ("backward",), place)
    m.add("activations: rotary cos/sin, final norm, scored hidden states", T * (2 * f.head_dim * b + 4 * h + 2 * b * h + 4),
          "T·(2·head_dim·b + 4h + 2bh + 4)", ("backward",))
    cast = b if b < 4 else 0
    m.add("LM head: one chunk of fp32 logits (+ its cast)", C * V * (4 + cast), "C·V·(4 + b if b < 4)", ("backward",))
    m.add("LM head: fp32 weight-gradient accumulator (+ its cast)", V * h * (4 + cast), "V·h·(4 + b if b < 4)",
          ("backward",))
    m.add("LM head: gradient of the hidden states", T * h * b, "T·h·b", ("backward",))


def train_rank(f: ModelFacts, s: TrainShape) -> RankMemory:
    """One train (or sft) rank's lines."""
    b, W, z = DTYPE_BYTES[s.dtype], s.world, s.zero_stage
    N = f.params
    Nt = s.lora_params if s.lora_params is not None else N
    nt = "Nt" if s.lora_params is not None else "N"
    m = RankMemory(f"ZeRO-{z} x{W}" + (" offload_optimizer" if s.offload_optimizer else "")
                   + (" offload_param" if s.offload_param else ""))
    moments = 4 if s.optimizer == "rmsprop" else 8  # Adam's m and v, RMSprop's square average, fp32
    opt_place = "host" if s.offload_optimizer else "device"
    # weights
    if z == 3:
        m.add("weights: this rank's partition", b * N / W, "b·N/W", place="host" if s.offload_param else "device")
    else:
        m.add("weights", b * N, "b·N")
    # gradients: complete at the step; with accumulation also held through the next micro-batch's backward
    shard = 1 if z == 0 else W
    held = ("backward", "step") if s.accumulation > 1 else ("step",)
    if z <= 1:
        m.add("gradients", b * Nt, f"b·{nt} (the step's, all of them)", held)
        if z == 0 and b < 4:
            m.add("gradients: fp32 accumulators (DeepSpeed's bf16 optimizer)", 4 * Nt, f"4·{nt}", held)
    if z >= 1 and s.offload_optimizer:  # reduced into fp32 host buffers, where the optimizer steps
        m.add("gradients: this rank's partition, fp32", 4 * Nt / W, f"4·{nt}/W", place="host")
    if z == 2:  # the partition's gradients come out of the reduce at the backward's end, and go at the step
        if not s.offload_optimizer:
            m.add("gradients: this rank's partition", b * Nt / W, f"b·{nt}/W", held)
        bucket = s.setting("reduce_bucket_size")
        if s.on_gpu:  # allocated whole
            m.add("gradient reduce bucket", b * bucket * (2 if s.ds.get("overlap_comm") else 1),
                  "b·reduce_bucket_size (x2 with overlap_comm)")
        else:  # a CPU page is resident once written: a parameter's gradient at a time (measured)
            m.add("gradient reduce bucket (the pages written)", b * min(bucket, f.largest_param),
                  "b·min(reduce_bucket_size, largest parameter)")
    elif z == 3:
        if not s.offload_optimizer:
            m.add("gradients: this rank's partition", b * Nt / W, f"b·{nt}/W")
        m.add("gradient reduce bucket", b * s.setting("reduce_bucket_size"), "b·reduce_bucket_size", ("backward",))
    if z in (1, 2) and not s.offload_optimizer:  # DeepSpeed flattens the partition's gradients into fp32 to step
        m.add("gradients: the partition flattened to fp32 for the step", 4 * Nt / W, f"4·{nt}/W", ("step",))
    if s.on_gpu and z < 3:  # from_pretrained loads into host memory before DeepSpeed moves it to the GPU
        m.add("host, while loading: the whole model", b * N, "b·N (ZeRO-0/1/2 load every weight on each rank)",
              ("load",), "host")
    # fp32 master weights
    if z == 0 and b < 4:
        m.add("master weights (fp32)", 4 * Nt, f"4·{nt}")
    elif z in (1, 2) or (z == 3 and b < 4):  # ZeRO-1/2 copy the partition even in fp32
        m.add("master weights (fp32): this rank's partition", 4 * Nt / W, f"4·{nt}/W", place=opt_place)
    m.add("optimizer states" + (": this rank's partition" if shard > 1 else ""), moments * Nt / shard,
          f"{moments}·{nt}" + ("/W" if shard > 1 else ""), place=opt_place)
    if z == 3:  # at the peak, the LM head's backward: its weight, and the prefetched layers behind it
        held = min(N, f.largest_param + s.setting("stage3_prefetch_bucket_size"))
        m.add("ZeRO-3: gathered parameters at the peak", b * held,
              "b·min(N, largest parameter + stage3_prefetch_bucket_size)", ("backward",))
        bound = min(N, s.setting("stage3_max_live_parameters") + f.largest_param)
        if bound > held:
            m.notes.append(f"ZeRO-3 may keep up to {b * bound / GiB:.2f} GiB gathered (b·min(N, stage3_max_live_parameters"
                           f" + largest parameter)) where its trace holds parameters for reuse; the ranks measured "
                           f"in bench/plan_memory.py held only what the line above counts")
    activations(m, f, s)
    step_transient(m, f, s, Nt, nt)
    if s.attention == "eager":
        m.notes.append("eager attention also saves its H·T² probabilities a layer (not counted): use segment_sdpa")
    elif s.attention == "sdpa":
        m.notes.append("sdpa isolates a packed row's segments with a T x T mask (not counted): use segment_sdpa")
    return m


def step_transient(m: RankMemory, f: ModelFacts, s: TrainShape, Nt: int, nt: str) -> None:
    """The optimizer step's temporaries. torch's AdamW steps a tensor with two temporaries
    its size on a CPU (sqrt of v, then the division) and one per tensor list on a GPU
    (foreach); ZeRO steps flat fp32 groups (ZeRO-3: sub-groups, whose gradients it first
    flattens into a new buffer); DeepSpeedCPUAdam (offload_optimizer) steps in place."""
    if s.offload_optimizer:
        return
    temps = 4 if s.on_gpu else 8
    z, W = s.zero_stage, s.world
    if z == 0:
        b = DTYPE_BYTES[s.dtype]
        if b < 4:  # DeepSpeed's bf16 optimizer steps one flat fp32 master
            m.add("optimizer step temporaries", temps * Nt, f"{temps}·{nt}", ("step",))
        else:  # torch steps parameter by parameter
            largest = f.largest_param if s.lora_params is None else 0
            m.add("optimizer step temporaries", temps * largest if not s.on_gpu else 4 * Nt,
                  "8·largest parameter" if not s.on_gpu else f"4·{nt} (foreach)", ("step",))
    elif z in (1, 2):  # one flat fp32 partition per parameter group
        m.add("optimizer step temporaries", temps * Nt / W, f"{temps}·{nt}/W", ("step",))
    else:
        group = min(Nt / W, s.setting("sub_group_size") + -(-f.largest_param // W))
        m.add("optimizer step: a sub-group's flat gradients and temporaries", (4 + temps) * group,
              f"{4 + temps}·min({nt}/W, sub_group_size + largest parameter/W)", ("step",))


def score_actor(f: ModelFacts, dtype: str, tokens: int, chunk: int) -> RankMemory:
    """A score actor: the reference's weights and one row's forward without gradients."""
    b, T, C = DTYPE_BYTES[dtype], tokens, chunk
    h, i, a, k, V = f.shape.hidden, f.intermediate, f.shape.attn_dim, f.kv_dim, f.shape.vocab
    m = RankMemory("score actor")
    m.add("weights", b * f.params, "b·N", ("forward",))
    m.add("one layer's working set (no gradients kept)", T * b * (3 * i + 2 * a + 2 * k + 3 * h),
          "T·b·(3i + 2a + 2k + 3h)", ("forward",))
    m.add("LM head: one chunk of fp32 logits (+ its cast)", C * V * (4 + (b if b < 4 else 0)), "C·V·(4 + b if b < 4)",
          ("forward",))
    m.add("scored hidden states", T * h * b, "T·h·b", ("forward",))
    return m
