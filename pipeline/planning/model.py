"""What the plan knows of a model without its weights: its config.json, and its parameters
counted on the meta device (no memory, no download of weights).

``ModelFacts`` holds the counts and widths the memory and FLOPs formulas read. A model the
formulas do not describe (a mixture of experts: its routing buffers and expert layout) is
marked ``modelled = False`` with the reason, and the plan prints "not modelled" for what
depends on it."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.config import ConfigError, LoraSettings, ModelConfig
from pipeline.core.flops import ModelShape, experts

LORA_ALL_LINEAR_SKIP = ("lm_head",)  # peft's "all-linear" leaves the output layer out


@dataclass(frozen=True)
class ModelFacts:
    shape: ModelShape
    intermediate: int  # the MLP's width (SwiGLU: gate and up)
    kv_dim: int  # key/value heads x head_dim
    heads: int
    head_dim: int
    largest_param: int  # elements of the largest single parameter (the embedding table, mostly)
    linear_shapes: tuple[tuple[str, int, int], ...]  # (name, in, out) of every nn.Linear, for LoRA
    modelled: bool = True
    why_not: str = ""

    @property
    def params(self) -> int:
        return self.shape.params

    def lora_params(self, lora: LoraSettings) -> int:
        """Adapter parameters: r x (in + out) for each targeted linear layer."""
        targets = lora.target_modules
        if targets == "all-linear":
            chosen = [s for s in self.linear_shapes if s[0].rsplit(".", 1)[-1] not in LORA_ALL_LINEAR_SKIP]
        else:
            names = [targets] if isinstance(targets, str) else list(targets)
            chosen = [s for s in self.linear_shapes if s[0].rsplit(".", 1)[-1] in names]
        return sum(lora.r * (i + o) for _, i, o in chosen)


def read_config(name: str, mcfg: ModelConfig, key: str = "model.path"):
    """The model's transformers config: a local directory's config.json, a Hub id's from
    the Hub cache (config and tokenizer files only), a bucket URI's config.json alone."""
    from transformers import AutoConfig

    from pipeline.core.models import _hub_snapshot, _revision_for, kind_of
    from pipeline.core.storage import Loc

    where = kind_of(name)
    if where == "local":
        path = Path(name).expanduser()
        if not (path / "config.json").is_file():
            raise ConfigError(f"{key}: {name}: no config.json there")
        directory = str(path)
    elif where == "uri":
        from pipeline.core.models import _split_digest

        text = (Loc(_split_digest(name)[0]) / "config.json").read_text()
        with tempfile.TemporaryDirectory(prefix="plan-config-") as directory:
            Path(directory, "config.json").write_text(text)
            return AutoConfig.from_pretrained(directory, trust_remote_code=mcfg.trust_remote_code)
    else:
        repo, revision = _revision_for(key.split(".")[-1], name, mcfg)
        directory = _hub_snapshot(key, repo, revision, {"tokenizer"})
    return AutoConfig.from_pretrained(directory, trust_remote_code=mcfg.trust_remote_code)


def model_facts(config, trust_remote_code: bool = False) -> ModelFacts:
    """Count the parameters of ``config``'s causal LM built on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    params = list(model.parameters())  # a tied table once
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    linears = tuple((n, m.in_features, m.out_features) for n, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear))
    n_experts = experts(config)
    intermediate = getattr(text, "intermediate_size", None)
    facts = dict(
        shape=ModelShape.of(config, sum(p.numel() for p in params)),
        intermediate=intermediate or 4 * text.hidden_size, kv_dim=(getattr(text, "num_key_value_heads", None) or heads) * head_dim,
        heads=heads, head_dim=head_dim, largest_param=max(p.numel() for p in params), linear_shapes=linears)
    if n_experts:
        return ModelFacts(**facts, modelled=False,
                          why_not=f"a mixture of experts ({n_experts} experts): routing buffers and the experts' activations")
    if intermediate is None:
        return ModelFacts(**facts, modelled=False, why_not=f"{type(text).__name__} has no intermediate_size")
    return ModelFacts(**facts)
