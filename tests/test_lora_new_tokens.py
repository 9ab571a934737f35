"""LoRA on a base whose tokenizer lacks tokens the run needs (LLaMA's: no pad token; a base model under a shipped chat
template: no <|im_start|>/<|im_end|>). The new rows train with the adapters (peft's trainable tokens) and travel in the
adapter, so the end-of-turn token can be learned, and the adapter works the way peft users load it: the unmodified
base, resized to the adapter's tokenizer, `PeftModel.from_pretrained`, batched generation; equal to the merged export
on every logit column."""

from __future__ import annotations

import pytest
import torch

from helpers.configs import compose_train, demo_overrides


def _end_of_turn_logprob(model, tokenizer, rows) -> float:
    """The mean log-probability the model gives <|im_end|> where the labels put it (the end of each answer)."""
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row["input_ids"]])
            logprobs = model(input_ids=ids).logits.log_softmax(-1)[0]
            for position, label in enumerate(row["labels"][1:]):
                if label == end:
                    total += logprobs[position, end].item()
                    count += 1
    assert count > 0
    return total / count


@pytest.fixture(scope="module")
def chatml_lora_run(tmp_path_factory):
    """A LoRA run under ChatML on the LLaMA-like tiny model: (its temporary directory, the composed config)."""
    from gpt4llm.train import train

    tmp_path = tmp_path_factory.mktemp("chatml-lora")

    cfg = compose_train(
        demo_overrides(
            tmp_path,
            "+model.tiny.tokenizer_type=sentencepiece",  # LLaMA's settings: no pad token
            "model.tokenizer=tokenizers",
            "data.template=chatml",
            "peft=lora",
            "trainer.max_steps=40",
            "data.exact_match_examples=0",
        )
    )
    cfg.paths.output_dir = str(tmp_path / "run")
    train(cfg)
    return tmp_path, cfg


def test_new_tokens_learn_and_the_adapter_loads_as_peft_users_load_it(chatml_lora_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gpt4llm.models.hf import load_causal_lm

    tmp_path, cfg = chatml_lora_run
    export, base_dir = tmp_path / "run" / "export", cfg.model.path

    # peft's documented steps for an adapter whose tokenizer grew: the base as it is, resized, then the adapter
    tokenizer = AutoTokenizer.from_pretrained(export / "adapter", padding_side="left")
    assert "[PAD]" in tokenizer.get_vocab() and "<|im_end|>" in tokenizer.get_vocab()
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    assert base.get_input_embeddings().num_embeddings < len(tokenizer)
    base.resize_token_embeddings(len(tokenizer))  # new rows drawn at random: the adapter's values replace them
    with_adapter = PeftModel.from_pretrained(base, export / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(export).eval()

    chats = [[{"role": "user", "content": "Sort 3, 1, 2."}], [{"role": "user", "content": "Reverse: a b c d e f"}]]
    batch = tokenizer.apply_chat_template(
        chats, add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        ours, theirs = merged(**batch).logits, with_adapter(**batch).logits
        assert ours.shape[-1] == theirs.shape[-1] == len(tokenizer)  # every column, the new tokens' too
        torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
        stops = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]  # the base's config lacks it
        settings = {
            "max_new_tokens": 8,
            "do_sample": False,
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": stops,
        }
        generated = with_adapter.generate(**batch, **settings)  # batched, left-padded: no index out of range
        assert torch.equal(generated, merged.generate(**batch, **settings))

    # the end-of-turn token learned: its row is no longer the mean every new token started from
    head = merged.get_output_embeddings().weight
    end, pad = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.pad_token_id
    assert not torch.allclose(head[end], head[pad])
    from datasets import load_from_disk

    from gpt4llm.data.tokenizer import load_tokenizer

    trained_tokenizer = load_tokenizer(str(export), backend="tokenizers")
    start = load_causal_lm(base_dir, trained_tokenizer).eval()  # the base as training started: new rows at the mean
    cache = sorted((tmp_path / "data" / "cache").glob("sft-*"))  # what training tokenized: where <|im_end|> belongs
    assert cache
    held_out = load_from_disk(str(cache[0] / "splits"))["validation"].select(range(16))
    before = _end_of_turn_logprob(start, trained_tokenizer, held_out)
    after = _end_of_turn_logprob(merged, trained_tokenizer, held_out)
    assert after > before + 1.0, (before, after)


def test_generate_and_serve_pointed_at_the_adapter_use_the_template_it_trained_with(chatml_lora_run):
    """An adapter directory holds the base's config, not the run's record: the template its tokenizer carries says
    how it was trained, so the whole conversation is rendered in ChatML, not in the Alpaca prompt."""
    from gpt4llm.data.tokenizer import load_tokenizer
    from gpt4llm.models import model_card
    from gpt4llm.models.decoding import generate_responses
    from gpt4llm.models.hf import load_causal_lm

    tmp_path, _ = chatml_lora_run
    export = tmp_path / "run" / "export"
    tokenizer = load_tokenizer(str(export / "adapter"), padding_side="left", backend="tokenizers")
    from_adapter = load_causal_lm(str(export / "adapter"), tokenizer).eval()
    merged = load_causal_lm(str(export), tokenizer).eval()
    served = model_card.prompt_format_of(from_adapter, tokenizer)
    assert served.format.name == "chatml" and "template its tokenizer carries" in served.why
    assert model_card.prompt_format_of(merged, tokenizer).format.name == "chatml"  # recorded in the merged export
    records = [{"instruction": "Sort 3, 1, 2.", "input": ""}, {"instruction": "Reverse: a b c", "input": ""}]
    assert generate_responses(from_adapter, tokenizer, records, max_new_tokens=6) == generate_responses(
        merged, tokenizer, records, max_new_tokens=6
    )


def test_a_chat_model_not_trained_here_is_queried_with_its_own_template(tiny_model_dir):
    from gpt4llm.data.tokenizer import load_tokenizer
    from gpt4llm.models import model_card
    from gpt4llm.models.hf import load_causal_lm

    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_causal_lm(str(tiny_model_dir), tokenizer)
    assert model_card.prompt_format_of(model, tokenizer).format.name == "alpaca"  # a base model: the paper's prompt
    tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    served = model_card.prompt_format_of(model, tokenizer)
    assert served.format.name == "chat" and "own chat template" in served.why
