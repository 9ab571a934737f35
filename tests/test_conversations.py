"""Conversations: every layout into one message layer, chat templates into ids and labels, checked against an
independent oracle (transformers' `return_assistant_tokens_mask` on templates with `{% generation %}` markers), and
the conversation through training, export and `serve` with the official `openai` client."""

from __future__ import annotations

import json

import pytest
import torch

from gpt4llm.data.conversations import TurnProblem, check_turns, read_conversation
from gpt4llm.data.encoding import IGNORE_INDEX
from gpt4llm.data.formats import prompt_format
from gpt4llm.data.formats.base import shipped_template
from gpt4llm.data.formats.chat import SHIPPED, tokenize_conversations
from gpt4llm.data.records import load_conversations
from gpt4llm.errors import ConfigError, RecordError
from helpers.configs import compose_train, demo_overrides


def apply_template(tokenizer, template, model="the model"):
    prompt_format(template).prepare_tokenizer(tokenizer, model)


SYSTEM = {"role": "system", "content": "You are terse."}
CONVERSATIONS = [
    [{"role": "user", "content": "Sort 3, 1, 2."}, {"role": "assistant", "content": "1, 2, 3"}],
    [
        SYSTEM,
        {"role": "user", "content": "把这句话翻译成英文：今天天气很好。"},
        {"role": "assistant", "content": "The weather is nice today."},
        {"role": "user", "content": "再短一点 🙂"},
        {"role": "assistant", "content": "Nice weather! 🌞"},
    ],
    [
        {"role": "user", "content": "Fix:\n    for i in x:\n\tprint(i)  "},
        {"role": "assistant", "content": "```python\nfor i in x:\n    print(i)\n```"},
        {"role": "user", "content": "And in one line?"},
        {"role": "assistant", "content": "  [print(i) for i in x]"},
    ],
    [
        SYSTEM,
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
        {"role": "user", "content": "e"},
        {"role": "assistant", "content": "f"},
    ],
]


def chat_tokenizer(tiny_model_dir, template: str):
    from gpt4llm.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    apply_template(tokenizer, template)
    return tokenizer


# --- the message layer -------------------------------------------------------------------------------------------
def test_every_layout_becomes_the_same_conversation():
    alpaca = {"instruction": "Say hi.", "input": "to Ann", "output": "Hi Ann!"}
    turns = [{"role": "user", "content": "Say hi.\n\nto Ann"}, {"role": "assistant", "content": "Hi Ann!"}]
    assert read_conversation(alpaca).messages == turns and read_conversation(alpaca).alpaca == ("Say hi.", "to Ann")
    factory = alpaca | {"system": "Be kind.", "history": [["Hello", "Hello!"]]}
    assert read_conversation(factory).messages == [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hello!"},
        *turns,
    ]
    sharegpt = {
        "conversations": [{"from": "human", "value": turns[0]["content"]}, {"from": "gpt", "value": "Hi Ann!"}],
        "id": 7,
    }
    assert read_conversation(sharegpt).messages == turns and read_conversation(sharegpt).unused == {"id"}
    assert read_conversation({"messages": turns}).messages == turns
    assert read_conversation({"conversations": turns}).messages == turns  # ShareGPT files with role/content


@pytest.mark.parametrize(
    "messages, problem",
    [
        ([{"role": "assistant", "content": "x"}], "turn 0: a assistant turn where a user turn belongs"),
        (
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}],
            "turn 1: the assistant turn is empty",
        ),
        ([{"role": "user", "content": "x"}, {"role": "wizard", "content": "y"}], "turn 1: unknown role 'wizard'"),
        ([{"role": "user", "content": "x"}, SYSTEM, {"role": "assistant", "content": "y"}], "turn 1: a system turn"),
        ([{"role": "user", "content": "x"}], "turn 0: the conversation ends without an assistant turn"),
    ],
)
def test_bad_turns_are_named(messages, problem):
    with pytest.raises(TurnProblem, match=problem):
        check_turns(messages)


def test_a_bad_record_names_file_record_and_turn_or_is_a_counted_skip(tmp_path):
    path = tmp_path / "chats.jsonl"
    good = {"messages": CONVERSATIONS[0]}
    bad = {"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]}
    path.write_text("".join(json.dumps(r) + "\n" for r in (good, bad, good)))
    with pytest.raises(
        RecordError, match=r"chats\.jsonl: record 1: turn 1: a user turn where a assistant turn belongs"
    ):
        load_conversations(path)
    records, report = load_conversations(path, skip_invalid=True)
    assert [r["index"] for r in records] == [0]
    assert {k: v["count"] for k, v in report.summary()["skipped"].items()} == {
        "turn 1: a user turn where a assistant turn belongs": 1,
        "duplicate record": 1,
    }


# --- labels against the independent oracle ------------------------------------------------------------------------
@pytest.mark.parametrize("template", ["chatml", "llama3", "vicuna_v1.1"])
def test_labels_are_exactly_the_assistant_tokens_transformers_marks(template, tiny_model_dir):
    tokenizer = chat_tokenizer(tiny_model_dir, template)
    ours = tokenize_conversations({"messages": CONVERSATIONS}, tokenizer, 4096, "all_assistant")
    oracle = tokenizer.apply_chat_template(CONVERSATIONS, return_dict=True, return_assistant_tokens_mask=True)
    for k in range(len(CONVERSATIONS)):
        assert ours["input_ids"][k] == oracle["input_ids"][k]
        supervised = [int(label != IGNORE_INDEX) for label in ours["labels"][k]]
        assert supervised == oracle["assistant_masks"][k], (template, k)
        assert [t for t, label in zip(ours["input_ids"][k], ours["labels"][k]) if label != IGNORE_INDEX] == [
            t for t, m in zip(oracle["input_ids"][k], oracle["assistant_masks"][k]) if m
        ]
        # the end of each assistant turn, as the template writes it, is trained on
        end = SHIPPED[template].end_of_turn or tokenizer.eos_token
        assert ours["labels"][k][-1 if template != "chatml" else -2] == tokenizer.convert_tokens_to_ids(end)


def test_train_on_last_assistant_supervises_only_the_final_turn(tiny_model_dir):
    tokenizer = chat_tokenizer(tiny_model_dir, "chatml")
    every = tokenize_conversations({"messages": CONVERSATIONS[3:]}, tokenizer, 4096, "all_assistant")
    last = tokenize_conversations({"messages": CONVERSATIONS[3:]}, tokenizer, 4096, "last_assistant")
    assert every["input_ids"] == last["input_ids"]
    text = tokenizer.decode([t for t in last["labels"][0] if t != IGNORE_INDEX])
    assert text == "f<|im_end|>" and every["supervised_tokens"][0] > last["supervised_tokens"][0]


def test_truncation_keeps_whole_turns_and_skips_a_first_turn_that_does_not_fit(tiny_model_dir):
    tokenizer = chat_tokenizer(tiny_model_dir, "chatml")
    whole = tokenize_conversations({"messages": CONVERSATIONS[3:]}, tokenizer, 4096, "all_assistant")
    ids, labels = whole["input_ids"][0], whole["labels"][0]
    second_end = [i for i, t in enumerate(labels) if t == tokenizer.convert_tokens_to_ids("<|im_end|>")][1] + 1
    cut = tokenize_conversations({"messages": CONVERSATIONS[3:]}, tokenizer, second_end + 3, "all_assistant")
    assert cut["input_ids"][0] == ids[:second_end] and cut["labels"][0] == labels[:second_end]
    assert cut["turns_dropped"][0] == 1 and cut["untruncated_tokens"][0] == len(ids)
    none = tokenize_conversations({"messages": CONVERSATIONS[3:]}, tokenizer, 5, "all_assistant")
    assert none["input_ids"][0] == [] and none["supervised_tokens"][0] == 0


def test_a_template_that_rewrites_earlier_turns_needs_last_assistant(tiny_model_dir):
    from gpt4llm.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    # Earlier assistant turns lose their reasoning once a later turn follows (as reasoning models' templates do).
    tokenizer.chat_template = (
        "{%- for m in messages -%}{{ m['role'] + ': ' }}"
        "{%- if m['role'] == 'assistant' and not loop.last -%}{{ m['content'].split('</think>')[-1] }}"
        "{%- else -%}{{ m['content'] }}{%- endif -%}{{ eos_token }}{%- endfor -%}"
        "{%- if add_generation_prompt -%}assistant: {%- endif -%}"
    )
    conversation = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "<think>x</think>b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]
    with pytest.raises(ConfigError, match="data.train_on=last_assistant"):
        tokenize_conversations({"messages": [conversation]}, tokenizer, 512, "all_assistant")
    last = tokenize_conversations({"messages": [conversation]}, tokenizer, 512, "last_assistant")
    assert tokenizer.decode([t for t in last["labels"][0] if t != IGNORE_INDEX]) == "d</s>"


def test_chat_needs_a_template_and_names_the_fix(tiny_model_dir):
    from gpt4llm.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    tokenizer.chat_template = None
    with pytest.raises(ConfigError, match=r"model.path=.*has no chat template.*data.template=chatml"):
        apply_template(tokenizer, "chat", f"model.path={tiny_model_dir}")
    with pytest.raises(ConfigError, match="data.template='bogus'"):
        apply_template(tokenizer, "bogus")


# --- data modules, packing, pairs --------------------------------------------------------------------------------
def sharegpt_file(path, conversations):
    to = {"user": "human", "assistant": "gpt", "system": "system"}
    rows = [{"conversations": [{"from": to[m["role"]], "value": m["content"]} for m in c]} for c in conversations]
    path.write_text(json.dumps(rows, ensure_ascii=False))
    return path


def test_packed_conversations_give_the_padded_loss(tmp_path, tiny_model_dir):
    from gpt4llm.data.collators import PackedCollator, SFTCollator
    from gpt4llm.data.sft_datamodule import SFTDataModule
    from gpt4llm.models.sft_module import SFTModule

    tokenizer = chat_tokenizer(tiny_model_dir, "llama3")
    data = SFTDataModule(
        tokenizer,
        str(sharegpt_file(tmp_path / "c.json", CONVERSATIONS)),
        val_size=0,
        template="llama3",
        cache_dir=str(tmp_path / "cache"),
        batching="packed",
        batch_size=4,
    )
    data.setup()
    assert data.report["template"] == "llama3" and data.report["splits"]["train"] == 4
    examples = [data.splits["train"][i] for i in range(4)]
    module = SFTModule(
        tokenizer,
        str(tiny_model_dir),
        {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8},
        attn_implementation="sdpa_varlen",
        template="llama3",
    )
    module.configure_model()
    module.model.eval()
    with torch.no_grad():
        packed, _ = module.loss(PackedCollator()(examples))
        padded, _ = module.loss(SFTCollator(tokenizer.pad_token_id)(examples))
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)


def test_reward_pairs_from_conversation_layouts(tmp_path, tiny_model_dir):
    from gpt4llm.data.comparisons import read_comparison_pairs
    from gpt4llm.data.pair_datamodule import tokenize_pairs

    path = tmp_path / "prefs.json"
    path.write_text(
        json.dumps(
            [
                {
                    "conversations": [
                        {"from": "human", "value": "Hi"},
                        {"from": "gpt", "value": "Hello"},
                        {"from": "human", "value": "Sort 2, 1"},
                    ],
                    "chosen": {"from": "gpt", "value": "1, 2"},
                    "rejected": {"from": "gpt", "value": "2, 1"},
                },
                {
                    "prompt": [SYSTEM, {"role": "user", "content": "Count: a b"}],
                    "chosen": [{"role": "assistant", "content": "2"}],
                    "rejected": [{"role": "assistant", "content": "3"}],
                },
                {"prompt": "Say yes.", "chosen": "yes", "rejected": "no"},
            ]
        )
    )
    pairs, report = read_comparison_pairs(path, template="chatml")
    assert [p["index"] for p in pairs] == [0, 1, 2] and report["layouts"] == {"sharegpt_preference": 1, "plain": 2}
    tokenizer = chat_tokenizer(tiny_model_dir, "chatml")
    batch = {k: [p[k] for p in pairs] for k in ("prompt", "chosen", "rejected")}
    ids = tokenize_pairs(batch, tokenizer, 512, template="chatml")
    prompt = json.loads(pairs[0]["prompt"]) + [{"role": "assistant", "content": "1, 2"}]
    assert ids["chosen_input_ids"][0] == tokenizer.apply_chat_template(prompt, return_dict=True)["input_ids"]
    # The paper's template holds one user turn: the conversations are counted skips there, the plain pair is kept.
    pairs, report = read_comparison_pairs(path)
    assert [p["index"] for p in pairs] == [2] and sum(s["count"] for s in report["skipped_records"].values()) == 2


# --- through training, export and serve ---------------------------------------------------------------------------
def test_chatml_training_exports_its_template_and_serve_renders_the_whole_conversation(tmp_path):
    from openai import OpenAI
    from transformers import AutoTokenizer, GenerationConfig

    from gpt4llm.inference.server import load_server
    from gpt4llm.train import train

    cfg = compose_train(
        demo_overrides(tmp_path, "data.template=chatml", "trainer.max_steps=2", "data.exact_match_examples=4")
    )
    cfg.paths.output_dir = str(tmp_path / "run")
    metrics = train(cfg)
    assert "val/exact_match" in metrics
    export = tmp_path / "run" / "export"
    loaded = AutoTokenizer.from_pretrained(export)
    assert loaded.chat_template == shipped_template("chatml")
    assert json.loads((export / "config.json").read_text())["gpt4llm_template"] == "chatml"
    assert loaded.convert_tokens_to_ids("<|im_end|>") in GenerationConfig.from_pretrained(export).eos_token_id

    conversation = [
        SYSTEM,
        {"role": "user", "content": "Sort 3, 1, 2."},
        {"role": "assistant", "content": "1, 2, 3"},
        {"role": "user", "content": "And descending?"},
    ]
    server = load_server(str(export), name="chat").start()
    try:
        client = OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        whole = client.chat.completions.create(model="chat", messages=conversation, max_tokens=6, temperature=0)
        streamed = "".join(
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(
                model="chat", messages=conversation, max_tokens=6, temperature=0, stream=True
            )
            if c.choices
        )
        assert streamed == whole.choices[0].message.content
        rendered = loaded.apply_chat_template(conversation, add_generation_prompt=True, return_dict=True)["input_ids"]
        assert whole.usage.prompt_tokens == len(rendered)  # the whole conversation, as the template renders it
    finally:
        server.close()


# --- per-turn weights ------------------------------------------------------------------------------------------------
def _without_block(mask: list[int], block: int) -> list[int]:
    """The oracle's assistant mask with its `block`-th run of marked tokens (one assistant turn) unmarked."""
    out, run, previous = list(mask), -1, 0
    for i, m in enumerate(mask):
        run += m and not previous
        if m and run == block:
            out[i] = 0
        previous = m
    return out


def test_a_turn_of_weight_0_is_context_not_target(tiny_model_dir, tmp_path):
    """ShareGPT's per-turn `weight: 0` (axolotl's and LLaMA-Factory's data carry it): that assistant turn stays in the
    input and gets no loss; the others train as transformers' own assistant mask marks them."""
    conversation = [
        {"from": "human", "value": "Sort 3, 1, 2."},
        {"from": "gpt", "value": "3, 2, 1", "weight": 0},  # a wrong answer kept as context
        {"from": "human", "value": "Ascending, please."},
        {"from": "gpt", "value": "1, 2, 3", "weight": 1},
    ]
    path = tmp_path / "weighted.jsonl"
    records = [
        {"conversations": conversation},
        {"conversations": [dict(t, weight=0) if t["from"] == "gpt" else t for t in conversation]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    loaded, report = load_conversations(path)
    assert [r["untrained"] for r in loaded] == [[1]]
    assert report.summary()["skipped"]["every assistant turn has weight 0"]["count"] == 1
    assert "weight" not in report.summary()["unused_fields"]

    tokenizer = chat_tokenizer(tiny_model_dir, "chatml")
    ours = tokenize_conversations(
        {"messages": [loaded[0]["messages"]], "untrained": [[1]]}, tokenizer, 4096, "all_assistant"
    )
    oracle = tokenizer.apply_chat_template([loaded[0]["messages"]], return_dict=True, return_assistant_tokens_mask=True)
    assert ours["input_ids"][0] == oracle["input_ids"][0]
    supervised = [int(label != IGNORE_INDEX) for label in ours["labels"][0]]
    assert supervised == _without_block(oracle["assistant_masks"][0], 0)
    assert sum(supervised) > 0


@pytest.mark.parametrize("weight", [0.5, "0", None, 2])
def test_a_weight_other_than_0_or_1_is_named(weight, tmp_path):
    path = tmp_path / "weighted.jsonl"
    turns = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello", "weight": weight}]
    path.write_text(json.dumps({"conversations": turns}) + "\n")
    with pytest.raises(RecordError, match=r"record 0: field 'conversations\[1\].weight' is .*: 0 \(kept as context"):
        load_conversations(path)


@pytest.mark.parametrize("template", ["chatml", "llama3", "vicuna_v1.1"])
def test_every_whole_conversation_ends_on_its_end_of_turn_token(template, tiny_model_dir):
    """`prepare` once flagged ChatML conversations as having lost their EOS: the template writes a newline after
    <|im_end|>, which is the last token but not trained on. What counts is the last token trained on."""
    tokenizer = chat_tokenizer(tiny_model_dir, template)
    ours = prompt_format(template).tokenize_examples({"messages": CONVERSATIONS}, tokenizer, 4096)
    assert ours["ends_with_eos"] == [True] * len(CONVERSATIONS)


def test_a_long_answer_is_cut_not_dropped_and_only_a_prompt_that_fills_the_length_is_skipped(tiny_model_dir, tmp_path):
    """The chat path once dropped every record whose first answer did not fit (312 of 999 GPT-4 records at 256
    tokens) where the Alpaca path cuts it: now both cut, and a skip names its true reason."""
    from gpt4llm.data.cache import SplitSettings
    from gpt4llm.data.sft_datamodule import build_sft_splits

    long_answer = " ".join(str(i) for i in range(300))
    records = [{"instruction": f"Count to 300, take {i}.", "input": "", "output": long_answer} for i in range(12)]
    records.append({"instruction": "word " * 400, "input": "", "output": "ok"})  # the prompt alone is too long
    path = tmp_path / "long.json"
    path.write_text(json.dumps(records))
    tokenizer = chat_tokenizer(tiny_model_dir, "chatml")
    settings = SplitSettings(max_length=64, val_size=2, template="chatml", template_text=tokenizer.chat_template)
    splits, report = build_sft_splits(path, tokenizer, settings, tmp_path / "cache")
    assert sum(splits.num_rows.values()) == 12 and report["truncated"]["count"] == 13
    assert {k: v["count"] for k, v in report["skipped"].items()} == {
        "prompt before the first assistant turn fills max_length": 1
    }
    first = splits["train"][0]
    assert len(first["input_ids"]) == 64 and first["labels"][-1] != IGNORE_INDEX  # the answer's start, trained on
