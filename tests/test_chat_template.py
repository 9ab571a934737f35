"""The export's chat template renders the training prompt: `apply_chat_template` gives the very ids training used."""

from __future__ import annotations

import pytest

from gpt4llm.data.encoding import IGNORE_INDEX
from gpt4llm.data.formats.alpaca import AlpacaFormat

tokenize_batch = AlpacaFormat().tokenize_examples  # stanford_alpaca's preprocess()
chat_template = AlpacaFormat().export_chat_template  # what an Alpaca export carries

INSTRUCTIONS = [
    "Give three tips for staying healthy.",
    "Fix:\n    for i in x:\n\tprint(i)  ",
    "把这个词倒过来写：学习 🙂",
]


def ids(encoded):
    return encoded["input_ids"] if hasattr(encoded, "keys") else encoded


@pytest.mark.parametrize("model", ["tiny_model_dir", "sentencepiece_model_dir"])
def test_chat_template_gives_the_training_ids(model, request):
    from gpt4llm.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(request.getfixturevalue(model)))
    tokenizer.chat_template = chat_template()
    for instruction in INSTRUCTIONS:
        trained = tokenize_batch({"instruction": [instruction], "input": [""], "output": ["Done."]}, tokenizer, 512)
        prompt = [i for i, label in zip(trained["input_ids"][0], trained["labels"][0]) if label == IGNORE_INDEX]
        chat = [
            {"role": "system", "content": "ignored: the model never saw one"},
            {"role": "user", "content": instruction},
        ]
        assert ids(tokenizer.apply_chat_template(chat, add_generation_prompt=True)) == prompt
        finished = chat + [{"role": "assistant", "content": "Done."}]
        assert ids(tokenizer.apply_chat_template(finished)) == trained["input_ids"][0]  # answer and EOS too


def test_the_export_carries_the_template_for_transformers_own_loader(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gpt4llm.data.tokenizer import load_tokenizer
    from gpt4llm.models.export import export_hf
    from gpt4llm.models.hf import load_causal_lm

    tokenizer = load_tokenizer(str(tiny_model_dir))
    tokenizer.chat_template = "{{ 'a base model template the model was never trained on' }}"
    export_hf(load_causal_lm(str(tiny_model_dir), tokenizer), tokenizer, tmp_path / "export")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "export")
    assert loaded.chat_template == chat_template()
    trained = tokenize_batch({"instruction": [INSTRUCTIONS[0]], "input": [""], "output": ["x"]}, loaded, 512)
    prompt = [i for i, label in zip(trained["input_ids"][0], trained["labels"][0]) if label == IGNORE_INDEX]
    assert (
        ids(loaded.apply_chat_template([{"role": "user", "content": INSTRUCTIONS[0]}], add_generation_prompt=True))
        == prompt
    )
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "export") is not None
