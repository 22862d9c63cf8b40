"""The SFT objective (stages/sft/objective.py): the NLL of completion tokens, prompt masked,
and TRL's token accuracy, on packed rows. Worked numbers first, then a tiny model's packed
row against its own forward on each sequence alone."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.core.logps import lm_head_target_logps
from pipeline.core.rows import RowReader
from stages.sft.objective import SFTObjective


def test_token_accuracy_worked_out():
    # logits = h W^T: h0 = (1, 0) -> (2, 0, 1), argmax 0; h1 = (0, 1) -> (0, 3, 1), argmax 1
    head = torch.nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]]))
    hidden = torch.eye(2)
    logps, _, correct = lm_head_target_logps(head, hidden, torch.tensor([0, 2]), chunk=1, correct=True)
    assert correct.tolist() == [True, False]
    # log softmax: row 0: 2 - log(e^2 + e^0 + e^1); row 1: 1 - log(e^0 + e^3 + e^1)
    want = [2 - torch.log(torch.tensor(2.0).exp() + 1 + torch.e), 1 - torch.log(1 + torch.tensor(3.0).exp() + torch.e)]
    assert logps.tolist() == pytest.approx([float(w) for w in want], abs=1e-6)
    _, _, none = lm_head_target_logps(head, hidden, torch.tensor([0, 2]), chunk=1)
    assert none is None  # not asked for: not computed


def packed_row(segments):
    """segments: [(prompt ids, completion ids)] -> a packed row as the tokenize stage writes it."""
    ids = [t for p, c in segments for t in p + c]
    return {"input_ids": ids, "position_ids": [i for p, c in segments for i in range(len(p) + len(c))],
            "seq_lens": [len(p) + len(c) for p, c in segments], "prompt_lens": [len(p) for p, _ in segments],
            "num_tokens": len(ids)}


def test_the_row_loss_is_each_sequence_alone_on_its_completion(assets):
    from transformers import AutoModelForCausalLM

    from pipeline.core.attention import register

    register()
    model = AutoModelForCausalLM.from_pretrained(assets["model"], attn_implementation="segment_sdpa")
    g = torch.Generator().manual_seed(0)
    segments = [(torch.randint(5, 200, (n,), generator=g).tolist(), torch.randint(5, 200, (m,), generator=g).tolist())
                for n, m in ((3, 4), (2, 5), (6, 1))]
    out = SFTObjective(logp_chunk_tokens=3)(model, packed_row(segments), "cpu")
    nll, hits, count = 0.0, 0, 0
    with torch.no_grad():
        for prompt, completion in segments:  # the model's own forward on the sequence alone
            ids = torch.tensor([prompt + completion])
            logits = model(ids).logits[0].double()
            for t in range(len(prompt), len(prompt) + len(completion)):
                nll -= float(torch.log_softmax(logits[t - 1], -1)[ids[0, t]])
                hits += int(logits[t - 1].argmax() == ids[0, t])
                count += 1
    assert out.units == count == 10 and out.tokens == 21
    assert float(out.loss_sum) == pytest.approx(nll, abs=1e-4)
    assert float(out.metric_sums["loss"]) == pytest.approx(nll, abs=1e-4)
    assert int(out.metric_sums["mean_token_accuracy"]) == hits
    assert out.loss_sum.requires_grad and out.aux_loss is None
    out.loss_sum.backward()
    assert model.get_output_embeddings().weight.grad.abs().sum() > 0


def test_a_rows_unit_count_is_its_completion_tokens(tmp_path):
    rows = [packed_row([([1, 2, 3], [4, 5, 6, 7]), ([1], [2, 3])]), packed_row([([9] * 5, [8])])]
    path = tmp_path / "train-00000.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    units = SFTObjective(1024).units_per_row(RowReader([str(path)]))
    # 4 + 2 completion tokens, and 1: a step of both rows divides its summed NLL by 7
    assert units.tolist() == [6, 1]
