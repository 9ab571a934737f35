"""The prompt format is an object (gpt4llm.data.formats): nothing outside the formats package compares a template's
name, the export's training record is read and written in one module (gpt4llm.models.model_card), and the shipped
templates are files that render what the formats promise."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from gpt4llm.data.formats import FORMATS, PAPER, prompt_format
from gpt4llm.data.formats.base import TEMPLATE_FILES
from gpt4llm.data.formats.chat import SHIPPED
from gpt4llm.data.prompts import format_prompt
from gpt4llm.errors import ConfigError
from gpt4llm.models import model_card

SRC = Path(__file__).resolve().parents[1] / "src" / "gpt4llm"
FORMATS_PACKAGE = SRC / "data" / "formats"


def _python_files(outside: Path | None = None):
    for path in sorted(SRC.rglob("*.py")):
        if outside is None or outside not in path.parents:
            yield path


def _name_comparisons(path: Path) -> list[str]:
    """`x == "alpaca"`, `"chatml" in (...)`, ...: a comparison with a format's name as a string constant."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Compare):
            continue
        for side in [node.left, *node.comparators]:
            items = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
            for item in items:
                if isinstance(item, ast.Constant) and item.value in FORMATS:
                    found.append(f"{path.relative_to(SRC)}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_template_name_is_compared_outside_the_formats_package():
    found = [hit for path in _python_files(outside=FORMATS_PACKAGE) for hit in _name_comparisons(path)]
    assert not found, "ask the PromptFormat instead of comparing its name:\n" + "\n".join(found)


def test_the_checker_finds_a_comparison(tmp_path):
    probe = SRC / "data" / "_probe_for_test.py"  # inside the tree it walks, removed at once
    probe.write_text('def f(t):\n    return t == "alpaca" or t in ("chatml", "x")\n')
    try:
        assert len(_name_comparisons(probe)) == 2
    finally:
        probe.unlink()


def _reads_config_key(node, keys: set[str]) -> bool:
    """`<...>.config.reward_mean`, `getattr(config, "gpt4llm_template", ...)`, `config.to_dict()["reward_mean"]` or
    `.get("reward_mean")`: a record key read or set directly (a string equal to a key used otherwise, as online RL's
    metric `reward_std`, is not a read)."""

    def named(value) -> bool:
        return isinstance(value, ast.Constant) and value.value in keys

    if isinstance(node, ast.Call):
        func = node.func
        by_name = isinstance(func, ast.Name) and func.id in ("getattr", "setattr", "hasattr", "delattr")
        by_method = isinstance(func, ast.Attribute) and func.attr in ("get", "pop", "setdefault", "__getitem__")
        return (by_name or by_method) and any(named(a) for a in node.args)
    if isinstance(node, ast.Subscript):
        return named(node.slice)
    if isinstance(node, ast.Attribute) and node.attr in keys:
        owner = node.value
        return (isinstance(owner, ast.Attribute) and owner.attr == "config") or (
            isinstance(owner, ast.Name) and owner.id == "config"
        )
    return False


def test_the_training_record_is_read_and_written_in_the_model_card_module_alone():
    keys = set(model_card.KEYS.values())
    found = []
    for path in _python_files():
        if path == SRC / "models" / "model_card.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if _reads_config_key(node, keys):
                found.append(f"{path.relative_to(SRC)}:{node.lineno}: {ast.unparse(node)}")
    assert not found, "read and write the export's record through gpt4llm.models.model_card:\n" + "\n".join(found)


def test_the_record_round_trips_through_a_saved_config(tmp_path):
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8)
    assert model_card.read(config) == model_card.TrainingRecord()
    assert model_card.prompt_format_of(config).format.name == PAPER  # not trained here, no tokenizer: the paper's
    model_card.write(config, prompt_format="chatml", reward_mean=0.5, adapter={"r": 8})
    config.save_pretrained(tmp_path)
    loaded = model_card.read(LlamaConfig.from_pretrained(tmp_path))
    assert (loaded.prompt_format, loaded.reward_mean, loaded.adapter) == ("chatml", 0.5, {"r": 8})
    served = model_card.prompt_format_of(LlamaConfig.from_pretrained(tmp_path)).format
    assert served.name == "chatml" and not served.add_special_tokens
    with pytest.raises(TypeError, match="not a field"):
        model_card.write(config, template="alpaca")


def test_every_format_is_chosen_by_name_and_an_unknown_one_lists_the_choices():
    assert [prompt_format(name).name for name in FORMATS] == list(FORMATS)
    with pytest.raises(ConfigError, match="data.template='bogus': choose one of auto, alpaca, chat, chatml"):
        prompt_format("bogus")
    with pytest.raises(ConfigError, match="data.train_on='first'"):
        prompt_format("chatml", "first")


def test_the_shipped_templates_are_files_and_render_the_formats_prompts(tokenizer):
    assert sorted(p.stem for p in TEMPLATE_FILES.glob("*.jinja")) == sorted([PAPER, *SHIPPED])
    user = [{"role": "user", "content": "Sort 3, 1, 2."}]
    paper = prompt_format(PAPER)
    rendered = tokenizer.apply_chat_template(user, chat_template=paper.export_chat_template(), tokenize=False)
    assert rendered == tokenizer.bos_token + format_prompt("Sort 3, 1, 2.")
    assert paper.chat_prompt(tokenizer, user) == format_prompt("Sort 3, 1, 2.")
    for name in SHIPPED:
        fmt = prompt_format(name)
        chat_tokenizer = type(tokenizer).from_pretrained(tokenizer.name_or_path)
        fmt.prepare_tokenizer(chat_tokenizer)
        assert chat_tokenizer.chat_template == (TEMPLATE_FILES / f"{name}.jinja").read_text().removesuffix("\n")
        prompt = fmt.chat_prompt(chat_tokenizer, user)
        assert prompt == chat_tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        assert fmt.record_prompts(chat_tokenizer, [{"instruction": "Sort 3, 1, 2.", "input": ""}]) == [prompt]
