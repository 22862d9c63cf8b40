"""Every loss against TRL 1.16 itself (pinned, test-only), on random float64 inputs.

TRL's DPOTrainer computes its loss inside ``_compute_loss`` from the per-token log-probs
its fused LM head returns. A real DPOTrainer (tiny model, ``precompute_ref_log_probs``) is
driven here with a policy whose fused head returns given per-token log-probs, so TRL's own
code computes the loss of exactly the numbers ours sees.
"""


import pytest
import torch

from pipeline.core.losses import LOSSES, preference_loss

trl = pytest.importorskip("trl")
from trl.trainer.utils import FusedCausalLMOutput  # noqa: E402

B, L = 6, 12  # pairs, tokens per sequence


@pytest.fixture(scope="module")
def trainer(assets, tmp_path_factory):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(assets["model"])
    model = AutoModelForCausalLM.from_pretrained(assets["model"])
    data = Dataset.from_list([{"prompt": "a b", "chosen": " c", "rejected": " d"}] * 2)
    args = DPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), report_to=[], use_cpu=True,
                     precompute_ref_log_probs=True, per_device_train_batch_size=2)
    return DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok)


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(2, 6, (2 * B,), generator=g)  # prompt lengths
    comp = torch.randint(1, L - 6, (2 * B,), generator=g)  # completion lengths
    pos = torch.arange(L)
    completion_mask = ((pos >= prompt[:, None]) & (pos < (prompt + comp)[:, None])).long()
    per_token = -torch.rand(2 * B, L - 1, generator=g, dtype=torch.float64) * 6 * completion_mask[:, 1:]
    sq = -torch.rand(2 * B, L - 1, generator=g, dtype=torch.float64) * 2 * completion_mask[:, 1:]
    ref = -torch.rand(2 * B, generator=g, dtype=torch.float64) * 40
    return dict(completion_mask=completion_mask, per_token=per_token, log_sum_sq=sq, ref=ref,
                lengths=completion_mask.sum(1).double())


def trl_loss(trainer, batch, **settings):
    """TRL's scalar loss and its logged reward means for the given settings."""
    defaults = dict(loss_types=["sigmoid"], loss_weights=[1.0], beta=0.1, label_smoothing=0.0,
                    f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, use_weighting=False,
                    ld_alpha=None)
    for k, v in {**defaults, **settings}.items():
        setattr(trainer, k, v)
    trainer.args.discopop_tau = settings.get("discopop_tau", 0.05)
    per_token, mask = batch["per_token"], batch["completion_mask"]

    def policy(input_ids, attention_mask=None, labels=None, fused_lm_head=False, **_):
        shifted = labels[:, 1:] != -100
        zeros = torch.zeros_like(per_token)
        return FusedCausalLMOutput(log_probs=per_token * shifted, entropy=zeros,
                                   log_sum_sq_probs=batch["log_sum_sq"] * shifted,
                                   mean_logits=zeros, is_top1=zeros.bool(), label_mask=shifted)

    inputs = {"input_ids": torch.zeros_like(mask), "attention_mask": torch.ones_like(mask),
              "completion_mask": mask, "ref_chosen_logps": batch["ref"][:B],
              "ref_rejected_logps": batch["ref"][B:]}
    trainer.model.train()  # TRL logs under "train" in train mode
    trainer._metrics["train"].clear()
    loss = trainer._compute_loss(policy, inputs, return_outputs=False)
    m = trainer._metrics["train"]
    return loss.item(), m["rewards/chosen"][-1], m["rewards/rejected"][-1]


def our_loss(batch, **kw):
    seq = batch["per_token"].sum(1)
    out = preference_loss(seq[:B], seq[B:], batch["ref"][:B], batch["ref"][B:],
                          chosen_lengths=batch["lengths"][:B], rejected_lengths=batch["lengths"][B:], **kw)
    return out.losses.mean().item(), out.chosen_rewards.mean().item(), out.rejected_rewards.mean().item()


DPO_TYPES = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
             "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]


def test_every_trl_loss_type_is_registered():
    assert set(DPO_TYPES) <= set(LOSSES)


@pytest.mark.parametrize("loss_type", DPO_TYPES)
@pytest.mark.parametrize("beta", [0.1, 0.7])
def test_loss_equals_trl(trainer, batch, loss_type, beta):
    eps = 1e-3 if loss_type == "exo_pair" else (0.2 if loss_type in ("robust", "aot", "aot_unpaired") else 0.0)
    want = trl_loss(trainer, batch, loss_types=[loss_type], beta=beta, label_smoothing=eps)
    got = our_loss(batch, loss_type=loss_type, beta=beta, label_smoothing=eps)
    assert got == pytest.approx(want, abs=1e-6, rel=1e-9)


@pytest.mark.parametrize("f_div", ["forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize("loss_type", [t for t in DPO_TYPES if LOSSES[t].f_divergence])
def test_f_divergence_equals_trl(trainer, batch, loss_type, f_div):
    eps = 1e-3 if loss_type == "exo_pair" else (0.2 if loss_type == "robust" else 0.0)
    small = dict(batch, ref=batch["per_token"].sum(1) + 0.3 * torch.sin(torch.arange(2 * B).double()))
    if f_div == "alpha_divergence":  # TRL's clamp table has no float64 entry: compare in float32
        small = {k: v.float() if v.is_floating_point() else v for k, v in small.items()}
    # the coefficient is only read by the alpha divergence (ours refuses it elsewhere)
    for alpha in (0.5, 1.0, 1.7) if f_div == "alpha_divergence" else (0.5,):
        want = trl_loss(trainer, small, loss_types=[loss_type], label_smoothing=eps,
                        f_divergence_type=f_div, f_alpha_divergence_coef=alpha)
        got = our_loss(small, loss_type=loss_type, label_smoothing=eps, f_divergence_type=f_div,
                       f_alpha_divergence_coef=alpha)
        assert got == pytest.approx(want, abs=1e-6, rel=1e-9)


def test_combined_losses_with_weights_equal_trl(trainer, batch):
    want = trl_loss(trainer, batch, loss_types=["sigmoid", "sft", "ipo"], loss_weights=[1.0, 0.5, 0.25])
    got = our_loss(batch, loss_type=["sigmoid", "sft", "ipo"], loss_weights=[1.0, 0.5, 0.25])
    assert got == pytest.approx(want, abs=1e-6, rel=1e-9)


def test_discopop_tau_equals_trl(trainer, batch):
    want = trl_loss(trainer, batch, loss_types=["discopop"], discopop_tau=0.3)
    assert our_loss(batch, loss_type="discopop", discopop_tau=0.3) == pytest.approx(want, abs=1e-6)


def test_wpo_weighting_equals_trl(trainer, batch):
    from pipeline.core.logps import wpo_pair_weights

    # (TRL 1.16 itself fails on use_weighting with "sft": an in-place multiply of an expanded tensor)
    want = trl_loss(trainer, batch, loss_types=["sigmoid", "ipo"], loss_weights=[1.0, 0.3], use_weighting=True)
    mask = batch["completion_mask"][:, 1:].double()
    w = wpo_pair_weights((batch["per_token"] - batch["log_sum_sq"] * mask).sum(1), batch["lengths"])
    got = our_loss(batch, loss_type=["sigmoid", "ipo"], loss_weights=[1.0, 0.3], pair_weights=w[:B] * w[B:])
    assert got == pytest.approx(want, abs=1e-6, rel=1e-9)


@pytest.mark.parametrize("ld_alpha", [0.0, 0.5, 1.0])
def test_ld_dpo_equals_trl(trainer, batch, ld_alpha):
    """LD-DPO from per-token columns: chosen/rejected share their first min(len) tokens."""
    from pipeline.core.logps import ld_token_weights

    want = trl_loss(trainer, batch, ld_alpha=ld_alpha)
    # per-token weights from each pair's completion positions, as the trainer builds them
    lengths = batch["lengths"].long()
    shared = torch.minimum(lengths[:B], lengths[B:]).repeat(2)
    weights = ld_token_weights(lengths, shared, ld_alpha)
    flat = torch.cat([batch["per_token"][i][batch["completion_mask"][i, 1:].bool()] for i in range(2 * B)])
    seg = torch.repeat_interleave(torch.arange(2 * B), lengths)
    logps = torch.zeros(2 * B, dtype=torch.float64).index_add(0, seg, flat * weights)
    # TRL's reference logps are precomputed sums, re-weighted only when computed live: pass them as is
    out = preference_loss(logps[:B], logps[B:], batch["ref"][:B], batch["ref"][B:])
    assert out.losses.mean().item() == pytest.approx(want[0], abs=1e-6, rel=1e-9)


def test_rewards_equal_trl(trainer, batch):
    want = trl_loss(trainer, batch, loss_types=["sigmoid"], beta=0.3)
    got = our_loss(batch, loss_type="sigmoid", beta=0.3)
    assert got[1:] == pytest.approx(want[1:], abs=1e-9)


# ----------------------------------------------------------------------------- reference-free


@pytest.fixture(scope="module")
def cpo_trainer(assets, tmp_path_factory):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    tok = AutoTokenizer.from_pretrained(assets["model"])
    data = Dataset.from_list([{"prompt": "a b", "chosen": " c", "rejected": " d"}] * 2)
    return CPOTrainer(model=AutoModelForCausalLM.from_pretrained(assets["model"]),
                      args=CPOConfig(output_dir=str(tmp_path_factory.mktemp("cpo")), report_to=[],
                                     use_cpu=True),
                      train_dataset=data, processing_class=tok)


@pytest.mark.parametrize("loss_type, ours", [("sigmoid", "cpo"), ("simpo", "simpo")])
@pytest.mark.parametrize("cpo_alpha", [0.0, 1.0])
def test_cpo_and_simpo_equal_trl(cpo_trainer, batch, loss_type, ours, cpo_alpha):
    seq, n = batch["per_token"].sum(1), batch["lengths"]
    tr = cpo_trainer
    tr.loss_type, tr.beta, tr.label_smoothing, tr.simpo_gamma, tr.cpo_alpha = loss_type, 0.2, 0.1, 0.7, cpo_alpha
    logps = seq / n if loss_type == "simpo" else seq  # TRL averages for simpo
    losses, cr, rr = tr.cpo_loss(logps[:B], logps[B:])
    nll = -seq[:B].sum() / n[:B].sum()
    want = (losses.mean() + cpo_alpha * nll).item()
    out = preference_loss(seq[:B], seq[B:], torch.zeros(B), torch.zeros(B), loss_type=ours, beta=0.2,
                          label_smoothing=0.1, simpo_gamma=0.7, cpo_alpha=cpo_alpha,
                          chosen_lengths=n[:B], rejected_lengths=n[B:])
    assert out.losses.mean().item() == pytest.approx(want, abs=1e-6, rel=1e-9)
    assert torch.allclose(out.chosen_rewards, cr.double(), atol=1e-12)


def test_orpo_equals_trl(assets, tmp_path, batch):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    tok = AutoTokenizer.from_pretrained(assets["model"])
    data = Dataset.from_list([{"prompt": "a b", "chosen": " c", "rejected": " d"}] * 2)
    tr = ORPOTrainer(model=AutoModelForCausalLM.from_pretrained(assets["model"]),
                     args=ORPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, beta=0.25),
                     train_dataset=data, processing_class=tok)
    seq, n = batch["per_token"].sum(1), batch["lengths"]
    avg = seq / n
    losses, cr, _, _, _ = tr.odds_ratio_loss(avg[:B], avg[B:])  # TRL computes this in float32
    nll = -seq[:B].sum() / n[:B].sum()
    want = (nll - losses.mean()).item()
    out = preference_loss(seq[:B], seq[B:], torch.zeros(B), torch.zeros(B), loss_type="orpo", beta=0.25,
                          chosen_lengths=n[:B], rejected_lengths=n[B:])
    assert out.losses.mean().item() == pytest.approx(want, abs=1e-6)
    assert torch.allclose(out.chosen_rewards.float(), cr, atol=1e-6)
