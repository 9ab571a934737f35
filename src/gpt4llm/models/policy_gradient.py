"""The arithmetic of group-relative online RL (issue 34's core; the tasks that roll out, score and step on it are not
built yet): advantages from a group's rewards, the KL estimate to a frozen reference, and the clipped policy-gradient
losses, with TRL's names and TRL's numbers (tests/test_policy_gradient.py runs TRL's own GRPOTrainer and RLOOTrainer
loss code on the same log-probabilities and rewards).

Shapes: `rewards` (B,) with a prompt's `num_generations` completions next to each other; per-token tensors (B, T)
over the completion tokens, `mask` 1 where a token counts (0 for padding after EOS, or for a truncated completion
that is masked out).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")  # how per-token losses become one number (TRL's loss_type)
SCALE_REWARDS = ("group", "batch", "none")  # what a GRPO advantage is divided by (TRL's scale_rewards)
STD_EPS = 1e-4  # added to a standard deviation before dividing by it, as TRL


def grpo_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group") -> torch.Tensor:
    """GRPO (Shao et al. 2024): each reward minus its group's mean, divided by the group's standard deviation
    (`group`), the batch's (`batch`, Liu et al.'s fix for groups of near-equal rewards) or nothing (`none`, Dr. GRPO).
    Standard deviations are unbiased (n - 1), as torch's and TRL's."""
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards={scale_rewards!r}: one of {', '.join(SCALE_REWARDS)}")
    grouped = rewards.view(-1, num_generations)
    advantages = (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)
    if scale_rewards == "group":
        advantages = advantages / (grouped.std(dim=1).repeat_interleave(num_generations) + STD_EPS)
    elif scale_rewards == "batch":
        advantages = advantages / (rewards.std() + STD_EPS)
    return advantages


def rloo_advantages(rewards: torch.Tensor, num_generations: int, normalize: bool = False) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024): each reward minus the mean of the other completions of its prompt (the
    leave-one-out baseline); `normalize`: then standardized over the batch."""
    grouped = rewards.view(-1, num_generations)
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (num_generations - 1)
    advantages = (grouped - baseline).view(-1)
    if normalize:
        advantages = (advantages - advantages.mean()) / (advantages.std() + STD_EPS)
    return advantages


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token KL(policy || reference), Schulman's k3 estimator: exp(r) - r - 1 with r = ref - policy; never
    negative, 0 where they agree."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


@dataclass
class PolicyLoss:
    loss: torch.Tensor
    kl: torch.Tensor | None  # the mean per-token KL over counted tokens (None without a reference)
    clip_low: torch.Tensor  # share of counted tokens whose ratio fell below 1 - epsilon_low with a negative advantage
    clip_high: torch.Tensor  # ... rose above 1 + epsilon_high with a positive advantage
    clip_region: torch.Tensor  # either


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str = "dapo",
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    beta: float = 0.0,
    ref_logps: torch.Tensor | None = None,
    max_completion_length: int | None = None,
    num_items: float | None = None,
) -> PolicyLoss:
    """The clipped surrogate per token, -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A), plus beta times
    the k3 KL to the reference, aggregated by `loss_type`:
    - `grpo`: each sequence's mean over its tokens, then the mean over sequences (long answers weigh less per token);
    - `bnpo`: the mean over all counted tokens of this batch;
    - `dr_grpo`: the sum over tokens / (sequences x max_completion_length), a constant denominator (Liu et al.);
    - `dapo`: the sum over tokens / `num_items`, the counted tokens of the whole generation batch (Yu et al.).
    `old_logps`: the log-probabilities the completions were sampled with (for a first update, `logps.detach()`:
    the ratio is 1)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}: one of {', '.join(LOSS_TYPES)}")
    advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    mask = mask.to(logps.dtype)
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(ratio * advantages, clipped * advantages)
    kl = None
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta != 0 needs the reference's log-probabilities")
        per_token_kl = k3_kl(logps, ref_logps)
        per_token = per_token + beta * per_token_kl
        kl = masked_mean(per_token_kl, mask)
    counted = (per_token * mask).sum()
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = counted / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type=dr_grpo needs max_completion_length")
        loss = counted / (per_token.size(0) * max_completion_length)
    else:
        total = mask.sum() if num_items is None else torch.as_tensor(num_items, dtype=logps.dtype)
        loss = counted / total.clamp(min=1.0)
    low = ((ratio < 1 - epsilon_low) & (advantages < 0)).to(logps.dtype)
    high = ((ratio > 1 + epsilon_high) & (advantages > 0)).to(logps.dtype)
    return PolicyLoss(
        loss,
        kl,
        masked_mean(low, mask),
        masked_mean(high, mask),
        masked_mean(torch.maximum(low, high), mask),
    )


def rloo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
) -> torch.Tensor:
    """RLOO's clipped surrogate on whole sequences: the ratio of the sequences' summed log-probabilities (counted
    tokens only), -min(ratio * A, clip(ratio) * A), averaged over sequences. (Its KL penalty, when any, is taken from
    the reward before the advantages, not added here.)"""
    mask = mask.to(logps.dtype)
    ratio = torch.exp((logps * mask).sum(1) - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    return (-torch.min(ratio * advantages, clipped * advantages)).mean()


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1.0)
