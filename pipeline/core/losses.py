"""Preference losses: pure functions of per-pair sequence log-probs, looked up by name.

A run's loss is a value, built from its settings (TRL's DPOConfig names), checked when
built, and called on every batch of pairs, as torchtune's ``DPOLoss``::

    loss = PreferenceLoss(loss_type="sigmoid", beta=0.1)     # checked here
    losses, chosen_rewards, rejected_rewards = loss(
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,  # (B,)
        chosen_lengths=None, rejected_lengths=None,  # completion tokens, (B,)
    )

``preference_loss(...)`` is the same as one function call (TRL's keyword names).

Each loss is a registered function ``fn(p: PairLogps, o: PreferenceLoss) -> (B,) per-pair
losses`` that reads its settings from ``o``; the formulas are TRL 1.16 DPOTrainer's (and
its experimental CPO / ORPO trainers' for the reference-free ones) and each docstring
gives the equation and the paper. A list of loss types is combined with ``loss_weights``
as TRL does. Reductions over the pairs of a step belong to the trainer.

Imports torch only: math modules never import Ray, DeepSpeed or transformers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F


class LossOutput(NamedTuple):
    losses: torch.Tensor  # (B,)
    chosen_rewards: torch.Tensor  # (B,) detached
    rejected_rewards: torch.Tensor  # (B,) detached


@dataclass
class PairLogps:
    """What every loss sees, per pair (all (B,)): the policy's and the reference's
    log-probs of the chosen and rejected completions, their scores, lengths and NLL."""

    chosen: torch.Tensor  # policy log-probs (sum over completion tokens, or re-aggregated)
    rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    chosen_scores: torch.Tensor  # f-divergence transform of the log-ratios (identity for reverse KL)
    rejected_scores: torch.Tensor
    chosen_lengths: torch.Tensor | None  # completion tokens
    rejected_lengths: torch.Tensor | None
    chosen_nll_sum: torch.Tensor  # plain sum of chosen per-token log-probs (the NLL term)

    @property
    def chosen_logratios(self) -> torch.Tensor:
        return self.chosen - self.ref_chosen

    @property
    def rejected_logratios(self) -> torch.Tensor:
        return self.rejected - self.ref_rejected

    @property
    def delta_score(self) -> torch.Tensor:
        return self.chosen_scores - self.rejected_scores

    def lengths(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.chosen_lengths is None or self.rejected_lengths is None:
            raise ValueError("this loss needs chosen_lengths and rejected_lengths")
        return self.chosen_lengths.clamp(min=1.0), self.rejected_lengths.clamp(min=1.0)


@dataclass(frozen=True)
class LossSpec:
    fn: Callable[[PairLogps, "PreferenceLoss"], torch.Tensor]
    reference_free: bool = False  # needs no reference log-probs (the score stage is skipped)
    f_divergence: bool = False  # built on the chosen-rejected score difference
    label_smoothing: bool = False  # reads label_smoothing
    rewards: str = "logratio"  # logratio: beta*(logp - ref); logp: beta*logp; mean_logp: beta*logp/len
    length_normalised: bool = False  # normalises by length itself (aggregation: mean would do it twice)
    sorts_pairs: bool = False  # couples the pairs of a batch (per-pair WPO weights do not apply)


LOSSES: dict[str, LossSpec] = {}
ALIASES = {"aot_pair": "aot_unpaired"}
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


def register(name: str, **spec) -> Callable:
    def wrap(fn):
        LOSSES[name] = LossSpec(fn, **spec)
        return fn

    return wrap


def _smoothed_sigmoid(logits: torch.Tensor, eps: float) -> torch.Tensor:
    return -F.logsigmoid(logits) * (1 - eps) - F.logsigmoid(-logits) * eps


# ----------------------------------------------------------------------------- DPO family


@register("sigmoid", f_divergence=True, label_smoothing=True)
def sigmoid(p: PairLogps, o: "PreferenceLoss") -> torch.Tensor:
    r"""DPO (Rafailov et al. 2023, arXiv:2305.18290), with cDPO label smoothing (Mitchell
    2023, "A note on DPO with noisy preferences").

    .. math:: \mathcal{L} = -(1-\epsilon)\log\sigma(\beta\Delta) - \epsilon\log\sigma(-\beta\Delta),
       \quad \Delta = s(y_w) - s(y_l),\ s = \log\pi/\pi_{ref}\ (\text{or its f-divergence transform})

    epsilon = 0 is TRL 1.16's ``sigmoid``; TRL 1.16 ignores ``label_smoothing`` here, TRL
    before 1.0 applied it as cDPO, as this does.
    """
    return _smoothed_sigmoid(o.beta * p.delta_score, o.label_smoothing)


@register("hinge", f_divergence=True)
def hinge(p: PairLogps, o: "PreferenceLoss") -> torch.Tensor:
    r"""SLiC hinge (Zhao et al. 2023, arXiv:2305.10425): :math:`\max(0, 1 - \beta\Delta)`."""
    return torch.relu(1 - o.beta * p.delta_score)


@register("ipo", f_divergence=True, length_normalised=True)
def ipo(p: PairLogps, o: "PreferenceLoss") -> torch.Tensor:
    r"""IPO (Azar et al. 2023, arXiv:2310.12036, eq. 17), beta = tau, with TRL's per-token
    normalisation: :math:`(s_w/|y_w| - s_l/|y_l| - \frac{1}{2\beta})^2`."""
    lc, lr = p.lengths()
    return (p.chosen_scores / lc - p.rejected_scores / lr - 1 / (2 * o.beta)) ** 2


@register("exo_pair", f_divergence=True, label_smoothing=True)
def exo_pair(p: PairLogps, o: "PreferenceLoss") -> torch.Tensor:
    r"""EXO-pref (Ji et al. 2024, arXiv:2402.00856, eq. 16):
    :math:`KL(q \| p_\epsilon)` with :math:`q = \mathrm{softmax}(\beta s_w, \beta s_l)`,
    :math:`p_\epsilon = (1-\epsilon, \epsilon)`; epsilon = ``label_smoothing`` > 0."""
    z = o.beta * p.delta_score
    eps = torch.tensor(o.label_smoothing, dtype=z.dtype, device=z.device)
    return torch.sigmoid(z) * (F.logsigmoid(z) - torch.log1p(-eps)) + torch.sigmoid(-z) * (
        F.logsigmoid(-z) - torch.log(eps)
    )


@register("nca_pair")
def nca_pair(p: PairLogps, o: "PreferenceLoss") -> torch.Tensor:
    r"""NCA (Chen et al. 2024, arXiv:2402.05369), with r = beta * log-ratio:
    :math:`-\log\sigma(r_w) - \tfrac12\log\sigma(-r_w) - \tfrac12\log\sigma(-r_l)`."""
    rw, rl = o.beta * p.chosen_logratios, o.beta * p.rejected_logratios
    return -F.logsigmoid(rw) - 0.5 * F.logsigmoid(-rw) - 0.5 * F.logsigmoid(-rl)


@register("robust", f_divergence=True, label_smoothing=True)
def robust(p: PairLogps, o: "PreferenceLoss") -> torch.Tensor:
    r"""Robust DPO (Chowdhury et al. 2024, arXiv:2403.00409), epsilon = flip rate in [0, 0.5):
    :math:`\frac{-(1-\epsilon)\log\sigma(\beta\Delta) + \epsilon\log\sigma(-\beta\Delta)}{1-2\epsilon}`."""
    z, eps = o.beta * p.delta_score, o.label_smoothing
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


@register("bco_pair")
def bco_pair(p: PairLogps, o: "PreferenceLoss") -> torch.Tensor:
    r"""BCO, paired (Jung et al. 2024, arXiv:2404.04656), as TRL 1.16:
    :math:`-\log\sigma(r_w) - \log\sigma(-r_l)`. The paper (and TRL before 1.0) also
    subtracts a running mean delta of the rewards from both; TRL 1.16 does not."""
    return -F.logsigmoid(o.beta * p.chosen_logratios) - F.logsigmoid(-o.beta * p.rejected_logratios)


@register("sppo_hard")
def sppo_hard(p: PairLogps, o: "PreferenceLoss") -> torch.Tensor:
    r"""SPPO, hard labels (Wu et al. 2024, arXiv:2405.00675, eq. 4.7 with P = 1 / 0):
    :math:`(\rho_w - \frac{1}{2\beta})^2 + (\rho_l + \frac{1}{2\beta})^2`, rho = log-ratio."""
    return (p.chosen_logratios - 0.5 / o.beta) ** 2 + (p.rejected_logratios + 0.5 / o.beta) ** 2


@register("aot", label_smoothing=True, sorts_pairs=True)
def aot(p: PairLogps, o: "PreferenceLoss") -> torch.Tensor:
    r"""AOT, paired (Melnyk et al. 2024, arXiv:2406.05882): sort the policy and reference
    chosen-minus-rejected log-prob differences across the batch (here: the pairs of a packed
    row), :math:`\Delta = \mathrm{sort}(\log\pi_w - \log\pi_l) - \mathrm{sort}(\log\pi^{ref}_w - \log\pi^{ref}_l)`,
    then the smoothed sigmoid."""
    delta = torch.sort(p.chosen - p.rejected, dim=0)[0] - torch.sort(p.ref_chosen - p.ref_rejected, dim=0)[0]
    return _smoothed_sigmoid(o.beta * delta, o.label_smoothing)


@register("aot_unpaired", label_smoothing=True, sorts_pairs=True)
def aot_unpaired(p: PairLogps, o: "PreferenceLoss") -> torch.Tensor:
    r"""AOT, unpaired (Melnyk et al. 2024): :math:`\Delta = \mathrm{sort}(\rho_w) - \mathrm{sort}(\rho_l)`
    across the batch, then the smoothed sigmoid. Also accepted as ``aot_pair``."""
    delta = torch.sort(p.chosen_logratios, dim=0)[0] - torch.sort(p.rejected_logratios, dim=0)[0]
    return _smoothed_sigmoid(o.beta * delta, o.label_smoothing)


@register("apo_zero")
def apo_zero(p: PairLogps, o: "PreferenceLoss") -> torch.Tensor:
    r"""APO-zero (D'Oosterlinck et al. 2024, arXiv:2408.06266, eq. 7):
    :math:`1 - \sigma(\beta\rho_w) + \sigma(\beta\rho_l)`."""
    return 1 - torch.sigmoid(o.beta * p.chosen_logratios) + torch.sigmoid(o.beta * p.rejected_logratios)


@register("apo_down")
def apo_down(p: PairLogps, o: "PreferenceLoss") -> torch.Tensor:
    r"""APO-down (D'Oosterlinck et al. 2024, eq. 8):
    :math:`\sigma(\beta\rho_w) + 1 - \sigma(\beta(\rho_w - \rho_l))`."""
    return torch.sigmoid(o.beta * p.chosen_logratios) + 1 - torch.sigmoid(
        o.beta * (p.chosen_logratios - p.rejected_logratios)
    )


@register("discopop", f_divergence=True)
def discopop(p: PairLogps, o: "PreferenceLoss") -> torch.Tensor:
    r"""DiscoPOP / log-ratio modulated loss (Chan Lu et al. 2024, arXiv:2406.08414, eq. 5),
    z = beta * Delta, m = sigmoid(z / tau): :math:`(1-m)(-\log\sigma(z)) + m\,e^{-z}`."""
    z = o.beta * p.delta_score
    m = torch.sigmoid(z / o.discopop_tau)
    return -F.logsigmoid(z) * (1 - m) + torch.exp(-z) * m


@register("sigmoid_norm", f_divergence=True, length_normalised=True)
def sigmoid_norm(p: PairLogps, o: "PreferenceLoss") -> torch.Tensor:
    r"""Length-normalised DPO (TRL 1.16 ``sigmoid_norm``):
    :math:`-\log\sigma(\beta(s_w/|y_w| - s_l/|y_l|))`."""
    lc, lr = p.lengths()
    return -F.logsigmoid(o.beta * (p.chosen_scores / lc - p.rejected_scores / lr))


@register("sft", f_divergence=True)
def sft(p: PairLogps, o: "PreferenceLoss") -> torch.Tensor:
    r"""NLL of the chosen completions, a token mean over the batch (TRL 1.16 ``sft``; RPO,
    Pang et al. 2024, arXiv:2404.19733, is ``[sigmoid, sft]`` with weights ``[1, alpha]``):
    :math:`-\frac{\sum_i \log\pi(y_{w,i})}{\sum_i |y_{w,i}|}`, repeated for every pair."""
    lc, _ = p.lengths()
    return (-p.chosen_nll_sum.sum() / lc.sum()).expand(p.chosen.shape[0])


# ----------------------------------------------------------------------------- reference-free


@register("simpo", reference_free=True, label_smoothing=True, rewards="mean_logp", length_normalised=True)
def simpo(p: PairLogps, o: "PreferenceLoss") -> torch.Tensor:
    r"""SimPO (Meng et al. 2024, arXiv:2405.14734), as TRL's CPO trainer with
    ``loss_type="simpo"``: :math:`-\log\sigma(\beta(\bar{\log\pi}_w - \bar{\log\pi}_l) - \gamma)`
    (smoothed by epsilon), plus ``cpo_alpha`` times the chosen NLL (TRL's default 1.0;
    ``cpo_alpha: 0`` is the paper's SimPO)."""
    lc, lr = p.lengths()
    logits = p.chosen / lc - p.rejected / lr - o.simpo_gamma / o.beta
    return _smoothed_sigmoid(o.beta * logits, o.label_smoothing) + o.cpo_alpha * sft(p, o)


@register("cpo", reference_free=True, label_smoothing=True, rewards="logp")
def cpo(p: PairLogps, o: "PreferenceLoss") -> torch.Tensor:
    r"""CPO (Xu et al. 2024, arXiv:2401.08417, eq. 3), TRL's CPO trainer with
    ``loss_type="sigmoid"``: :math:`-\log\sigma(\beta(\log\pi_w - \log\pi_l))` (smoothed by
    epsilon) plus ``cpo_alpha`` times the chosen NLL."""
    return _smoothed_sigmoid(o.beta * (p.chosen - p.rejected), o.label_smoothing) + o.cpo_alpha * sft(p, o)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


@register("orpo", reference_free=True, rewards="mean_logp", length_normalised=True)
def orpo(p: PairLogps, o: "PreferenceLoss") -> torch.Tensor:
    r"""ORPO (Hong et al. 2024, arXiv:2403.07691, eqs. 4 and 7), on length-averaged logps:
    :math:`\mathcal{L}_{NLL} - \beta\log\sigma\Big(\log\frac{\bar p_w}{1-\bar p_w} - \log\frac{\bar p_l}{1-\bar p_l}\Big)`."""
    lc, lr = p.lengths()
    c, r = p.chosen / lc, p.rejected / lr
    log_odds = (c - r) - (_log1mexp(c) - _log1mexp(r))
    return sft(p, o) - o.beta * F.logsigmoid(log_odds)


# ----------------------------------------------------------------------------- MoE


def router_load_balancing_loss(router_logits: Sequence[torch.Tensor], num_experts: int, top_k: int) -> torch.Tensor:
    r"""Switch-Transformer load-balancing loss (Fedus et al. 2021, arXiv:2101.03961, eqs. 4-6),
    as transformers' Mixtral ``load_balancing_loss_func`` with every token counted (a packed
    row has no padding): :math:`N \sum_e f_e P_e` over all layers' tokens, f_e the fraction
    of top-k assignments to expert e, P_e its mean router probability.

    router_logits: one (T, num_experts) tensor per MoE layer.
    """
    logits = torch.cat([layer.to(router_logits[0].device) for layer in router_logits], dim=0)
    probs = torch.softmax(logits, dim=-1)
    selected = torch.topk(probs, top_k, dim=-1).indices
    tokens_per_expert = F.one_hot(selected, num_experts).float().mean(dim=0)  # (top_k, E)
    return num_experts * torch.sum(tokens_per_expert * probs.mean(dim=0).unsqueeze(0))


# ----------------------------------------------------------------------------- f-divergences


def f_divergence_scores(logratios: torch.Tensor, kind: str, alpha: float) -> torch.Tensor:
    r"""f'(u) of the policy/reference ratio u (f-DPO, Wang et al. 2023, arXiv:2309.16240),
    TRL 1.16's convention: reverse KL log u; forward KL 1 - 1/u; JS log 2 + log sigma(log u);
    alpha-divergence (u^(alpha-1) - 1)/(alpha - 1) (log u at alpha = 1), exponent clamped at 80.
    TRL before 1.0 used (1 - u^(-alpha))/alpha with default alpha 1 instead."""
    if kind == "reverse_kl":
        return logratios
    if kind == "forward_kl":
        return 1 - torch.exp(-logratios)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    if kind == "alpha_divergence":
        if abs(alpha - 1.0) < 1e-6:
            return logratios
        t = torch.clamp((alpha - 1.0) * logratios, max=80.0)
        return (torch.exp(t) - 1.0) / (alpha - 1.0)
    raise ValueError(f"unknown f_divergence_type {kind!r}; one of {list(F_DIVERGENCES)}")


# ----------------------------------------------------------------------------- the loss object


def canonical(loss_type: str) -> str:
    return ALIASES.get(loss_type, loss_type)


def as_list(loss_type: str | Sequence[str]) -> list[str]:
    return [canonical(x) for x in ([loss_type] if isinstance(loss_type, str) else loss_type)]


class LossSettingError(ValueError):
    """A loss setting that cannot work; ``key`` is the setting's name (TRL's DPOConfig name)."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


@dataclass(frozen=True)
class PreferenceLoss:
    """A run's preference loss: the loss types, their weights and every setting they read,
    checked once when built (``LossSettingError`` names the setting) and then called on each
    batch of pairs. The field names are TRL DPOConfig's; ``rpo_alpha`` adds TRL's ``sft``
    term (RPO) with that weight. A registered loss function reads its settings from this
    object (``o.beta``, ``o.label_smoothing`` ...).

    >>> loss = PreferenceLoss(loss_type="ipo", beta=0.2)
    >>> out = loss(chosen, rejected, ref_chosen, ref_rejected,
    ...            chosen_lengths=lc, rejected_lengths=lr)     # LossOutput of (B,) tensors
    """

    loss_type: str | Sequence[str] = "sigmoid"
    loss_weights: Sequence[float] | None = None
    beta: float = 0.1
    label_smoothing: float = 0.0
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    discopop_tau: float = 0.05
    simpo_gamma: float = 0.5
    cpo_alpha: float = 1.0
    rpo_alpha: float | None = None
    reference_free: bool = False  # treat every reference log-prob as 0 (no score stage)
    # (name, weight) of every term, resolved from the fields above by __post_init__
    terms: tuple[tuple[str, float], ...] = field(init=False, repr=False, compare=False, default=())

    def __post_init__(self):
        def need(cond: bool, key: str, message: str) -> None:
            if not cond:
                raise LossSettingError(key, message)

        names = as_list(self.loss_type)
        for name in names:
            need(name in LOSSES, "loss_type", f"{name!r} is not one of {sorted(LOSSES) + sorted(ALIASES)}")
        weights = list(self.loss_weights) if self.loss_weights is not None else [1.0] * len(names)
        need(len(weights) == len(names), "loss_weights", f"{len(weights)} weights for {len(names)} loss types")
        if self.rpo_alpha is not None:
            names, weights = names + ["sft"], weights + [self.rpo_alpha]
        # the resolved terms (frozen: set once, here)
        object.__setattr__(self, "terms", tuple(zip(names, (float(w) for w in weights))))
        need(self.beta > 0, "beta", "must be > 0")
        need(0.0 <= self.label_smoothing < 0.5, "label_smoothing", "must be in [0, 0.5)")
        if self.label_smoothing > 0:
            ignoring = [x for x in names if not LOSSES[x].label_smoothing]
            need(not ignoring, "label_smoothing",
                 f"{self.label_smoothing} has no effect on {ignoring} "
                 "(used by sigmoid (cDPO), robust, exo_pair, aot, aot_unpaired, simpo, cpo)")
        need("exo_pair" not in names or self.label_smoothing > 0, "label_smoothing",
             "exo_pair needs epsilon > 0 (the EXO paper and TRL recommend 1e-3)")
        need(self.f_divergence_type in F_DIVERGENCES, "f_divergence_type",
             f"{self.f_divergence_type!r} is not one of {list(F_DIVERGENCES)}")
        if self.f_divergence_type != "reverse_kl":
            bad = [x for x in names if not LOSSES[x].f_divergence]
            need(not bad, "f_divergence_type",
                 f"{self.f_divergence_type} has no valid generalisation for {bad} "
                 "(only losses built on the chosen-rejected score difference)")
        need(self.f_divergence_type == "alpha_divergence" or self.f_alpha_divergence_coef == 0.5,
             "f_alpha_divergence_coef", "only used with f_divergence_type: alpha_divergence")
        need(self.discopop_tau > 0, "discopop_tau", "must be > 0")

    @property
    def names(self) -> list[str]:
        """The loss terms' canonical names, in order (RPO's ``sft`` last)."""
        return [name for name, _ in self.terms]

    @property
    def needs_reference(self) -> bool:
        """False when no term reads reference log-probs: the score stage is skipped."""
        return not (self.reference_free or all(LOSSES[name].reference_free for name in self.names))

    def __call__(
        self,
        chosen_logps: torch.Tensor,
        rejected_logps: torch.Tensor,
        ref_chosen_logps: torch.Tensor | None = None,
        ref_rejected_logps: torch.Tensor | None = None,
        *,
        chosen_lengths: torch.Tensor | None = None,
        rejected_lengths: torch.Tensor | None = None,
        pair_weights: torch.Tensor | None = None,
        chosen_nll_sum: torch.Tensor | None = None,
    ) -> LossOutput:
        """Per-pair losses (B,) and detached rewards (B,) of one batch of pairs.

        All inputs (B,). Reference log-probs may be None when ``needs_reference`` is false
        (they are 0). ``pair_weights``, detached, multiplies every term (WPO).
        ``chosen_nll_sum`` is the plain sum of the chosen per-token log-probs for the NLL
        terms when ``chosen_logps`` is re-aggregated (LD-DPO, mean); default
        ``chosen_logps``. Rewards follow the first term: beta * log-ratio, or beta * (mean)
        log-prob for reference-free losses.
        """
        if ref_chosen_logps is None or ref_rejected_logps is None:
            if self.needs_reference:
                raise ValueError(f"{self.names} need reference log-probs")
            ref_chosen_logps = ref_rejected_logps = torch.zeros_like(chosen_logps)
        to_f = lambda lr: f_divergence_scores(lr, self.f_divergence_type, self.f_alpha_divergence_coef)  # noqa: E731
        p = PairLogps(
            chosen=chosen_logps, rejected=rejected_logps,
            ref_chosen=ref_chosen_logps, ref_rejected=ref_rejected_logps,
            chosen_scores=to_f(chosen_logps - ref_chosen_logps),
            rejected_scores=to_f(rejected_logps - ref_rejected_logps),
            chosen_lengths=None if chosen_lengths is None else chosen_lengths.to(chosen_logps.dtype),
            rejected_lengths=None if rejected_lengths is None else rejected_lengths.to(chosen_logps.dtype),
            chosen_nll_sum=chosen_logps if chosen_nll_sum is None else chosen_nll_sum,
        )
        total = torch.zeros_like(chosen_logps)
        for name, w in self.terms:
            per_pair = LOSSES[name].fn(p, self)
            if pair_weights is not None:
                per_pair = per_pair * pair_weights
            total = total + w * per_pair
        kind = LOSSES[self.names[0]].rewards
        return LossOutput(
            losses=total,
            chosen_rewards=_rewards(kind, self.beta, chosen_logps, ref_chosen_logps, p.chosen_lengths),
            rejected_rewards=_rewards(kind, self.beta, rejected_logps, ref_rejected_logps, p.rejected_lengths),
        )


def _rewards(kind: str, beta: float, logps, ref_logps, lengths) -> torch.Tensor:
    if kind == "logratio":
        value = logps - ref_logps
    elif kind == "logp":
        value = logps
    else:
        value = logps / lengths.clamp(min=1.0)
    return (beta * value).detach()


def preference_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    loss_type: str | Sequence[str] = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    loss_weights: Sequence[float] | None = None,
    discopop_tau: float = 0.05,
    simpo_gamma: float = 0.5,
    cpo_alpha: float = 1.0,
    pair_weights: torch.Tensor | None = None,
    chosen_nll_sum: torch.Tensor | None = None,
) -> LossOutput:
    """The functional form, with TRL's DPOConfig names: builds a ``PreferenceLoss`` and calls
    it once. ``loss_type`` may be a list, combined as ``sum_k loss_weights[k] * loss_k``."""
    loss = PreferenceLoss(loss_type=loss_type, loss_weights=loss_weights, beta=beta, label_smoothing=label_smoothing,
                          f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha_divergence_coef,
                          discopop_tau=discopop_tau, simpo_gamma=simpo_gamma, cpo_alpha=cpo_alpha)
    return loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
                pair_weights=pair_weights, chosen_nll_sum=chosen_nll_sum)
