"""An architecture's own transform of its LM head's output (a logit scale or multiplier,
final-logit soft-capping), read from the model's config, so that the log-prob pass
computes what the model's own ``log_softmax(logits)`` would; and the refusal of a model
whose transform is not known."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LogitTransform:
    """What a model's forward does to ``lm_head(hidden)``: logits = softcap(scale * z), with
    softcap(u) = cap * tanh(u / cap) when ``softcap`` is set (``logit_transform``)."""

    scale: float = 1.0
    softcap: float | None = None


IDENTITY = LogitTransform()


def _transform_(z: torch.Tensor, transform: LogitTransform) -> torch.Tensor:
    """``transform`` applied to fp32 logits in place."""
    if transform.softcap is not None:
        return z.mul_(transform.scale / transform.softcap).tanh_().mul_(transform.softcap)
    if transform.scale != 1.0:
        return z.mul_(transform.scale)
    return z


# How a causal LM's forward transforms lm_head(hidden) before its loss (transformers 5.23,
# models/*/modeling_*.py): logits = softcap(scale * lm_head(hidden)).
# A scale read from the config, by model type: divided by, or multiplied by, the attribute.
_DIVIDE_BY = {t: "logits_scaling" for t in (
    "granite", "granitemoe", "granitemoeshared", "granitemoehybrid", "granite_swa", "granitemoe_swa",
    "minicpm3",  # divides the hidden state before a bias-free lm_head: the same
)}


_MULTIPLY_BY = {"hyperclovax": "logits_scaling", "falcon_h1": "lm_head_multiplier", "cohere": "logit_scale",
                "cohere2": "logit_scale", "cohere2_moe": "logit_scale", "cohere_compass": "logit_scale"}


# Final-logit soft-capping: ``final_logit_softcapping`` (Gemma 2/3/3n/4, VaultGemma, nanochat, ...) unless named here.
_SOFTCAP_ATTR = {"recurrent_gemma": "logits_soft_cap", "xlstm": "output_logit_soft_cap"}


# Config attributes that name such a transform: with a model type not above, refused.
_TRANSFORM_ATTRS = ("logits_scaling", "logit_scale", "lm_head_multiplier", "output_multiplier",
                    "output_multiplier_scale", "logits_soft_cap", "output_logit_soft_cap")


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _trivial(value) -> bool:
    return value is None or (isinstance(value, (int, float)) and float(value) in (0.0, 1.0))


def logit_transform(model) -> LogitTransform:
    """The transform ``model``'s forward applies to its LM head's output, which the chunked
    log-prob pass applies too. Raises NotImplementedError where the config names a
    transform this does not know (``probe_packed_logps`` checks the rest by running it)."""
    config = model.config
    text = _text_config(config)
    types = {getattr(config, "model_type", None), getattr(text, "model_type", None)}
    scale, known = 1.0, set()
    for table, invert in ((_DIVIDE_BY, True), (_MULTIPLY_BY, False)):
        for model_type in types & table.keys():
            attr = table[model_type]
            value = getattr(text, attr, None)
            known.add(attr)
            if value is not None and float(value) != 1.0:
                scale = 1.0 / float(value) if invert else float(value)
    if "minicpm3" in types and scale != 1.0 and getattr(model.get_output_embeddings(), "bias", None) is not None:
        raise NotImplementedError("minicpm3 with an lm_head bias: its hidden-state scaling is not a logit scale")
    softcap_attr = next((_SOFTCAP_ATTR[t] for t in types if t in _SOFTCAP_ATTR), "final_logit_softcapping")
    known.add(softcap_attr)
    softcap = getattr(text, softcap_attr, None)
    softcap = None if softcap in (None, 0) else float(softcap)
    for attr in _TRANSFORM_ATTRS + ("final_logit_softcapping",):
        value = getattr(text, attr, None)
        if attr not in known and not _trivial(value):
            raise NotImplementedError(
                f"model type {'/'.join(sorted(t for t in types if t))} has {attr}={value}: a transform of its logits "
                "that the chunked log-prob pass does not know; it computes softcap(scale * lm_head(hidden)) only"
            )
    return LogitTransform(scale, softcap)


def check_model_supported(model) -> None:
    """Refuse architectures whose logits are a transform of ``lm_head(last_hidden_state)``
    the log-prob pass does not apply (``logit_transform``)."""
    logit_transform(model)
