"""Token ids of standard and conversational pairs equal TRL 1.16's DPO tokenisation
(``DPOTrainer._prepare_dataset``, pinned, test-only) for the same tokenizer and template.

One documented difference: we end each completion at its end-of-turn token; TRL keeps what
the template renders after it (ChatML's trailing newline), so there TRL has one more token."""

import pytest

from pipeline.core.formats import normalize, tokenize_pair
from test_data_formats import conversational_rows, standard_rows

pytest.importorskip("trl")


@pytest.fixture(scope="module")
def trl_prepare(assets, tmp_path_factory):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(assets["model"])
    args = DPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), report_to=[], use_cpu=True,
                     precompute_ref_log_probs=False, dataset_num_proc=None)
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(assets["model"]), args=args,
                         train_dataset=Dataset.from_list(standard_rows(2)), processing_class=tok)

    def prepare(rows):
        return trainer._prepare_dataset(Dataset.from_list(rows), tok, args, "parity").to_list()

    return prepare, tok


def ours(rows, tok):
    out = []
    for row in rows:
        (pair,) = normalize(row, "prompt", "chosen", "rejected")
        tp = tokenize_pair(pair, tok, max_length=4096)
        out.append((tp.chosen.input_ids[: tp.chosen.prompt_len], tp.chosen.input_ids[tp.chosen.prompt_len:],
                    tp.rejected.input_ids[tp.rejected.prompt_len:]))
    return out


def test_standard_pairs_equal_trl(trl_prepare):
    prepare, tok = trl_prepare
    rows = standard_rows(25)
    for theirs, (prompt, chosen, rejected) in zip(prepare(rows), ours(rows, tok)):
        assert prompt == theirs["prompt_ids"]
        assert chosen == theirs["chosen_ids"] and rejected == theirs["rejected_ids"]
        assert chosen[-1] == tok.eos_token_id


def test_conversational_pairs_equal_trl_up_to_the_end_of_turn(trl_prepare):
    prepare, tok = trl_prepare
    rows = conversational_rows(25)
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    for theirs, (prompt, chosen, rejected) in zip(prepare(rows), ours(rows, tok)):
        assert prompt == theirs["prompt_ids"]
        assert chosen + newline == theirs["chosen_ids"]  # TRL keeps ChatML's "\n" after <|im_end|>
        assert rejected + newline == theirs["rejected_ids"]
        assert chosen[-1] == tok.eos_token_id and chosen.count(tok.eos_token_id) == 1
