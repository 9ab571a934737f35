"""Supervised fine-tuning of a Hugging Face causal LM: masked token cross-entropy, AdamW, warmup + schedule."""

from __future__ import annotations

import math
from collections.abc import Callable

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric
from transformers import get_scheduler

from gpt4llm.data.sft import IGNORE_INDEX
from gpt4llm.models.hf import load_causal_lm
from gpt4llm.strategies import hf_deepspeed_config


def token_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of each position's logits against its target (in fp32) over the supervised targets, and
    how many those were."""
    loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX)
    return loss, (targets != IGNORE_INDEX).sum()


def predicting_positions(labels: torch.Tensor) -> torch.Tensor:
    """The positions whose next token some row of the batch is trained on. Logits elsewhere (the prompts, padding)
    add nothing to the loss; for a packed row these are exactly its supervised tokens."""
    return (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().flatten()


class SFTModule(L.LightningModule):
    def __init__(
        self,
        tokenizer,
        model_path: str,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_scheduler: str = "cosine",
        warmup_ratio: float = 0.03,
        dtype: str | None = None,
        gradient_checkpointing: bool = False,
        attn_implementation: str | None = None,
    ) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.model_path, self.dtype_name, self.gradient_checkpointing = model_path, dtype, gradient_checkpointing
        self.attn_implementation = attn_implementation
        self.optimizer_factory, self.lr_scheduler, self.warmup_ratio = optimizer, lr_scheduler, warmup_ratio
        self.model = None
        self.val_loss = MeanMetric()
        self.validated_at_step: int | None = None  # lets `train` add a final validation when fit did not end on one

    def configure_model(self) -> None:
        # Built here rather than in __init__ so that sharded strategies can take over its construction.
        if self.model is None:
            # Under DeepSpeed ZeRO-3 Lightning calls this inside deepspeed.zero.Init. Registering the config with
            # transformers (kept for the run: it holds a weak reference) makes from_pretrained load the checkpoint into
            # the partitioned model, rank 0 reading it and every rank keeping its shard, instead of materialising the
            # whole model on every rank; None under any other strategy.
            self._zero3_config = hf_deepspeed_config(self._trainer.strategy if self._trainer is not None else None)
            self.model = load_causal_lm(
                self.model_path, self.tokenizer, self.dtype_name, self.gradient_checkpointing, self.attn_implementation
            )
            self.model.train()  # from_pretrained returns it in eval mode, and Lightning keeps a submodule's mode

    def forward(self, batch: dict[str, torch.Tensor], logits_to_keep: int | torch.Tensor = 0) -> torch.Tensor:
        # A padded batch has an attention mask; a packed one has position ids instead (see data.sft.PackedCollator).
        return self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            position_ids=batch.get("position_ids"),
            use_cache=False,  # also required for packing: transformers reads packed position ids only without a cache
            logits_to_keep=logits_to_keep,  # 0: every position
        ).logits

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The masked next-token loss, computing the output layer and softmax only where a target is supervised
        (transformers' logits_to_keep): the same loss, without the vocabulary-wide logits of prompt tokens."""
        keep = predicting_positions(batch["labels"])
        return token_loss(self(batch, logits_to_keep=keep), batch["labels"][:, 1:][:, keep])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _ = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.lr_schedulers().get_last_lr()[0])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, tokens = self.loss(batch)
        self.val_loss.update(loss, weight=tokens)  # a per-token mean over the whole split, not a mean of batch means
        self.log("val/loss", self.val_loss, prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        self.log("val/ppl", torch.exp(self.val_loss.compute()))
        self.validated_at_step = self.global_step

    def configure_optimizers(self):
        # No weight decay on biases and norms, as Hugging Face's Trainer (and so stanford_alpaca) does.
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if param.requires_grad:
                (no_decay if param.ndim < 2 else decay).append(param)
        optimizer = self.optimizer_factory([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}])
        total = self.trainer.estimated_stepping_batches
        scheduler = get_scheduler(self.lr_scheduler, optimizer, math.ceil(self.warmup_ratio * total), total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
