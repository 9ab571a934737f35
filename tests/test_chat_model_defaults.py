"""What a LLaMA-Factory or TRL user meets with a chat model: `model=hf model.path=<instruct model>` trains on the
model's own chat template by default (TRL's choice), says so at start, and the export keeps that template; a base
model keeps the paper's Alpaca prompt."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from helpers.configs import compose_train, demo_overrides

OWN_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tiny_instruct_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model as an instruct model: its tokenizer carries a chat template of its own."""
    from gpt4llm.data.tokenizer import load_tokenizer

    out = tmp_path_factory.mktemp("models") / "tiny-instruct"
    shutil.copytree(tiny_model_dir, out)
    (out / "tiny_spec.json").unlink()  # a model of the user's, not one gpt4llm builds
    tokenizer = load_tokenizer(str(out))
    tokenizer.chat_template = OWN_TEMPLATE
    tokenizer.save_pretrained(out)
    return out


def _sharegpt(path, n=60):
    records = [
        {"conversations": [{"from": "human", "value": f"Say {i}."}, {"from": "gpt", "value": f"{i}"}]} for i in range(n)
    ]
    path.write_text(json.dumps(records))
    return path


def test_a_chat_model_trains_on_its_own_template_and_says_so(tiny_instruct_dir, tmp_path, caplog):
    from gpt4llm.train import train

    data = _sharegpt(tmp_path / "chats.json")
    overrides = demo_overrides(
        tmp_path, "model=hf", f"model.path={tiny_instruct_dir}", "data=local", f"data.path={data}", "data.val_size=8"
    )
    cfg = compose_train([o for o in overrides if not o.startswith(("model.tiny.", "data.demo."))])
    cfg.paths.output_dir = str(tmp_path / "run")
    with caplog.at_level(logging.INFO):
        train(cfg)
    assert "Prompt format: chat: the model's own chat template" in caplog.text
    export = tmp_path / "run" / "export"
    assert json.loads((export / "tokenizer_config.json").read_text()).get("chat_template", OWN_TEMPLATE) == OWN_TEMPLATE
    chat_template_file = export / "chat_template.jinja"  # where transformers 5 keeps it
    if chat_template_file.exists():
        assert chat_template_file.read_text() == OWN_TEMPLATE
    assert json.loads((export / "config.json").read_text())["gpt4llm_template"] == "chat"


def test_a_base_model_keeps_the_papers_prompt(tmp_path, caplog):
    from gpt4llm.train import train

    cfg = compose_train(demo_overrides(tmp_path, "trainer.max_steps=1", "data.exact_match_examples=0"))
    cfg.paths.output_dir = str(tmp_path / "run")
    with caplog.at_level(logging.INFO):
        train(cfg)
    assert "Prompt format: alpaca: the paper's prompt" in caplog.text
    assert cfg.data.template == "alpaca"


def test_held_out_data_scales_with_the_data_and_a_costly_validation_is_said(tiny_instruct_dir, tmp_path, caplog):
    """data.val_size=200 by default once left 7 of 207 conversations to train on, and a 10-step run spent 20 of its 23
    minutes validating, without a word: auto holds out 5%, and validation's cost is warned of and reported."""
    from gpt4llm.data.base_datamodule import held_out
    from gpt4llm.train import train

    assert [held_out("auto", n) for n in (207, 4000, 100_000, 10, 1)] == [10, 200, 200, 1, 0]
    data = _sharegpt(tmp_path / "chats.json", n=207)
    overrides = demo_overrides(
        tmp_path, "model=hf", f"model.path={tiny_instruct_dir}", "data=local", f"data.path={data}"
    )
    overrides = [o for o in overrides if not o.startswith(("model.tiny.", "data.demo.", "data.val_size"))]
    cfg = compose_train([*overrides, "data.eval_batch_size=1", "data.batch_size=1", "trainer.max_steps=3"])
    cfg.paths.output_dir = str(tmp_path / "run")
    with caplog.at_level(logging.INFO):
        train(cfg)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())  # trained
    assert "Validation will take about" in caplog.text  # 2 x 10 batches of one against 3 of one
