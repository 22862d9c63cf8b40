import math

import pytest
import torch

from pipeline.losses import LOSSES, preference_loss


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
    with pytest.raises(ValueError, match="unknown loss_type 'sigmod'.*sigmoid"):
        preference_loss(t(-1), t(-1), t(-1), t(-1), loss_type="sigmod")
    assert "sigmoid" in LOSSES
