"""GRPO's and RLOO's arithmetic (models.policy_gradient) against TRL's own: TRL's GRPOTrainer._compute_loss and
RLOOTrainer._compute_loss run on the same fixed log-probabilities, advantages and masks (their trainer objects
stood in for by the few attributes that code reads), for every loss aggregation, with and without a KL penalty and
clipping; advantages against worked examples."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from gpt4llm.models.policy_gradient import (
    LOSS_TYPES,
    grpo_advantages,
    grpo_loss,
    k3_kl,
    rloo_advantages,
    rloo_loss,
)

trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer", reason="TRL is the oracle (the dev extra installs it)")
trl_rloo = pytest.importorskip("trl.trainer.rloo_trainer")

B, T, MAX_LENGTH = 6, 5, 7


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    mask = torch.ones(B, T, dtype=torch.float64)
    mask[1, 3:] = 0  # ended early
    mask[4, 1:] = 0
    mask[5] = 0  # a truncated completion, masked out whole
    return {
        "logps": logps,
        # sampled by an older policy: ratios from about 0.5 to 2, so both clips bite
        "old_logps": logps + (torch.rand(B, T, generator=g, dtype=torch.float64) - 0.5) * 1.4,
        "ref_logps": logps + (torch.rand(B, T, generator=g, dtype=torch.float64) - 0.5),
        "advantages": torch.tensor([1.2, -0.7, 0.3, -1.5, 0.9, 0.4], dtype=torch.float64),
        "mask": mask,
    }


def fake_trainer(trainer_class, logps, **settings):
    """The attributes TRL's `_compute_loss` reads, its model's log-probabilities given (entropies zero)."""
    accelerator = SimpleNamespace(
        num_processes=1,
        gather=lambda x: x,
        gather_for_metrics=lambda x: x,
        reduce=lambda x, reduction="sum": x,
        sync_gradients=True,
    )
    fake = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        aux_loss_enabled=False,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=MAX_LENGTH,
        accelerator=accelerator,
        _entropy_bonus_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        **settings,
    )
    return fake, (lambda inputs: trainer_class._compute_loss(fake, None, inputs))


def trl_inputs(b: dict, **extra) -> dict:
    return {
        "prompt_ids": torch.zeros(B, 2, dtype=torch.long),
        "prompt_mask": torch.ones(B, 2, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long),
        "completion_mask": b["mask"],
        "advantages": b["advantages"],
        **extra,
    }


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_grpo_loss_kl_and_clip_ratios_equal_trls(loss_type, beta):
    b = batch()
    num_items = b["mask"].sum() + 9  # dapo: the counted tokens of the whole generation batch, more than this one's
    settings = dict(loss_type=loss_type, beta=beta, epsilon_low=0.2, epsilon_high=0.28)
    fake, trl_loss = fake_trainer(trl_grpo.GRPOTrainer, b["logps"], **settings)
    inputs = trl_inputs(
        b, old_per_token_logps=b["old_logps"], ref_per_token_logps=b["ref_logps"], num_items_in_batch=num_items
    )
    expected = trl_loss(inputs)
    ours = grpo_loss(
        b["logps"],
        b["old_logps"],
        b["advantages"],
        b["mask"],
        loss_type,
        epsilon_low=0.2,
        epsilon_high=0.28,
        beta=beta,
        ref_logps=b["ref_logps"],
        max_completion_length=MAX_LENGTH,
        num_items=num_items,
    )
    torch.testing.assert_close(ours.loss, expected, rtol=1e-12, atol=1e-12)
    metrics = fake._metrics["train"]
    assert ours.clip_low.item() == pytest.approx(metrics["clip_ratio/low_mean"][0], abs=1e-12)
    assert ours.clip_high.item() == pytest.approx(metrics["clip_ratio/high_mean"][0], abs=1e-12)
    assert ours.clip_region.item() == pytest.approx(metrics["clip_ratio/region_mean"][0], abs=1e-12)
    assert 0 < ours.clip_region.item() < 1, "the batch must exercise both sides of the clip"
    if beta:
        assert ours.kl.item() == pytest.approx(metrics["kl"][0], abs=1e-12)


def test_the_first_update_has_ratio_one_and_no_kl_to_an_identical_reference():
    b = batch(1)
    out = grpo_loss(b["logps"], b["logps"].detach(), b["advantages"], b["mask"], "grpo", beta=0.1, ref_logps=b["logps"])
    assert out.kl.item() == 0 and out.clip_region.item() == 0
    assert torch.equal(k3_kl(b["logps"], b["logps"]), torch.zeros_like(b["logps"]))
    assert (k3_kl(b["logps"], b["ref_logps"]) >= 0).all()


def test_rloo_loss_equals_trls():
    b = batch(2)
    old_logps = (b["old_logps"] * b["mask"]).sum(1)  # RLOO compares whole sequences
    _, trl_loss = fake_trainer(trl_rloo.RLOOTrainer, b["logps"], epsilon_low=0.2, epsilon_high=0.28)
    expected = trl_loss(trl_inputs(b, old_logps=old_logps))
    ours = rloo_loss(b["logps"], old_logps, b["advantages"], b["mask"], epsilon_low=0.2, epsilon_high=0.28)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)


def test_advantages_on_worked_examples():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])  # two prompts, four completions each
    # group 1: mean 0.5, unbiased std sqrt(1/3); group 2: all equal, advantage 0 (not a division by zero)
    group = grpo_advantages(rewards, 4, "group")
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5]) / (3**-0.5 + 1e-4)
    torch.testing.assert_close(group[:4], expected)
    assert torch.equal(group[4:], torch.zeros(4))
    torch.testing.assert_close(grpo_advantages(rewards, 4, "none"), torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))
    torch.testing.assert_close(
        grpo_advantages(rewards, 4, "batch"), grpo_advantages(rewards, 4, "none") / (rewards.std() + 1e-4)
    )
    # RLOO: each reward minus the mean of its siblings
    torch.testing.assert_close(
        rloo_advantages(torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 6.0]), 3),
        torch.tensor([1 - 2.5, 2 - 2.0, 3 - 1.5, 0 - 3.0, 0 - 3.0, 6 - 0.0]),
    )
    with pytest.raises(ValueError, match="scale_rewards='mean': one of group, batch, none"):
        grpo_advantages(rewards, 4, "mean")
