import pytest
import torch

from helpers import reference_varlen, shared_and_unshared_rows

from pipeline.core.logps import lm_head_target_logps, sequence_logps, packed_token_logps

from pipeline.core.segments import segment_layout, segment_sums, segment_token_counts


def test_segment_layout_worked_example():
    # two segments: lengths 5 and 4, prompts 2 and 3 -> completion positions 2,3,4 and 8
    layout = segment_layout(torch.tensor([5, 4]), torch.tensor([2, 3]))
    assert layout.targets.tolist() == [2, 3, 4, 8]
    assert layout.target_seg.tolist() == [0, 0, 0, 1]
    assert layout.seg_ids.tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1]
    assert segment_token_counts(layout).tolist() == [3, 1]
    per_token = torch.arange(9, dtype=torch.float32)
    assert segment_sums(per_token, layout).tolist() == [2 + 3 + 4, 8]


def test_segment_layout_needs_a_prompt_token():
    with pytest.raises(ValueError, match="prompt_len"):
        segment_layout(torch.tensor([5]), torch.tensor([0]))
    with pytest.raises(ValueError, match="only valid for a rejected segment"):  # a chosen cannot share
        segment_layout(torch.tensor([5, 3, 4, 2]), torch.tensor([2, 0, 0, 1]))


def test_shared_prompt_layout_worked_example():
    """Pair 1: prompt 2 + chosen 3 stored as [p p c c c], rejected 2 stored as [r r] at
    positions 2, 3; pair 2 unshared. The first rejected token is predicted from the
    prompt's last token (position 1), and the rejected tokens see the prompt, not the
    chosen completion."""
    from pipeline.core.segments import attention_mask

    layout = segment_layout(torch.tensor([5, 2, 3, 3]), torch.tensor([2, 0, 1, 1]))
    assert layout.targets.tolist() == [2, 3, 4, 5, 6, 8, 9, 11, 12]
    assert layout.sources.tolist() == [1, 2, 3, 1, 5, 7, 8, 10, 11]
    assert layout.target_seg.tolist() == [0, 0, 0, 1, 1, 2, 2, 3, 3]
    assert layout.blocks == [(0, 5, 0, 0), (5, 7, 0, 2), (7, 10, 7, 7), (10, 13, 10, 10)]
    assert layout.shares_prompts
    assert segment_token_counts(layout).tolist() == [3, 2, 2, 2]
    mask = attention_mask(layout, 13).int()
    assert mask[:7, :7].tolist() == [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 0, 1, 0],
        [1, 1, 0, 0, 0, 1, 1],
    ]
    assert mask[7:, :7].sum() == 0 and mask[:7, 7:].sum() == 0
    assert not segment_layout(torch.tensor([3, 2]), torch.tensor([1, 1])).shares_prompts


@pytest.mark.parametrize("chunk", [1, 3, 7, 1000])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_equals_naive_log_softmax_with_grads(chunk, bias):
    """Values, log sum p^2 and the gradients of hidden, weight and bias, in float32 against
    a float64 log_softmax + gather."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(17, 8, generator=g, requires_grad=True)
    head = torch.nn.Linear(8, 50, bias=bias)
    targets = torch.randint(0, 50, (17,), generator=g)
    ours, sq, _ = lm_head_target_logps(head, hidden, targets, chunk, log_sum_sq=True)
    assert "forward" not in vars(head)  # the module's own forward is back
    h64 = hidden.detach().double().requires_grad_()
    head64 = torch.nn.Linear(8, 50, bias=bias).double()
    head64.load_state_dict(head.state_dict())
    logp64 = torch.log_softmax(head64(h64), -1)
    naive = logp64.gather(-1, targets[:, None]).squeeze(-1)
    assert torch.allclose(ours.double(), naive, atol=1e-6)
    assert torch.allclose(sq.double(), torch.logsumexp(2 * logp64, -1), atol=1e-6)
    w = torch.randn(17, generator=g)
    (ours * w).sum().backward()
    (naive * w.double()).sum().backward()
    assert torch.allclose(hidden.grad.double(), h64.grad, atol=1e-6)
    assert torch.allclose(head.weight.grad.double(), head64.weight.grad, atol=1e-6)
    if bias:
        assert torch.allclose(head.bias.grad.double(), head64.bias.grad, atol=1e-6)


def test_sequence_logps_sum_mean_and_ld_weights():
    # one pair: chosen 3 completion tokens, rejected 1 -> LD keeps chosen's first token at 1
    layout = segment_layout(torch.tensor([5, 3]), torch.tensor([2, 2]))
    per_token = torch.tensor([0, 0, -1.0, -2.0, -4.0, 0, 0, -8.0], dtype=torch.float64)
    assert sequence_logps(per_token, layout).tolist() == [-7.0, -8.0]
    assert sequence_logps(per_token, layout, "mean").tolist() == [-7.0 / 3, -8.0]
    assert sequence_logps(per_token, layout, ld_alpha=0.5).tolist() == [-1.0 - 0.5 * 6.0, -8.0]


# flex_attention compiles its kernel with inductor, which runs the C++ compiler: slow tier
@pytest.mark.parametrize("attn", ["segment_sdpa", "sdpa", "eager", pytest.param("flex_attention", marks=pytest.mark.slow)])
def test_packed_row_equals_separate_forwards(assets, attn):
    """Segments of a packed row must not attend to each other (docs/design.md, "Packed rows and attention").
    flex_attention (the GPU fast path: a block-sparse mask, never a dense one) is checked
    here on CPU, where torch compiles it with inductor."""
    from transformers import AutoModelForCausalLM

    from pipeline.core.attention import register

    register()
    model = AutoModelForCausalLM.from_pretrained(assets["model"], attn_implementation=attn).eval()
    separate = AutoModelForCausalLM.from_pretrained(assets["model"], attn_implementation="eager").eval()
    g = torch.Generator().manual_seed(1)
    lens, prompts = [23, 17, 31, 9, 40, 12], [5, 5, 11, 3, 20, 4]
    segs = [torch.randint(3, 500, (n,), generator=g) for n in lens]
    input_ids = torch.cat(segs)
    position_ids = torch.cat([torch.arange(n) for n in lens])
    layout = segment_layout(torch.tensor(lens), torch.tensor(prompts))
    with torch.no_grad():
        packed = packed_token_logps(model, input_ids, position_ids, layout, chunk=16).logps
        offset = 0
        for seg, p in zip(segs, prompts):
            logits = separate(seg[None], use_cache=False).logits[0].double()
            ref = torch.log_softmax(logits[:-1], -1).gather(-1, seg[1:, None]).squeeze(-1)[p - 1:]
            got = packed[offset + p: offset + len(seg)]
            assert torch.allclose(got.double(), ref, atol=1e-5), (got - ref).abs().max()
            assert torch.all(packed[offset: offset + p] == 0)  # prompt tokens hold 0
            offset += len(seg)


def test_segment_sdpa_gradients_equal_the_dense_mask(assets):
    """The training path: the same per-token log-probs and parameter gradients as
    transformers' sdpa with its dense block-diagonal mask, with none of the mask."""
    from pipeline.core.config import ModelConfig
    from pipeline.core.modeling import load_causal_lm

    g = torch.Generator().manual_seed(2)
    lens, prompts = [57, 31, 64, 12, 90, 45], [20, 20, 8, 8, 30, 30]
    input_ids = torch.randint(3, 500, (sum(lens),), generator=g)
    position_ids = torch.cat([torch.arange(n) for n in lens])
    layout = segment_layout(torch.tensor(lens), torch.tensor(prompts))
    results = {}
    for attn in ("segment_sdpa", "sdpa"):
        model = load_causal_lm(str(assets["model"]), ModelConfig(path="x", attn_implementation=attn))
        logps = packed_token_logps(model, input_ids, position_ids, layout, chunk=32).logps
        logps.sum().backward()
        results[attn] = (logps.detach(), torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(results["segment_sdpa"][0], results["sdpa"][0], atol=1e-5)
    assert torch.allclose(results["segment_sdpa"][1], results["sdpa"][1], atol=1e-5, rtol=1e-4)


def test_segment_blocks_from_positions_and_from_the_layout():
    from pipeline.core.attention import find_blocks

    expected = [(0, 3, 0, 0), (3, 5, 3, 3), (5, 7, 5, 5)]
    assert find_blocks(torch.tensor([0, 1, 2, 0, 1, 0, 1])) == expected
    assert segment_layout(torch.tensor([3, 2, 2]), torch.tensor([1, 1, 1])).blocks == expected


@pytest.mark.parametrize("attn", ["segment_sdpa", "sdpa", "eager"])
def test_shared_prompt_rows_give_the_unshared_logps_and_gradients(assets, attn):
    """A row that stores each prompt once computes the same completion log-probs and the
    same parameter gradients as the row that stores it on both sides (the tiny model has
    grouped-query attention, so the GQA path is covered)."""
    from pipeline.core.config import ModelConfig
    from pipeline.core.modeling import load_causal_lm

    from pipeline.core.modeling import row_inputs

    g = torch.Generator().manual_seed(3)
    results = []
    for row in shared_and_unshared_rows(g, [(7, 12, 5), (1, 3, 9), (20, 4, 4)]):
        ids, pos, layout = row_inputs(row, "cpu")
        model = load_causal_lm(str(assets["model"]), ModelConfig(path="x", attn_implementation=attn))
        logps = packed_token_logps(model, ids, pos, layout, chunk=8).logps
        picked = logps[layout.targets]  # the same completion tokens in the same order in both rows
        (picked * torch.linspace(0.5, 1.5, picked.numel())).sum().backward()
        results.append((logps.detach()[layout.targets], segment_sums(logps.detach(), layout),
                        torch.cat([p.grad.flatten() for p in model.parameters()])))
    (tok_u, seq_u, grad_u), (tok_s, seq_s, grad_s) = results
    assert torch.allclose(tok_s, tok_u, atol=1e-5), (tok_s - tok_u).abs().max()
    assert torch.allclose(seq_s, seq_u, atol=1e-4)
    assert torch.allclose(grad_s, grad_u, atol=1e-5, rtol=1e-4), (grad_s - grad_u).abs().max()


@pytest.mark.parametrize("attn", ["flex_attention", "flash_attention_2"])
def test_shared_prompt_rows_refuse_attention_that_cannot_see_them(assets, attn):
    from transformers import AutoModelForCausalLM

    if attn == "flash_attention_2":  # not installed here: the refusal must not need the model to run
        model = AutoModelForCausalLM.from_pretrained(assets["model"])
        model.config._attn_implementation = attn
    else:
        model = AutoModelForCausalLM.from_pretrained(assets["model"], attn_implementation=attn)
    from pipeline.core.modeling import row_inputs

    _, shared = shared_and_unshared_rows(torch.Generator().manual_seed(0), [(3, 2, 2)])
    ids, pos, layout = row_inputs(shared, "cpu")
    with pytest.raises(NotImplementedError, match="share_prompt"):
        packed_token_logps(model, ids, pos, layout)


@pytest.mark.parametrize("extra", [{"softcap": 50.0}, {"s_aux": torch.zeros(4)}, {"position_bias": torch.zeros(1)}])
def test_segment_sdpa_refuses_attention_it_cannot_compute(extra):
    """Gemma 2's logit soft-capping, gpt-oss's sinks, T5-style position bias: SDPA has no
    such term, so computing without it would be silently wrong."""
    from pipeline.core.attention import segment_sdpa_forward

    q = k = v = torch.randn(1, 4, 6, 8)
    with pytest.raises(NotImplementedError, match="segment_sdpa: this model's attention uses"):
        segment_sdpa_forward(torch.nn.Module(), q, k, v, None, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2]]),
                             **extra)
    out, _ = segment_sdpa_forward(torch.nn.Module(), q, k, v, None, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2]]))
    assert out.shape == (1, 6, 4, 8)


def test_varlen_plan_worked_example():
    """Segments [0,5) and [8,12) stand alone; [5,8) is a rejected completion whose prompt
    is [0,2): its keys are rows 0,1 then 5,6,7."""
    from pipeline.core.attention import varlen_plan

    plan = varlen_plan([(0, 5, 0, 0), (5, 8, 0, 2), (8, 12, 8, 8)])
    assert plan.cu_q.dtype == plan.cu_k.dtype == torch.int32
    assert plan.cu_q.tolist() == [0, 5, 8, 12] and plan.cu_k.tolist() == [0, 5, 10, 14]
    assert (plan.max_q, plan.max_k) == (5, 5)
    assert plan.key_index.tolist() == [0, 1, 2, 3, 4, 0, 1, 5, 6, 7, 8, 9, 10, 11]
    unshared = varlen_plan([(0, 3, 0, 0), (3, 5, 3, 3)])
    assert unshared.key_index is None and unshared.cu_k.tolist() == unshared.cu_q.tolist() == [0, 3, 5]


@pytest.mark.parametrize("share", [False, True])
def test_varlen_forward_equals_the_per_segment_loop(share):
    """The one-call path (its key gather, GQA and layout) gives the per-segment loop's
    attention output and q/k/v gradients, with shared prompts and without."""
    from pipeline.core.attention import segment_sdpa_forward, varlen_forward, varlen_plan

    lens, prompts = [9, 4, 13, 6, 7, 11], [3, 0, 5, 0, 2, 0]
    if not share:
        prompts = [3, 2, 5, 4, 2, 1]
    layout = segment_layout(torch.tensor(lens), torch.tensor(prompts))
    assert layout.shares_prompts == share
    g = torch.Generator().manual_seed(5)
    T = sum(lens)
    q, k, v = (torch.randn(1, h, T, 8, generator=g, dtype=torch.float64, requires_grad=True) for h in (4, 2, 2))
    position_ids = torch.zeros(1, T, dtype=torch.long)  # unused: the blocks come from the layout
    plan = varlen_plan(layout.blocks)
    got = varlen_forward(q, k, v, plan, 0.3, kernel=reference_varlen)
    ref, _ = segment_sdpa_forward(torch.nn.Module(), q, k, v, None, scaling=0.3, position_ids=position_ids,
                                  segment_blocks=layout.blocks)
    assert got.shape == ref.shape == (1, T, 4, 8)
    assert torch.allclose(got, ref, atol=1e-12)
    w = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    grads = [torch.autograd.grad((out * w).sum(), (q, k, v)) for out in (got, ref)]
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-12)


def test_segment_sdpa_takes_the_varlen_plan_only_where_the_kernel_runs():
    """On the CPU (and in fp32 anywhere) the plan is ignored: flash attention has no such
    kernel, and the per-segment loop computes the row."""
    from pipeline.core.attention import segment_sdpa_forward, varlen_plan, varlen_usable

    q = torch.randn(1, 4, 6, 8, dtype=torch.bfloat16)
    assert not varlen_usable(q)
    blocks = [(0, 3, 0, 0), (3, 6, 3, 3)]
    with_plan, _ = segment_sdpa_forward(torch.nn.Module(), q, q, q, None, position_ids=torch.zeros(1, 6),
                                        segment_blocks=blocks, segment_varlen=varlen_plan(blocks))
    without, _ = segment_sdpa_forward(torch.nn.Module(), q, q, q, None, position_ids=torch.zeros(1, 6),
                                      segment_blocks=blocks)
    assert torch.equal(with_plan, without)
