import pytest
import torch

from pipeline.logps import (
    chunked_target_logps,
    packed_token_logps,
    segment_layout,
    segment_sums,
    segment_token_counts,
)


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


@pytest.mark.parametrize("chunk", [1, 3, 7, 1000])
def test_chunked_equals_naive_log_softmax_with_grads(chunk):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(17, 8, dtype=torch.float64, generator=g, requires_grad=True)
    head = torch.nn.Linear(8, 50, bias=False).double()
    targets = torch.randint(0, 50, (17,), generator=g)
    ours = chunked_target_logps(hidden, head, targets, chunk)
    naive = torch.log_softmax(head(hidden), -1).gather(-1, targets[:, None]).squeeze(-1)
    assert torch.allclose(ours, naive.float(), atol=1e-6)
    w = torch.randn(17, dtype=torch.float32, generator=g)
    (gh,) = torch.autograd.grad((ours * w).sum(), hidden)
    (gn,) = torch.autograd.grad((naive * w.double()).sum(), hidden)
    assert torch.allclose(gh, gn, atol=1e-6)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_row_equals_separate_forwards(assets, attn):
    """Segments of a packed row must not attend to each other (ENVIRONMENT.md's trap)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(assets["model"], attn_implementation=attn).eval()
    g = torch.Generator().manual_seed(1)
    lens, prompts = [23, 17, 31, 9, 40, 12], [5, 5, 11, 3, 20, 4]
    segs = [torch.randint(3, 500, (n,), generator=g) for n in lens]
    input_ids = torch.cat(segs)
    position_ids = torch.cat([torch.arange(n) for n in lens])
    layout = segment_layout(torch.tensor(lens), torch.tensor(prompts))
    with torch.no_grad():
        packed = packed_token_logps(model, input_ids, position_ids, layout, chunk=16)
        offset = 0
        for seg, p in zip(segs, prompts):
            logits = model(seg[None], use_cache=False).logits[0].double()
            ref = torch.log_softmax(logits[:-1], -1).gather(-1, seg[1:, None]).squeeze(-1)[p - 1:]
            got = packed[offset + p: offset + len(seg)]
            assert torch.allclose(got.double(), ref, atol=1e-5), (got - ref).abs().max()
            assert torch.all(packed[offset: offset + p] == 0)  # prompt tokens hold 0
            offset += len(seg)
