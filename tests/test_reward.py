"""The reward model: the loss by hand, the last token under both paddings and pad == EOS, a training step, scoring
with an export, and best-of-N on the tiny models."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from gpt4llm.data.collators import PairCollator
from gpt4llm.data.encoding import padded_batch
from gpt4llm.models.reward_module import (
    RewardModule,
    load_reward_model,
    pairwise_loss,
    sequence_rewards,
)


def test_loss_matches_a_hand_computed_value():
    chosen, rejected = torch.tensor([1.0, 0.0, 3.0]), torch.tensor([0.0, 2.0, 3.0])
    # -log sigmoid(d) = log(1 + exp(-d)) for d = 1, -2, 0
    expected = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(2)) + math.log(2)) / 3
    assert pairwise_loss(chosen, rejected).item() == pytest.approx(expected, rel=1e-6)
    low = pairwise_loss(chosen.bfloat16(), rejected.bfloat16())
    assert low.dtype == torch.float32 and low.item() == pytest.approx(expected, rel=1e-6)  # these halves are exact


@pytest.fixture(scope="module")
def reward_model(tiny_model_dir, tokenizer):
    return load_reward_model(str(tiny_model_dir), tokenizer).eval()


def left_pad(sequences, pad_token_id):
    longest = max(len(s) for s in sequences)
    input_ids = torch.tensor([[pad_token_id] * (longest - len(s)) + s for s in sequences])
    attention_mask = torch.tensor([[0] * (longest - len(s)) + [1] * len(s) for s in sequences])
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_reward_is_read_at_the_last_token_under_both_paddings(reward_model, tokenizer, pad_is_eos):
    eos = tokenizer.eos_token_id
    sequences = [
        tokenizer(t)["input_ids"] + [eos] for t in ("Sort 3, 1, 2.", "Hi", "Reverse the order of the words please.")
    ]
    pad = eos if pad_is_eos else tokenizer.pad_token_id
    with torch.no_grad():
        alone = torch.cat([sequence_rewards(reward_model, **padded_batch([s], pad)) for s in sequences])
        right = sequence_rewards(reward_model, **padded_batch(sequences, pad))
        left = sequence_rewards(reward_model, **left_pad(sequences, pad))
        without_eos = torch.cat([sequence_rewards(reward_model, **padded_batch([s[:-1]], pad)) for s in sequences])
    torch.testing.assert_close(right, alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(left, alone, rtol=0, atol=1e-5)
    assert (without_eos - alone).abs().min() > 1e-4  # the final EOS itself is read, even when it is also the pad


def test_training_step_and_validation_statistics(tiny_model_dir, tokenizer):
    module = RewardModule(
        tokenizer, str(tiny_model_dir), optimizer={"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8}, max_length=64
    )
    module.configure_model()
    eos = tokenizer.eos_token_id
    ids = {text: tokenizer(text)["input_ids"] + [eos] for text in ("right", "wrong answer", "yes", "no")}
    batch = PairCollator(tokenizer.pad_token_id)(
        [
            {"chosen_input_ids": ids["right"], "rejected_input_ids": ids["wrong answer"]},
            {"chosen_input_ids": ids["yes"], "rejected_input_ids": ids["no"]},
        ]
    )
    chosen, rejected = module(**batch).chunk(2)  # one forward pass: the first half chosen, the second rejected
    assert chosen.dtype == torch.float32 and chosen.shape == (2,)
    loss = pairwise_loss(chosen, rejected)
    loss.backward()
    assert module.model.score.weight.grad.abs().sum() > 0
    assert module.model.get_input_embeddings().weight.grad.abs().sum() > 0

    import lightning as L

    from gpt4llm.training.callbacks import LastValidation

    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[LastValidation()],  # as train's trainer has it: it marks the module's validated_at_step
    )
    metrics = trainer.validate(
        module, dataloaders=torch.utils.data.DataLoader([batch], batch_size=None), verbose=False
    )[0]
    rewards = torch.cat([chosen, rejected]).detach()
    assert metrics["val/loss"] == pytest.approx(loss.item(), abs=1e-5)
    assert metrics["val/rm_acc"] == (chosen > rejected).float().mean().item()
    assert metrics["val/rm_margin"] == pytest.approx((chosen - rejected).mean().item(), abs=1e-5)
    assert metrics["val/reward_mean"] == pytest.approx(rewards.mean().item(), abs=1e-5)
    assert metrics["val/reward_std"] == pytest.approx(rewards.std(unbiased=False).item(), abs=1e-4)
    config = module.model.config  # what the export carries, to normalise scores later
    assert (config.reward_mean, config.reward_std) == pytest.approx(
        (metrics["val/reward_mean"], metrics["val/reward_std"])
    )
    assert config.reward_max_length == 64 and module.validated_at_step == 0


def test_opt_backbone_reads_the_same_reward_left_or_right_padded(tmp_path, tokenizer):
    """The paper's backbone family: absolute positions, so position ids must follow the attention mask."""
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=128,
        word_embed_proj_dim=32,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    OPTForCausalLM(config).save_pretrained(tmp_path / "opt")
    model = load_reward_model(str(tmp_path / "opt"), tokenizer).eval()
    sequences = [tokenizer(t)["input_ids"] for t in ("a b c d e f", "x", "one two")]
    with torch.no_grad():
        alone = torch.cat([sequence_rewards(model, **padded_batch([s], tokenizer.pad_token_id)) for s in sequences])
        right = sequence_rewards(model, **padded_batch(sequences, tokenizer.pad_token_id))
        left = sequence_rewards(model, **left_pad(sequences, tokenizer.pad_token_id))
    torch.testing.assert_close(right, alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(left, alone, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def exported_rm(tmp_path_factory, reward_model, tokenizer):
    """An exported reward model as `train task=rm` writes it (weights, tokenizer, statistics in the config)."""
    from gpt4llm.models.export import export_hf

    reward_model.config.reward_mean, reward_model.config.reward_std, reward_model.config.reward_max_length = (
        0.5,
        2.0,
        64,
    )
    return export_hf(reward_model, tokenizer, tmp_path_factory.mktemp("rm") / "export")


def test_score_records_matches_the_model_and_templates_once(exported_rm, reward_model, tokenizer):
    from gpt4llm.data.prompts import format_prompt
    from gpt4llm.inference.scoring import score_records

    records = [
        {"instruction": "Sort the numbers.", "input": "3, 1", "response": "1, 3"},
        {"prompt": format_prompt("Sort the numbers.", "3, 1"), "response": "1, 3"},  # already templated
        {"prompt": "Name a color.", "response": "blue " * 100},  # longer than reward_max_length
        {"instruction": "Name a color.", "response": "blue"},
    ]
    rewards = score_records(exported_rm, records, batch_size=3)
    assert rewards[0] == pytest.approx(rewards[1], abs=1e-6) and len(rewards) == 4
    ids = tokenizer(format_prompt("Name a color.") + "blue" + tokenizer.eos_token)["input_ids"]
    with torch.no_grad():
        direct = sequence_rewards(reward_model, **padded_batch([ids], tokenizer.pad_token_id)).item()
    assert rewards[3] == pytest.approx(direct, abs=1e-5)
    normalized = score_records(exported_rm, records, normalize=True)
    assert normalized == pytest.approx([(r - 0.5) / 2.0 for r in rewards], abs=1e-5)
    reloaded = AutoModelForSequenceClassification.from_pretrained(exported_rm)
    assert reloaded.config.reward_mean == 0.5 and reloaded.config.num_labels == 1


def test_score_records_names_the_bad_record(exported_rm):
    from gpt4llm.errors import RecordError
    from gpt4llm.inference.scoring import score_records

    with pytest.raises(RecordError, match=r"record 1: field 'response' is missing"):
        score_records(exported_rm, [{"prompt": "a", "response": "b"}, {"prompt": "a"}])


def test_best_of_n_ranks_samples_and_keeps_the_greedy_baseline(tiny_model_dir, exported_rm, tmp_path):
    from gpt4llm.inference.best_of_n import best_of_n, read_prompts
    from gpt4llm.inference.scoring import score_records

    path = tmp_path / "q.jsonl"
    path.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"id": "q1", "instruction": "Sort the numbers.", "input": "3, 1"},
                {"instruction": "Name a color."},
            ]
        )
    )
    prompts = read_prompts(path)
    assert [p["id"] for p in prompts] == ["q1", 1] and prompts[1]["input"] == ""
    settings = dict(n=3, max_new_tokens=6, batch_size=2, temperature=1.0, top_p=1.0, seed=1)
    rows = best_of_n(tiny_model_dir, exported_rm, prompts, **settings)
    assert rows == best_of_n(tiny_model_dir, exported_rm, prompts, **settings)  # seeded draws: repeatable
    assert [r["id"] for r in rows] == ["q1", 1]
    for prompt, row in zip(prompts, rows):
        assert [c["rank"] for c in row["ranked"]] == [1, 2, 3] and sorted(c["draw"] for c in row["ranked"]) == [0, 1, 2]
        rewards = [c["reward"] for c in row["ranked"]]
        assert rewards == sorted(rewards, reverse=True)
        rescored = score_records(
            exported_rm, [prompt | {"response": c["response"]} for c in [*row["ranked"], row["baseline"]]]
        )
        assert rescored == pytest.approx(rewards + [row["baseline"]["reward"]], abs=1e-5)
    assert len({c["response"] for r in rows for c in r["ranked"]}) > 2  # sampled, not greedy


def test_bad_prompt_file_names_record_and_field(tmp_path):
    from gpt4llm.errors import RecordError
    from gpt4llm.inference.best_of_n import read_prompts

    path = tmp_path / "q.json"
    path.write_text(json.dumps([{"instruction": "ok"}, {"input": "no instruction"}]))
    with pytest.raises(RecordError, match=r"q\.json: record 1: field 'instruction' is missing"):
        read_prompts(path)
