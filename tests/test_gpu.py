"""The GPU path, on a CUDA device: skipped where there is none (CI, the CPU machine).

Run on the lent GPU machine with ``bash bench/device_run.sh --tests`` (no Ray there: the
stages run in-process, one rank, NCCL). What CPU tests cannot see:

* ``segment_sdpa`` with the fused CUDA kernels (flash / memory-efficient, GQA) against a
  separate forward per segment, in fp32 and bf16;
* shared-prompt rows (the rejected segment through the lower-right causal bias) against
  the same pairs with the prompt on both sides, log-probs and gradients;
* torch's variable-length flash attention (one call per layer, bf16) against an fp64
  oracle and the per-segment loop, outputs and gradients, shared prompts included;
* the score loop queues a row with no host-device synchronisation (so the GPU never waits
  for the host), and its pipelined results equal a plain per-row pass bit for bit;
* the step-0 invariant in bf16 on the GPU, under ZeRO-3 and ZeRO-0: every step-0 reward
  exactly 0 and the loss fp32 ln 2, with a model whose linears have biases;
* activation offloading: the saved activations leave the GPU, the gradients do not change.
"""

import math

import pytest
import torch

from helpers import reference_varlen, shared_and_unshared_rows, tiny_config
from pipeline.core.config import ModelConfig, to_dict
from pipeline.demo import make_pairs, write_jsonl
from pipeline.core.logps import packed_token_logps
from pipeline.core.segments import segment_layout
from pipeline.core.modeling import load_causal_lm, row_inputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_segment_sdpa_on_cuda_equals_separate_forwards(assets, dtype):
    model = load_causal_lm(str(assets["model"]), ModelConfig(path="x", dtype=dtype), CUDA).eval()
    g = torch.Generator().manual_seed(1)
    lens, prompts = [23, 17, 31, 9, 40, 12], [5, 5, 11, 3, 20, 4]
    segs = [torch.randint(3, 500, (n,), generator=g) for n in lens]
    row = {"input_ids": torch.cat(segs).numpy(), "position_ids": torch.cat([torch.arange(n) for n in lens]).numpy(),
           "seq_lens": lens, "prompt_lens": prompts}
    ids, pos, dev_layout = row_inputs(row, CUDA)
    with torch.inference_mode():
        packed = packed_token_logps(model, ids, pos, dev_layout, chunk=16).logps.cpu()
        offset = 0
        for seg, (length, p) in zip(segs, zip(lens, prompts)):
            alone = segment_layout(torch.tensor([length]), torch.tensor([p]))
            one, one_pos, one_layout = row_inputs({"input_ids": seg.numpy(), "position_ids": list(range(length)),
                                                   "seq_lens": [length], "prompt_lens": [p]}, CUDA)
            ref = packed_token_logps(model, one, one_pos, one_layout, chunk=16).logps.cpu()
            # equal up to the GEMM shapes (the whole row vs one segment) and kernel tiling; in
            # bf16 that is rounding noise, far below what attending across segments changes
            got = packed[offset:offset + length]
            diff = (got - ref).abs()[alone.targets]
            if dtype == "float32":
                assert diff.max() < 1e-4, diff.max()
            else:
                assert diff.max() < 0.1 and diff.mean() < 0.02, (diff.max(), diff.mean())
            assert torch.all(got[:p] == 0) and bool((got[alone.targets] < 0).all())
            offset += length


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_shared_prompt_rows_on_cuda_equal_unshared(assets, dtype):
    g = torch.Generator().manual_seed(3)
    results = []
    for row in shared_and_unshared_rows(g, [(7, 12, 5), (1, 3, 9), (64, 40, 33), (20, 4, 4)]):
        model = load_causal_lm(str(assets["model"]), ModelConfig(path="x", dtype=dtype), CUDA)
        dev_ids, dev_pos, dev_layout = row_inputs(row, CUDA)
        logps = packed_token_logps(model, dev_ids, dev_pos, dev_layout, chunk=16).logps
        picked = logps[dev_layout.targets]
        (picked * torch.linspace(0.5, 1.5, picked.numel(), device=CUDA)).sum().backward()
        results.append((picked.detach().float().cpu(),
                        torch.cat([p.grad.float().flatten() for p in model.parameters()]).cpu()))
    (tok_u, grad_u), (tok_s, grad_s) = results
    if dtype == "float32":
        assert torch.allclose(tok_s, tok_u, atol=1e-4), (tok_s - tok_u).abs().max()
        assert torch.allclose(grad_s, grad_u, atol=1e-4, rtol=1e-3), (grad_s - grad_u).abs().max()
    else:  # rounding noise of different GEMM shapes; attending to the wrong keys moves these by ~1
        diff = (tok_s - tok_u).abs()
        assert diff.max() < 0.1 and diff.mean() < 0.02, (diff.max(), diff.mean())


def test_varlen_flash_attention_on_cuda_equals_the_exact_attention(monkeypatch):
    """The one-call path runs torch's flash kernel here (not the loop), and is as close to
    fp64 attention as the per-segment loop is: a wrong mask or key gather is off by ~1."""
    from pipeline.core import attention

    lens, prompts = [300, 120, 77, 200, 513, 64, 90, 33], [40, 0, 77 - 1, 0, 13, 0, 50, 0]
    layout = segment_layout(torch.tensor(lens), torch.tensor(prompts))
    g = torch.Generator(device=CUDA).manual_seed(7)
    T = sum(lens)
    q, k, v = (torch.randn(1, h, T, 64, generator=g, device=CUDA).bfloat16().requires_grad_() for h in (8, 2, 2))
    assert attention.varlen_usable(q), f"torch {torch.__version__}: no usable varlen flash attention"
    w = torch.randn(1, T, 8, 64, generator=g, device=CUDA)

    def run(fn, *inputs):
        out = fn(*inputs)
        return (out.float(), *torch.autograd.grad((out.float() * w).sum(), inputs))

    exact = run(lambda *x: attention.varlen_forward(*x, attention.varlen_plan(layout.blocks, CUDA), None,
                                                    kernel=reference_varlen),
                *(x.detach().double().requires_grad_() for x in (q, k, v)))
    flash = run(lambda *x: attention.segment_sdpa_forward(
        None, *x, None, position_ids=torch.zeros(1, T), segment_blocks=layout.blocks,
        segment_varlen=attention.varlen_plan(layout.blocks, CUDA))[0], q, k, v)
    monkeypatch.setattr(attention, "use_varlen", False)
    loop = run(lambda *x: attention.segment_sdpa_forward(
        None, *x, None, position_ids=torch.zeros(1, T), segment_blocks=layout.blocks)[0], q, k, v)
    for name, e, f, lp in zip(("out", "dq", "dk", "dv"), exact, flash, loop):
        err_flash, err_loop = (f - e.float()).abs(), (lp - e.float()).abs()
        assert err_flash.max() <= 2 * err_loop.max() + 1e-3, (name, err_flash.max(), err_loop.max())
        assert err_flash.mean() <= 2 * err_loop.mean() + 1e-4, (name, err_flash.mean(), err_loop.mean())


def test_varlen_model_rows_equal_the_per_segment_loop_on_cuda(assets, monkeypatch):
    """A bf16 model over packed rows (shared prompts, the default, and unshared): the
    one-call path gives the loop's log-probs and gradients up to bf16 rounding."""
    from pipeline.core import attention

    g = torch.Generator().manual_seed(4)
    for row in shared_and_unshared_rows(g, [(7, 12, 5), (1, 3, 9), (64, 40, 33), (20, 4, 4)]):
        results = []
        for varlen in (True, False):
            monkeypatch.setattr(attention, "use_varlen", varlen)
            model = load_causal_lm(str(assets["model"]), ModelConfig(path="x", dtype="bfloat16"), CUDA)
            ids, pos, layout = row_inputs(row, CUDA)
            picked = packed_token_logps(model, ids, pos, layout, chunk=16).logps[layout.targets]
            (picked * torch.linspace(0.5, 1.5, picked.numel(), device=CUDA)).sum().backward()
            results.append((picked.detach().cpu(), torch.cat([p.grad.float().flatten() for p in model.parameters()])))
        (tok_v, grad_v), (tok_l, grad_l) = results
        diff = (tok_v - tok_l).abs()
        assert diff.max() < 0.1 and diff.mean() < 0.02, (diff.max(), diff.mean())
        rel = (grad_v - grad_l).norm() / grad_l.norm()
        assert rel < 0.05, rel


def test_score_loop_never_waits_for_the_gpu_and_matches_per_row(assets, tmp_path):
    import pyarrow.parquet as pq

    from pipeline import runner
    from pipeline.core.rundir import read_manifest
    from stages.score import ShardScorer, iter_rows

    cfg = tiny_config(assets, tmp_path / "run", tokenize={"max_tokens_per_row": 512, "rows_per_shard": 16})
    cfg.model.dtype = "bfloat16"
    runner.run_pipeline(cfg, stages=["tokenize"], use_ray=False, log=lambda _: None)
    tok_dir = runner.plan_stages(cfg)["tokenize"].dir
    name = [s["name"] for s in read_manifest(tok_dir)["shards"] if s["name"].startswith("train")][0]
    table = pq.read_table(str(tok_dir / name))
    scorer = ShardScorer(to_dict(cfg))
    assert scorer.device.type == "cuda" and next(scorer.model.parameters()).is_cuda
    rows = list(iter_rows(table))
    scorer.collect(scorer.launch(rows[0]))  # warm-up: cuBLAS handles, kernel selection
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host-device synchronisation raises
    try:
        in_flight = [scorer.launch(row) for row in rows[1:4]]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for f in in_flight:
        scorer.collect(f)
    scored = scorer.score_table(table).to_pylist()
    with torch.inference_mode():
        for row, out in zip(rows, scored):
            ids, pos, layout = row_inputs(row, CUDA)
            expected = packed_token_logps(scorer.model, ids, pos, layout, cfg.model.logp_chunk_tokens).logps
            assert torch.equal(torch.tensor(out["ref_logps"], dtype=torch.float32), expected.cpu())


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [3, 0])
def test_step0_is_ln2_in_bf16_on_the_gpu(assets, tmp_path, zero_stage):
    from helpers import biased_qwen2, run_and_read_metrics

    data = tmp_path / "pairs.jsonl"
    write_jsonl(make_pairs(300, seed=5), data)
    cfg = tiny_config(assets, tmp_path / "run", data_file=data, tokenize={"max_tokens_per_row": 256},
                      train={"max_steps": 2, "eval_steps": 100, "zero_stage": zero_stage, "use_gpu": True,
                             "num_workers": 1})
    cfg.model.path = str(biased_qwen2(assets, tmp_path))
    cfg.model.dtype = "bfloat16"
    records = run_and_read_metrics(cfg, tmp_path)
    ln2 = float(torch.tensor(math.log(2), dtype=torch.float32))
    step0, step1 = records[0], [r for r in records if "loss" in r][0]
    assert step0["eval_rewards/chosen"] == 0.0 and step0["eval_rewards/rejected"] == 0.0
    assert step0["eval_loss"] == ln2 and step1["loss"] == ln2 and step1["rewards/margins"] == 0.0
    assert all(math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in records if "loss" in r)


def test_activation_offloading_on_cuda_keeps_gradients_and_frees_memory(assets):
    """The tiny model's forward over a 4k-token row under offloading: the activations saved
    for backward live on the host (a lower peak of GPU memory after the forward), the
    parameters are not copied, and the gradients are bit for bit those without it."""
    from pipeline.training.offload import moves, offload_activations

    model = load_causal_lm(str(assets["model"]), ModelConfig(path="x", dtype="float32"), CUDA)
    g = torch.Generator().manual_seed(3)
    lens = [1024] * 4
    row = {"input_ids": torch.randint(3, 500, (sum(lens),), generator=g).numpy(),
           "position_ids": torch.cat([torch.arange(n) for n in lens]).numpy(), "seq_lens": lens,
           "prompt_lens": [100] * 4}
    ids, pos, layout = row_inputs(row, CUDA)

    def run(enabled):
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        with offload_activations(enabled):
            loss = packed_token_logps(model, ids, pos, layout, chunk=1024).logps.sum()
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated() - base  # what the forward left for backward
        loss.backward()
        return held, [p.grad.clone() for p in model.parameters()]

    held_off, grads_off = run(False)
    held_on, grads_on = run(True)
    assert all(torch.equal(a, b) for a, b in zip(grads_off, grads_on))
    assert held_on < 0.5 * held_off, (held_on, held_off)
    assert not any(moves(p) for p in model.parameters())


@pytest.mark.skipif(__import__("importlib").util.find_spec("vllm") is None, reason="needs vLLM")
def test_vllm_and_hf_answer_the_same_greedy_tokens(assets):
    """generate's vLLM engine against its HF engine on the demo model, greedy, fp32: the same
    completions, cut at the same stop token (stages/generate/engines.py)."""
    from types import SimpleNamespace

    from stages.generate.engines import HFEngine, VLLMEngine

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets["model"])
    stop = [tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id]
    prompts = [tok(tok.apply_chat_template([{"role": "user", "content": f"Describe the {item}."}], tokenize=False,
                                           add_generation_prompt=True), add_special_tokens=False)["input_ids"]
               for item in ("lamp", "river", "violin")]
    g = SimpleNamespace(num_samples=1, temperature=0.0, top_p=1.0, max_new_tokens=24, tensor_parallel_size=1, seed=0)
    mcfg = ModelConfig(path=str(assets["model"]), dtype="float32")
    hf = HFEngine(str(assets["model"]), mcfg, CUDA, tok.pad_token_id or tok.eos_token_id, stop).generate(prompts, g, 0)
    vllm = VLLMEngine(str(assets["model"]), mcfg, g, stop).generate(prompts, g, 0)
    assert vllm == hf
