import pytest

from pipeline.core.formats import BadRow, normalize, pair_id, tokenize_pair

KEYS = ("prompt", "chosen", "rejected")


def conv(prompt, chosen, rejected):
    return {"prompt": [{"role": "user", "content": prompt}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


def test_conversational_pair_uses_the_chat_template_and_one_eos(tokenizer):
    row = conv("Describe the lamp.", "The lamp is great and clean.", "The lamp is dull.")
    tp = tokenize_pair(*normalize(row, *KEYS), tokenizer, max_length=64)
    prompt_ids = tokenizer(tokenizer.apply_chat_template(row["prompt"], tokenize=False,
                                                          add_generation_prompt=True),
                           add_special_tokens=False)["input_ids"]
    for seg, text in ((tp.chosen, row["chosen"][0]["content"]), (tp.rejected, row["rejected"][0]["content"])):
        assert seg.input_ids[: seg.prompt_len] == prompt_ids
        completion = seg.input_ids[seg.prompt_len:]
        assert completion[-1] == tokenizer.eos_token_id
        assert completion.count(tokenizer.eos_token_id) == 1
        assert tokenizer.decode(completion[:-1]) == text
    assert not tp.truncated and not tp.prefix_mismatch


def test_standard_text_pair_appends_eos(tokenizer):
    tp = tokenize_pair(*normalize({"prompt": "Q: lamp?", "chosen": " great", "rejected": " dull"}, *KEYS),
                       tokenizer, max_length=64)
    assert tp.chosen.input_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(tp.chosen.input_ids[: tp.chosen.prompt_len]) == "Q: lamp?"
    assert tokenizer.decode(tp.chosen.input_ids[tp.chosen.prompt_len:-1]) == " great"


def test_truncation_keeps_the_prompt_end_and_the_completion_start(tokenizer):
    row = conv("Describe the lamp. " * 10, "The lamp is great. " * 20, "The lamp is dull. " * 20)
    full = tokenize_pair(*normalize(row, *KEYS), tokenizer, max_length=10_000)
    tp = tokenize_pair(*normalize(row, *KEYS), tokenizer, max_length=60, max_prompt_length=20)
    assert tp.truncated
    for seg, whole in ((tp.chosen, full.chosen), (tp.rejected, full.rejected)):
        assert seg.prompt_len == 20 and len(seg.input_ids) == 60
        assert seg.input_ids[:20] == whole.input_ids[whole.prompt_len - 20: whole.prompt_len]
        assert seg.input_ids[20:] == whole.input_ids[whole.prompt_len: whole.prompt_len + 40]


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"prompt": "p", "chosen": "a"}, "missing_field"),
        ({"prompt": "p", "chosen": 3, "rejected": "b"}, "bad_type"),
        ({"prompt": "p", "chosen": "  ", "rejected": "b"}, "empty_completion"),
        ({"prompt": "p", "chosen": "same", "rejected": "same"}, "chosen_equals_rejected"),
        ({"prompt": [{"role": "user"}], "chosen": [{"role": "assistant", "content": "a"}],
          "rejected": [{"role": "assistant", "content": "b"}]}, "malformed_messages"),
        ({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "user", "content": "a"}],
          "rejected": [{"role": "assistant", "content": "b"}]}, "malformed_messages"),
    ],
)
def test_bad_rows_get_a_reason(row, reason):
    with pytest.raises(BadRow) as e:
        normalize(row, *KEYS)
    assert e.value.reason == reason


def test_prompt_too_long_is_a_bad_row(tokenizer):
    row = conv("word " * 100, "a", "b")
    with pytest.raises(BadRow) as e:
        tokenize_pair(*normalize(row, *KEYS), tokenizer, max_length=32)
    assert e.value.reason == "prompt_too_long"


def test_pair_id_depends_on_tokens_and_source_row(tokenizer):
    tp = tokenize_pair(*normalize(conv("q", "a", "b"), *KEYS), tokenizer, max_length=64)
    assert pair_id(tp, "f.jsonl", 1) == pair_id(tp, "f.jsonl", 1)
    assert pair_id(tp, "f.jsonl", 1) != pair_id(tp, "f.jsonl", 2)  # a kept duplicate stays distinct


def test_max_completion_length_keeps_the_completion_start(tokenizer):
    row = conv("Describe the lamp.", "The lamp is great. " * 20, "The lamp is dull. " * 20)
    full = tokenize_pair(*normalize(row, *KEYS), tokenizer, max_length=10_000)
    tp = tokenize_pair(*normalize(row, *KEYS), tokenizer, max_length=10_000, max_completion_length=7)
    assert tp.truncated
    for seg, whole in ((tp.chosen, full.chosen), (tp.rejected, full.rejected)):
        assert seg.input_ids[: seg.prompt_len] == whole.input_ids[: whole.prompt_len]
        assert seg.input_ids[seg.prompt_len:] == whole.input_ids[whole.prompt_len: whole.prompt_len + 7]


def test_the_pairs_of_one_row_share_a_split_key_whatever_their_tokens():
    """Prompt "Answer:" with rejected ["4", " four"], under a tokenizer that merges ":4":
    the first pair's prompt is cut before ":" (prefix mismatch), the second keeps it, so
    keys of the prompt tokens differed and the row's pairs could land on both sides of the
    split. The key is the row's prompt itself."""
    from tokenizers import Tokenizer, models, trainers
    from transformers import PreTrainedTokenizerFast

    from pipeline.core.formats import prompt_key

    corpus = ["Question. Answer: four"] * 5 + [":4"] * 200 + ["Question. Answer:"] * 3
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.train_from_iterator(corpus, trainer=trainers.BpeTrainer(
        vocab_size=len(set("".join(corpus))) + 3, special_tokens=["<unk>", "</s>"], show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>", unk_token="<unk>")
    assert tokenizer.tokenize("Answer:4")[-1] == ":4"  # the merge
    row = {"prompt": "Question. Answer:", "chosen": " 4.", "rejected": ["4", " four"]}
    pairs = normalize(row, "prompt", "chosen", "rejected")
    tokenized = [tokenize_pair(p, tokenizer, max_length=64) for p in pairs]
    prompts = [tuple(tp.chosen.input_ids[:tp.chosen.prompt_len]) for tp in tokenized]
    assert [tp.prefix_mismatch for tp in tokenized] == [True, False] and prompts[0] != prompts[1]
    assert prompt_key(pairs[0]) == prompt_key(pairs[1])
    other = normalize({"prompt": "Question. Answer: ", "chosen": "a", "rejected": "b"}, "prompt", "chosen", "rejected")
    assert prompt_key(other[0]) != prompt_key(pairs[0])
