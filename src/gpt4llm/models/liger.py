"""`model.kernels=liger`: Liger's Triton kernels (LinkedIn's liger-kernel, extra `gpt4llm[liger]`) on a CUDA GPU.

What its users expect from it, from Liger's own entry points: the model's RMSNorm, rotary embedding and SwiGLU MLP
swapped for Liger's (`_apply_liger_kernel_to_instance`, the instance patch Liger documents for a model already
loaded, for every architecture it knows), and the SFT loss through Liger's fused linear cross-entropy
(`LigerFusedLinearCrossEntropyLoss`: the output layer and the cross-entropy in one kernel, chunked, the logits never
materialised), on the positions that predict a response token. DPO and online RL keep their chunked log-probabilities
(models.response_logps): they need each token's log-probability, which the fused loss does not give.

Triton compiles for CUDA GPUs; elsewhere `model.kernels=liger` stops at start with one line. Triton's interpreter
(TRITON_INTERPRET=1) runs the fused loss on a CPU, slowly, which the tests use where liger-kernel is installed; the
interpreter cannot run Liger's RMSNorm and SwiGLU kernels, so there the model is left as it is.
"""

from __future__ import annotations

import os

import torch

from gpt4llm.errors import ConfigError, LaunchError

CHOICES = (None, "liger")


def check_choice(kernels: str | None) -> None:
    """An unknown model.kernels, or liger without liger-kernel installed: one line, before anything is built."""
    if kernels not in CHOICES:
        raise ConfigError(f"model.kernels={kernels!r}: choose liger (Liger's Triton kernels, GPUs) or null")
    if kernels == "liger":
        try:
            import liger_kernel.transformers  # noqa: F401
        except ImportError as err:
            raise ConfigError(
                f"model.kernels=liger needs Liger's kernels ({err}): pip install 'gpt4llm[liger]', or leave "
                "model.kernels unset"
            ) from None


def interpreted() -> bool:
    """Triton's interpreter (TRITON_INTERPRET=1): Triton kernels run on the CPU, in Python."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_device(device: torch.device) -> None:
    if device.type != "cuda" and not interpreted():
        raise LaunchError(
            f"model.kernels=liger: Liger's Triton kernels run on CUDA GPUs, and this run is on {device.type} "
            "(leave model.kernels unset there)"
        )


def apply_kernels(model) -> None:
    """Liger's RMSNorm, rotary embedding and SwiGLU in place of the model's own (not under Triton's interpreter). A
    model that transforms its logits (Gemma 2's soft cap, Cohere's scale) stops: the fused loss would skip that."""
    from gpt4llm.models.response_logps import logit_transforms

    transforms = logit_transforms(model)
    if transforms:
        raise ConfigError(
            f"model.kernels=liger: this model transforms its logits ({', '.join(transforms)}), which Liger's fused "
            "loss as used here does not apply; leave model.kernels unset for it"
        )
    if interpreted():
        return
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(
        model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False
    )


def sft_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean next-token loss over the supervised positions through Liger's fused linear cross-entropy, and how
    many positions those were. `model`: a causal LM, peft-wrapped or not, FSDP2-sharded or not."""
    from gpt4llm.models.response_logps import as_forward

    return as_forward(model, _sft_loss, model, batch)


def _sft_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    from gpt4llm.models.response_logps import final_hidden, supervised_positions

    targets, rows, positions, inputs = supervised_positions(batch)
    hidden = final_hidden(model, inputs, rows, positions)
    head = model.get_output_embeddings()
    weight = head.weight
    if torch.is_autocast_enabled(hidden.device.type):  # the kernel's matmul runs outside autocast: one dtype
        weight = weight.to(hidden.dtype)
    loss = LigerFusedLinearCrossEntropyLoss()(weight, hidden, targets[rows, positions], getattr(head, "bias", None))
    return loss, torch.tensor(len(rows), device=loss.device)
