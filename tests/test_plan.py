"""`pipeline plan` (pipeline/planning/): its activation formula against what autograd saves,
its model states against DeepSpeed's own estimators, and the command on the shipped configs
pointed at local model configs and at a Hub id in the offline cache."""

import json
from pathlib import Path

import pytest
import torch

from helpers import hub_cache
from pipeline.planning.memory import GiB, TrainShape, train_rank
from pipeline.planning.model import ModelFacts, model_facts

ROOT = Path(__file__).resolve().parents[1]

# Published architectures (config.json), for plans: no weights are ever made from them.
LLAMA_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
            "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
            "vocab_size": 128256, "max_position_embeddings": 131072, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
QWEN_1_5B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 1536,
             "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
             "vocab_size": 151936, "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
             "tie_word_embeddings": True, "torch_dtype": "bfloat16"}


def write_config(path: Path, config: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    return path


def saved_bytes_per_token(config, dtype: torch.dtype, tokens: int, attention: str) -> float:
    """Bytes autograd saves for the backward of one decoder layer (two packed segments through
    segment_sdpa), per token: distinct storages, the weights and the rotary cos/sin (one per
    row, not per layer) left out; the layer's input counted (its first norm keeps it)."""
    from transformers import AutoModelForCausalLM

    from pipeline.core.attention import register

    register()
    config._attn_implementation = attention
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    layer = model.model.layers[0]
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    x = torch.randn(1, tokens, config.hidden_size, dtype=dtype, requires_grad=True)
    half = tokens // 2
    pos = torch.cat([torch.arange(half), torch.arange(tokens - half)])[None]
    cos, sin = model.model.rotary_emb(x, pos)
    skip = params | {cos.untyped_storage().data_ptr(), sin.untyped_storage().data_ptr()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, position_embeddings=(cos, sin), position_ids=pos, attention_mask=None)
    return sum(seen.values()) / tokens


@pytest.mark.parametrize("attention", ["segment_sdpa", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_the_activation_formula_is_what_autograd_saves(arch, dtype, attention):
    """Per token and layer: b·(4i + 4h + n·a + 2k) + 4·(2h + H + 2) bytes, n = 3 where
    segment_sdpa concatenates its segments' outputs (on a CPU), else 2."""
    from transformers import LlamaConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    config = cls(vocab_size=300, hidden_size=96, intermediate_size=224, num_hidden_layers=1, num_attention_heads=6,
                 num_key_value_heads=2)
    b = torch.finfo(dtype).bits // 8
    h, i, a, k, H = 96, 224, 96, 2 * 16, 6
    n = 3 if attention == "segment_sdpa" else 2
    formula = b * (4 * i + 4 * h + n * a + 2 * k) + 4 * (2 * h + H + 2)
    assert saved_bytes_per_token(config, dtype, 200, attention) == formula
    # and the plan's line is that, times T and L
    facts = model_facts(config)
    m = train_rank(facts, TrainShape(zero_stage=0, world=1, dtype={4: "float32", 2: "bfloat16"}[b], tokens=200,
                                     chunk=64, attention=attention))
    assert next(x.bytes for x in m.lines if x.name == "activations: decoder layers") == 200 * 1 * formula


def facts_of(config: dict) -> ModelFacts:
    from transformers import AutoConfig

    return model_facts(AutoConfig.for_model(**config))


def states(m, phase: str, place: str | None = None) -> int:
    """The model states of a phase: every line but the activations, the LM head's buffers
    and the step's temporaries."""
    kept = ("weights", "gradients", "master", "optimizer states")
    return sum(x.bytes for x in m.lines if x.name.startswith(kept) and phase in x.phases
               and (place is None or x.place == place))


def test_model_states_agree_with_deepspeeds_estimators():
    """bf16 with fp32 master weights and Adam on GPUs, DeepSpeed 0.19's assumptions; where
    the plan says more, it names the buffer DeepSpeed's estimate leaves out."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    f = facts_of(LLAMA_8B)
    N, W = f.params, 8
    assert N == 8_030_261_248  # Llama-3.1-8B's published count
    base = dict(dtype="bfloat16", tokens=4096, chunk=1024, on_gpu=True)
    # ZeRO-2, no offload: 2N + 18N/W (bf16 weights; bf16 gradient partition, its fp32 flattening
    # for the step, fp32 master, Adam's two moments)
    z2 = train_rank(f, TrainShape(zero_stage=2, world=W, **base))
    _, ds_gpu = estimate_zero2_model_states_mem_needs(N, num_gpus_per_node=W, cpu_offload=False)
    assert states(z2, "step") == pytest.approx(ds_gpu, abs=8)
    # ZeRO-2 + offload_optimizer: the GPU holds the bf16 weights (DeepSpeed: 2N); the host the
    # partition's fp32 gradients, master and moments, 16N/W a rank, 16N a node (DeepSpeed:
    # N·max(4W, 16)·1.5: its 4W is each rank's fp32 copy of the model while loading, our
    # "host, while loading" line counts b·N of it; 1.5 its buffer factor)
    z2o = train_rank(f, TrainShape(zero_stage=2, world=W, offload_optimizer=True, **base))
    ds_cpu, ds_gpu = estimate_zero2_model_states_mem_needs(N, num_gpus_per_node=W, cpu_offload=True)
    assert states(z2o, "step", "device") == ds_gpu
    assert W * states(z2o, "step", "host") == pytest.approx(16 * N, abs=64)
    assert ds_cpu == int(N * max(4 * W, 16) * 1.5)
    # ZeRO-3, no offload: DeepSpeed 4·largest layer + 18N/W; the plan's partitions are 2+2+4+8 =
    # 16N/W, the fp32 gradients existing for one sub-group at a time (its step line); where
    # DeepSpeed counts the largest layer gathered in fp32, the plan counts the LM head's weight
    # (the largest parameter) and the prefetch bucket gathered in bf16 at the peak, and notes
    # the bound stage3_max_live_parameters puts on what ZeRO-3 may keep
    from cluster.deepspeed_config import zero3_sizes

    z3 = train_rank(f, TrainShape(zero_stage=3, world=W, ds=zero3_sizes(4096), **base))  # as the pipeline builds it
    _, ds_gpu, largest = estimate_zero3_model_states_mem_needs(N, f.largest_param, num_gpus_per_node=W,
                                                               cpu_offload=False)
    assert states(z3, "backward") == pytest.approx(16 * N / W, abs=64)
    assert ds_gpu - int(18 * N / W) == largest == 4 * f.largest_param
    gathered = next(x.bytes for x in z3.lines if x.name == "ZeRO-3: gathered parameters at the peak")
    assert gathered == 2 * (f.largest_param + 50_000_000)
    assert f"ZeRO-3 may keep up to {2 * (10**9 + f.largest_param) / GiB:.2f} GiB gathered" in z3.notes[0]
    sub_group = next(x for x in z3.lines if x.name.startswith("optimizer step: a sub-group"))
    assert sub_group.bytes == 8 * (50_000_000 + -(-f.largest_param // W))  # flat fp32 gradients + foreach's temporary
    # ZeRO-3 + offload_optimizer + offload_param: the GPU holds no states (DeepSpeed: the
    # largest layer gathered); the host 18N/W a rank in DeepSpeed's count, 16N/W + the
    # partition's bf16 weights = 18N/W in the plan's
    z3o = train_rank(f, TrainShape(zero_stage=3, world=W, offload_optimizer=True, offload_param=True, **base))
    ds_cpu, ds_gpu, _ = estimate_zero3_model_states_mem_needs(N, f.largest_param, num_gpus_per_node=W)
    assert states(z3o, "step", "device") == 0 and ds_gpu == 4 * f.largest_param
    assert W * states(z3o, "step", "host") == pytest.approx(ds_cpu / 1.5, abs=64)


def plan_cli(capsys, *args) -> str:
    """``python -m pipeline plan ARGS`` in this process (the fast tier starts no subprocess)."""
    from pipeline.cli import main

    capsys.readouterr()
    code = main(["plan", *args])
    out = capsys.readouterr()
    assert code == 0, out.err[-2000:]
    return out.out


def peak_of(text: str, stage: str) -> float:
    section = text.split(f"## {stage}:")[1].split("\n## ")[0]
    return float(section.split("| **peak (")[1].split("**")[2])


@pytest.mark.parametrize("name", ["llama3.1-8b-multinode", "qwen2.5-1.5b-1node", "tiny", "tiny-sft"])
def test_plan_runs_on_the_shipped_configs(name, tmp_path, assets, capsys, monkeypatch):
    model = {"llama3.1-8b-multinode": lambda: write_config(tmp_path / "llama", LLAMA_8B),
             "qwen2.5-1.5b-1node": lambda: write_config(tmp_path / "qwen", QWEN_1_5B)}.get(name, lambda: assets["model"])()
    monkeypatch.chdir(ROOT)
    text = plan_cli(capsys, f"configs/{name}.yaml", f"model.path={model}", f"data.train_files=[{assets['data']}]",
                    "device.memory_gib=80", "device.peak_tflops=989")
    assert "## train: ZeRO-" in text and "Not modelled:" in text
    if name == "llama3.1-8b-multinode":
        # 32 ranks of ZeRO-3, bf16: 2 + 2 + 4 + 8 bytes a parameter over 32 ranks
        N = facts_of(LLAMA_8B).params
        assert f"| weights: this rank's partition | {2 * N / 32 / GiB:.2f} | b·N/W |" in text
        assert f"| optimizer states: this rank's partition | {8 * N / 32 / GiB:.2f} | 8·N/W |" in text
        assert "Largest tokenize.max_tokens_per_row that fits device.memory_gib:" in text
        assert peak_of(text, "train") < 80
    if name == "tiny-sft":
        assert "## sft:" in text


def test_plan_reads_a_hub_id_from_the_offline_cache(tmp_path, assets, capsys, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    hub_cache(cache, "Qwen/Qwen2.5-1.5B-Instruct", write_config(tmp_path / "files", QWEN_1_5B))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(ROOT)
    text = plan_cli(capsys, "configs/qwen2.5-1.5b-1node.yaml", "model.path=Qwen/Qwen2.5-1.5B-Instruct",
                    f"data.train_files=[{assets['data']}]")
    assert "Model: 1543.7M parameters (vocab 151936, hidden 1536, 28 layers" in text


def test_the_runs_flops_come_from_the_tokenized_rows(assets, tmp_path):
    """Once tokenize has run, the plan counts the run: every train row once an epoch at 3x
    its forward, every row once for score."""
    from helpers import tiny_config

    from pipeline import runner
    from pipeline.core.flops import ModelShape, forward_flops, row_work, train_flops
    from pipeline.core.rows import RowReader, split_files
    from transformers import AutoConfig

    cfg = tiny_config(assets, tmp_path / "run", train={"num_train_epochs": 2})
    from pipeline.cli import plan_of

    assert plan_of(cfg).stages[-1].flops_run is None  # nothing tokenized yet
    runner.run_pipeline(cfg, stages=["tokenize"], use_ray=False, log=lambda _: None)
    plan = plan_of(cfg)
    shape = ModelShape.of(AutoConfig.from_pretrained(assets["model"]), plan.facts.params)
    out = runner.plan_stages(cfg)["tokenize"].dir
    work = {split: [row_work(r["seq_lens"], r["prompt_lens"]) for r in (lambda rr: [rr[i] for i in range(rr.num_rows)])(
        RowReader(split_files(out, split)))] for split in ("train", "eval")}
    score, train = (s for s in plan.stages if s.stage in ("score", "train"))
    assert train.flops_run == 2 * sum(train_flops(shape, w) for w in work["train"])
    assert score.flops_run == sum(forward_flops(shape, w) for w in work["train"] + work["eval"])


def test_other_settings_skip_what_the_settings_cannot_take(assets, tmp_path):
    """RMSprop has no offload (DeepSpeedCPUAdam is Adam), and a DeepSpeed JSON that repeats
    its ZeRO stage does not stop the other stages being planned; auto keeps the JSON's stage."""
    from helpers import tiny_config

    from pipeline.planning import make_plan, resolve

    cfg = tiny_config(assets, tmp_path / "run", train={"optimizer": "rmsprop"})
    others = [label for label, _, _ in make_plan(cfg).stages[-1].others]
    assert others == ["ZeRO-0", "ZeRO-1", "ZeRO-2", "ZeRO-3"]
    cfg = tiny_config(assets, tmp_path / "run", device={"memory_gib": 4},
                      train={"zero_stage": "auto", "deepspeed": {"zero_optimization": {"stage": 2}}})
    assert len(make_plan(cfg).stages[-1].others) == 8
    assert resolve(cfg).train.zero_stage == 2  # the JSON's, though ZeRO-0 fits


def test_accumulated_gradients_are_held_through_the_next_backward():
    f = facts_of(LLAMA_8B)
    for z, name in ((0, "gradients"), (2, "gradients: this rank's partition")):
        one, two = (train_rank(f, TrainShape(zero_stage=z, world=8, dtype="bfloat16", tokens=4096, chunk=1024,
                                             on_gpu=True, accumulation=a)) for a in (1, 2))
        assert next(x for x in one.lines if x.name == name).phases == ("step",)
        assert next(x for x in two.lines if x.name == name).phases == ("backward", "step")
        held = sum(x.bytes for x in two.lines if x.name.startswith("gradients") and x.name != "gradients: the "
                   "partition flattened to fp32 for the step")  # ZeRO-0 in bf16: its fp32 accumulators too
        assert two.total("backward") - one.total("backward") == held


def test_a_mixture_of_experts_is_not_modelled_and_gets_no_mfu():
    from transformers import MixtralConfig

    from pipeline.core.flops import dense_shape

    config = MixtralConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4)
    assert dense_shape(config, 10**6) is None
    facts = model_facts(config)
    assert not facts.modelled and "a mixture of experts (4 experts)" in facts.why_not
