"""Supervised fine-tuning of a Hugging Face causal LM: masked token cross-entropy (optimizer and schedule: base).

The loss runs the output layer and the cross-entropy on chunks of the supervised positions, each chunk recomputed in
backward (models.response_logps, DPO's and online RL's path), so a batch's vocabulary-wide logits never exist at once:
what TRL's SFT and Liger's fused linear cross-entropy save, in plain torch; only when a batch supervises more positions
than one chunk (below that, recomputing would cost time and save nothing). The same loss and gradients as the whole
logits (tests/test_sft_loss.py); `chunked_loss=false` computes those instead (transformers' logits_to_keep on the
supervised positions), as FSDP (1) does: its root unit's output layer is gathered by the model's own forward only
(FSDP2 runs the chunks inside that forward: response_logps.as_forward)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric

from gpt4llm.data.encoding import IGNORE_INDEX
from gpt4llm.models import liger, response_logps
from gpt4llm.models.base_module import CausalLMModule
from gpt4llm.models.response_logps import labelled_token_logps


def token_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of each position's logits against its target (in fp32) over the supervised targets, and
    how many those were."""
    loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX)
    return loss, (targets != IGNORE_INDEX).sum()


def predicting_positions(labels: torch.Tensor) -> torch.Tensor:
    """The positions whose next token some row of the batch is trained on. Logits elsewhere (the prompts, padding)
    add nothing to the loss; for a packed row these are exactly its supervised tokens."""
    return (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().flatten()


class SFTModule(CausalLMModule):
    def __init__(self, *args, chunked_loss: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)  # CausalLMModule's settings
        self.chunked_loss = chunked_loss
        self.val_loss = MeanMetric()

    @classmethod
    def loss_chunk(cls, settings) -> int | None:
        return response_logps.TOKEN_CHUNK if settings.get("chunked_loss", True) else None

    def forward(self, batch: dict[str, torch.Tensor], logits_to_keep: int | torch.Tensor = 0) -> torch.Tensor:
        # A padded batch has an attention mask; a packed one has position ids instead (data.collators.PackedCollator).
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
        if self.kernels == "liger":  # Liger's fused output layer and cross-entropy (models.liger)
            return liger.sft_loss(self.model, batch)
        strategy = getattr(self._trainer, "strategy", None)  # None: called outside a Trainer (tests, tools)
        supervised = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        # Chunks only where the logits would exceed one chunk: below it, the recomputation would cost time for no
        # memory (the plan's loss_bytes counts min(tokens, chunk) either way)
        if self.chunked_loss and supervised > response_logps.TOKEN_CHUNK and type(strategy).__name__ != "FSDPStrategy":
            token_logps = labelled_token_logps(self.model, batch)[0]
            return -token_logps.mean(), torch.tensor(token_logps.numel(), device=token_logps.device)
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
