"""AdamW as the strategy needs it: which implementation, and which parameters are decayed.

The implementation follows where the optimizer states live, as Hugging Face's Trainer (and so the paper's run with
its ds_config.json) got it:
  - optimizer offloaded to the CPU by DeepSpeed: DeepSpeed's CPU Adam in AdamW mode (DeepSpeed refuses any other
    client optimizer with ZeRO-Offload, and torch's AdamW on the CPU would be many times slower);
  - parameters on a CUDA device: torch's fused AdamW (one kernel for all parameters);
  - otherwise (the CPU demo and tests): torch's AdamW.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from gpt4llm.errors import ConfigError

CHOICES = {
    "deepspeed_cpu_adam": "DeepSpeed's CPU Adam (AdamW mode, optimizer states in CPU memory)",
    "fused_adamw": "torch's fused AdamW on the GPU",
    "adamw": "torch's AdamW",
    # asked for by task.optimizer.implementation (QLoRA's): states paged between GPU and CPU memory by bitsandbytes
    "paged_adamw_8bit": "bitsandbytes' paged AdamW, 8-bit states",
    "paged_adamw_32bit": "bitsandbytes' paged AdamW, 32-bit states",
}
REQUESTABLE = ("auto", "paged_adamw_8bit", "paged_adamw_32bit")

# Hugging Face Trainer's rule (Trainer.get_decay_parameter_names): no decay for biases, norms and LayerNorm modules,
# decided by name and module type. Not by `param.ndim`: under ZeRO-3 every parameter is a 1-D partition placeholder
# when the optimizer is built, which would put all of them in the no-decay group.
NO_DECAY_NAME_PATTERNS = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


def optimizer_choice(offload_optimizer: bool, accelerator: str, requested: str = "auto") -> str:
    """The key in CHOICES for optimizer states in CPU memory (DeepSpeed offload) or on `accelerator`, unless
    `requested` (task.optimizer.implementation) names one."""
    if requested not in REQUESTABLE:
        raise ConfigError(f"task.optimizer.implementation={requested!r}: choose one of {', '.join(REQUESTABLE)}")
    if requested != "auto":
        if offload_optimizer:
            raise ConfigError(
                f"task.optimizer.implementation={requested} cannot run with the optimizer offloaded by "
                "DeepSpeed: use auto (DeepSpeed's CPU Adam) or a strategy without offload"
            )
        return requested
    if offload_optimizer:
        return "deepspeed_cpu_adam"
    return "fused_adamw" if accelerator in ("gpu", "cuda") else "adamw"


def strategy_offloads_optimizer(strategy) -> bool:
    """Whether a Lightning DeepSpeed strategy keeps the optimizer states in CPU memory."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    if not isinstance(strategy, DeepSpeedStrategy):
        return False
    strategy._init_config_if_needed()
    offload = (strategy.config.get("zero_optimization") or {}).get("offload_optimizer") or {}
    return offload.get("device") in ("cpu", "nvme")


def decay_parameter_names(model: nn.Module) -> set[str]:
    from transformers.trainer_pt_utils import get_parameter_names

    return set(get_parameter_names(model, [nn.LayerNorm], NO_DECAY_NAME_PATTERNS))


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two groups: decayed, then never decayed (biases and norms). An empty group is left
    out (DeepSpeed's ZeRO optimizers fail on one)."""
    decayed = decay_parameter_names(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if n in decayed], "weight_decay": weight_decay},
        {"params": [p for n, p in named if n not in decayed], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_adamw(
    groups: Iterable[dict], choice: str, lr: float, betas: tuple[float, float], eps: float
) -> torch.optim.Optimizer:
    """AdamW of the chosen implementation over parameter groups that carry their own weight decay."""
    groups, betas = list(groups), tuple(betas)
    if choice == "deepspeed_cpu_adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=lr, betas=betas, eps=eps, adamw_mode=True)
    if choice.startswith("paged_adamw"):
        import bitsandbytes as bnb

        paged = bnb.optim.PagedAdamW8bit if choice == "paged_adamw_8bit" else bnb.optim.PagedAdamW32bit
        return paged(groups, lr=lr, betas=betas, eps=eps)
    if choice not in CHOICES:
        raise ValueError(f"unknown optimizer choice {choice!r}: one of {', '.join(CHOICES)}")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=choice == "fused_adamw")
