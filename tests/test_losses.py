import math

import pytest
import torch

from pipeline.core.losses import LOSSES, preference_loss


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def test_sigmoid_is_ln2_when_policy_equals_reference():
    logps = t(-12.5, -40.0, -3.25)
    out = preference_loss(logps, logps - 1, logps, logps - 1, beta=0.1)
    assert torch.allclose(out.losses, torch.full((3,), math.log(2), dtype=torch.float64), atol=1e-12)
    assert torch.equal(out.chosen_rewards, torch.zeros(3, dtype=torch.float64))


def test_sigmoid_worked_numbers():
    # chosen: policy -10, ref -12 -> reward 0.1 * 2 = 0.2
    # rejected: policy -15, ref -14 -> reward 0.1 * -1 = -0.1
    # logits h = 2 - (-1) = 3; loss = -log sigmoid(0.3) = log(1 + e^-0.3) = 0.554355...
    out = preference_loss(t(-10), t(-15), t(-12), t(-14), loss_type="sigmoid", beta=0.1)
    assert out.losses.item() == pytest.approx(math.log1p(math.exp(-0.3)), abs=1e-12)
    assert out.losses.item() == pytest.approx(0.5543552444685, abs=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(0.2, abs=1e-12)
    assert out.rejected_rewards.item() == pytest.approx(-0.1, abs=1e-12)


def test_cdpo_label_smoothing_worked_numbers():
    # eps = 0.1: 0.9 * log(1 + e^-0.3) + 0.1 * log(1 + e^0.3)
    out = preference_loss(t(-10), t(-15), t(-12), t(-14), beta=0.1, label_smoothing=0.1)
    want = 0.9 * math.log1p(math.exp(-0.3)) + 0.1 * math.log1p(math.exp(0.3))
    assert out.losses.item() == pytest.approx(want, abs=1e-12)


def test_rewards_are_detached():
    c = t(-10).requires_grad_()
    out = preference_loss(c, t(-15), t(-12), t(-14), beta=0.1)
    assert not out.chosen_rewards.requires_grad and out.losses.requires_grad


def test_gradient_matches_closed_form():
    # d loss / d chosen_logps = -beta * sigmoid(-beta * h)
    c = t(-10).requires_grad_()
    preference_loss(c, t(-15), t(-12), t(-14), beta=0.1).losses.sum().backward()
    assert c.grad.item() == pytest.approx(-0.1 / (1 + math.exp(0.3)), abs=1e-12)


def test_unknown_loss_names_the_choices():
    with pytest.raises(ValueError, match="loss_type: 'sigmod' is not one of.*sigmoid"):
        preference_loss(t(-1), t(-1), t(-1), t(-1), loss_type="sigmod")
    assert "sigmoid" in LOSSES


# ----------------------------------------------------------------------------- every loss by hand
# One pair: policy chosen -10, rejected -15; reference chosen -12, rejected -14; beta 0.1;
# completion lengths 4 (chosen) and 5 (rejected). So rho_w = 2, rho_l = -1, Delta = 3.
def sp(x):  # softplus(x) = -log sigmoid(-x)
    return math.log1p(math.exp(x))


def sig(x):
    return 1 / (1 + math.exp(-x))


EPS = 1e-3
HAND = {
    "sigmoid": sp(-0.3),
    "hinge": 1 - 0.3,
    "ipo": (2 / 4 + 1 / 5 - 1 / 0.2) ** 2,  # (0.7 - 5)^2 = 18.49
    "nca_pair": sp(-0.2) + 0.5 * sp(0.2) + 0.5 * sp(-0.1),
    "bco_pair": sp(-0.2) + sp(-0.1),
    "sppo_hard": (2 - 5) ** 2 + (-1 + 5) ** 2,  # 25
    "apo_zero": 1 - sig(0.2) + sig(-0.1),
    "apo_down": sig(0.2) + 1 - sig(0.3),
    "discopop": (1 - sig(0.3 / 0.05)) * sp(-0.3) + sig(0.3 / 0.05) * math.exp(-0.3),
    "sigmoid_norm": sp(-0.1 * (2 / 4 + 1 / 5)),
    "sft": 10 / 4,
    "aot": sp(-0.3),  # one pair: the sorts change nothing
    "aot_unpaired": sp(-0.3),
    "exo_pair": sig(0.3) * (math.log(sig(0.3)) - math.log(1 - EPS))
    + sig(-0.3) * (math.log(sig(-0.3)) - math.log(EPS)),
    "robust": (0.9 * sp(-0.3) - 0.1 * sp(0.3)) / 0.8,
    "simpo": sp(-0.1 * (-10 / 4 + 15 / 5 - 0.5 / 0.1)),  # cpo_alpha 0: the paper's SimPO
    "cpo": sp(-0.1 * 5),
    "orpo": 10 / 4 - 0.1 * math.log(sig((-2.5 + 3) - (math.log(1 - math.exp(-2.5)) - math.log(1 - math.exp(-3))))),
}


@pytest.mark.parametrize("loss_type", sorted(HAND))
def test_every_loss_worked_numbers(loss_type):
    eps = {"exo_pair": EPS, "robust": 0.1}.get(loss_type, 0.0)
    out = preference_loss(t(-10), t(-15), t(-12), t(-14), loss_type=loss_type, beta=0.1, label_smoothing=eps,
                          chosen_lengths=t(4), rejected_lengths=t(5), cpo_alpha=0.0)
    assert out.losses.item() == pytest.approx(HAND[loss_type], abs=1e-12)


def test_every_registered_loss_has_a_worked_number():
    assert set(LOSSES) == set(HAND)


def test_cpo_alpha_adds_the_chosen_nll():
    out = preference_loss(t(-10), t(-15), t(-12), t(-14), loss_type="cpo", beta=0.1,
                          chosen_lengths=t(4), rejected_lengths=t(5), cpo_alpha=1.0)
    assert out.losses.item() == pytest.approx(sp(-0.5) + 2.5, abs=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(-1.0)  # beta * logp (no reference)


def test_aot_sorts_across_the_pairs_of_a_batch():
    # pair A: policy diff 5, ref diff 2; pair B: policy diff 1, ref diff 4
    # sorted policy [1, 5] - sorted ref [2, 4] = [-1, 1]
    out = preference_loss(t(-10, -11), t(-15, -12), t(-12, -10), t(-14, -14), loss_type="aot", beta=0.1)
    assert out.losses.tolist() == pytest.approx([sp(0.1), sp(-0.1)], abs=1e-12)


def test_combined_losses_and_pair_weights():
    out = preference_loss(t(-10), t(-15), t(-12), t(-14), loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5],
                          chosen_lengths=t(4), rejected_lengths=t(5), pair_weights=t(0.25))
    assert out.losses.item() == pytest.approx(0.25 * (sp(-0.3) + 0.5 * 2.5), abs=1e-12)


def test_f_divergences_worked_numbers():
    # forward KL: s = 1 - e^-rho: s_w = 1 - e^-2, s_l = 1 - e^1
    out = preference_loss(t(-10), t(-15), t(-12), t(-14), f_divergence_type="forward_kl")
    assert out.losses.item() == pytest.approx(sp(-0.1 * (math.exp(1) - math.exp(-2))), abs=1e-12)
    # alpha 0.5: s = (u^-0.5 - 1) / -0.5 = 2 (1 - e^(-rho/2))
    out = preference_loss(t(-10), t(-15), t(-12), t(-14), f_divergence_type="alpha_divergence",
                          f_alpha_divergence_coef=0.5)
    delta = 2 * (1 - math.exp(-1)) - 2 * (1 - math.exp(0.5))
    assert out.losses.item() == pytest.approx(sp(-0.1 * delta), abs=1e-12)
    with pytest.raises(ValueError, match="f_divergence_type: forward_kl has no valid generalisation for"):
        preference_loss(t(-10), t(-15), t(-12), t(-14), loss_type="bco_pair", f_divergence_type="forward_kl")


# Each loss's value at step 0 (policy == reference: every log-ratio 0), beta 0.1.
STEP0 = {
    "sigmoid": math.log(2), "hinge": 1.0, "ipo": 25.0, "nca_pair": 2 * math.log(2), "robust": math.log(2),
    "bco_pair": 2 * math.log(2), "sppo_hard": 50.0, "aot": math.log(2), "aot_unpaired": math.log(2),
    "apo_zero": 1.0, "apo_down": 1.0, "discopop": 0.5 * (math.log(2) + 1), "sigmoid_norm": math.log(2),
    "exo_pair": 0.5 * (math.log(0.5) - math.log(1 - EPS)) + 0.5 * (math.log(0.5) - math.log(EPS)),
}


@pytest.mark.parametrize("loss_type", sorted(STEP0))
def test_step0_value_of_each_reference_loss(loss_type):
    logps = t(-31.5, -7.25)
    eps = {"exo_pair": EPS, "robust": 0.2, "aot": 0.1}.get(loss_type, 0.0)
    out = preference_loss(logps, logps - 3, logps, logps - 3, loss_type=loss_type, beta=0.1, label_smoothing=eps,
                          chosen_lengths=t(7, 3), rejected_lengths=t(5, 2))
    want = STEP0[loss_type] if loss_type != "aot" else math.log(2)
    assert out.losses.tolist() == pytest.approx([want, want], abs=1e-12)
