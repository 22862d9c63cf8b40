"""Real tokenizers: Mistral's SentencePiece models as mistral-common ships them (v1: Mistral
7B Instruct v0.1/v0.2; v3: v0.3 and Mixtral 8x22B), loaded as HF tokenizers with the
``[INST]`` chat format of configs/chat_templates/, through the tokenize stage's own
``load_tokenizer`` and ``formats.tokenize_pair``. Every expectation is mistral-common's own
``encode_chat_completion`` of the same conversation."""

import json
import shutil
from pathlib import Path

import mistral_common  # a test dependency (".[test]")
import pytest
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from pipeline.core import formats
from pipeline.core.config import config_from_dict
from pipeline.core.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
DATA = Path(mistral_common.__file__).parent / "data"
VERSIONS = {"v1": "tokenizer.model.v1", "v3": "mistral_instruct_tokenizer_240323.model.v3"}
MESSAGE = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}

CONVERSATIONS = [
    # (prompt, chosen, rejected)
    ([("user", "Hello there")], "Hi! How can I help?", "Go away."),
    ([("user", "Hello there"), ("assistant", "Hi! How can I help?"), ("user", "Tell me a joke")],
     "Why did the chicken cross the road?", "No."),
    ([("system", "Be brief."), ("user", "What is 2+2?"), ("assistant", "4"), ("user", "And 3+3?")], "6", "Six, I think."),
    ([("user", "Übersetze: «naïve café»\nbitte")], "naive Cafe", "naïve café"),
    ([("user", "1234 apples")], "12 of them are red", "    indented answer"),
]


@pytest.fixture(scope="module", params=sorted(VERSIONS))
def mistral(request, tmp_path_factory):
    """(version, the HF tokenizer as the pipeline loads it, mistral-common's tokenizer)."""
    version = request.param
    out = tmp_path_factory.mktemp(f"mistral-{version}")
    shutil.copy(DATA / VERSIONS[version], out / "tokenizer.model")
    # add_bos_token: the tokenizer adds BOS by itself as well, as Mistral's own repos ship it
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "legacy": False, "add_bos_token": True, "add_eos_token": False}))
    cfg = config_from_dict({"model": {"path": str(out)}, "data": {"train_files": ["unused.jsonl"]},
                            "tokenize": {"chat_template": str(REPO / "configs" / "chat_templates" /
                                                              f"mistral-{version}.jinja")}})
    return version, load_tokenizer(cfg), MistralTokenizer.from_file(str(DATA / VERSIONS[version]))


def messages(turns):
    return [{"role": role, "content": content} for role, content in turns]


def reference_ids(mt, turns, answer: str | None = None) -> list[int]:
    """mistral-common's ids of a prompt, or of prompt + answer: the answer as a final message
    to continue (``prefix=True``: no end-of-turn), then the end-of-turn that closes it."""
    final = [AssistantMessage(content=answer, prefix=True)] if answer is not None else []
    request = ChatCompletionRequest(messages=[MESSAGE[role](content=content) for role, content in turns] + final)
    ids = mt.encode_chat_completion(request).tokens
    return ids + [mt.instruct_tokenizer.tokenizer.eos_id] if answer is not None else ids


def tokenized(hf, prompt, chosen, rejected) -> formats.TokenizedPair:
    (pair,) = formats.normalize({"prompt": messages(prompt), "chosen": messages([("assistant", chosen)]),
                                 "rejected": messages([("assistant", rejected)])}, "prompt", "chosen", "rejected")
    return formats.tokenize_pair(pair, hf, max_length=512, strict=True)


@pytest.mark.parametrize("case", range(len(CONVERSATIONS)))
def test_prompt_and_completion_ids_are_mistral_commons(mistral, case):
    _, hf, mt = mistral
    prompt, chosen, rejected = CONVERSATIONS[case]
    tp = tokenized(hf, prompt, chosen, rejected)
    assert tp.chosen.input_ids[:tp.chosen.prompt_len] == reference_ids(mt, prompt)
    # prompt + answer: the prefix space at the boundary and the one EOS included
    for seg, answer in ((tp.chosen, chosen), (tp.rejected, rejected)):
        assert seg.input_ids == reference_ids(mt, prompt, answer)


def test_the_answer_starts_with_sentencepieces_prefix_space(mistral):
    _, hf, mt = mistral
    tp = tokenized(hf, [("user", "Hello there")], "Hi! How can I help?", "Go away.")
    first = tp.chosen.input_ids[tp.chosen.prompt_len]
    # mistral-common encodes an answer on its own, so SentencePiece gives it a prefix space
    assert first == mt.instruct_tokenizer.tokenizer.encode("Hi! How can I help?", bos=False, eos=False)[0]
    assert hf.convert_ids_to_tokens(first) == "▁Hi"
    # and the prompt does not end in a dangling space token
    assert hf.convert_ids_to_tokens(tp.chosen.input_ids[tp.chosen.prompt_len - 1]) != "▁"


def test_no_double_bos(mistral):
    _, hf, mt = mistral
    bos = mt.instruct_tokenizer.tokenizer.bos_id
    assert hf.bos_token_id == bos and hf("x")["input_ids"][0] == bos  # the tokenizer adds one itself
    assert hf.apply_chat_template(messages([("user", "x")]), tokenize=False).startswith("<s>")  # and so does the template
    for prompt, chosen, rejected in CONVERSATIONS:
        tp = tokenized(hf, prompt, chosen, rejected)
        for seg in (tp.chosen, tp.rejected):
            assert seg.input_ids[0] == bos and seg.input_ids.count(bos) == 1


def test_one_end_of_turn_per_completion(mistral):
    _, hf, mt = mistral
    eos = mt.instruct_tokenizer.tokenizer.eos_id
    assert hf.eos_token_id == eos
    for prompt, chosen, rejected in CONVERSATIONS:
        tp = tokenized(hf, prompt, chosen, rejected)
        for seg in (tp.chosen, tp.rejected):
            completion = seg.input_ids[seg.prompt_len:]
            assert completion[-1] == eos and completion.count(eos) == 1
            # the earlier turns' EOS stay in the prompt, one per assistant turn
            assert seg.input_ids[:seg.prompt_len].count(eos) == sum(role == "assistant" for role, _ in prompt)
