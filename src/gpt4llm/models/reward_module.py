"""The reward model: a Hugging Face backbone with a scalar head, trained on preference pairs (the paper's RM).

The model is `AutoModelForSequenceClassification` with one label, so `save_pretrained`/`from_pretrained` carry the
head and the config; the statistics to normalise rewards (`reward_mean`, `reward_std` over the validation responses)
and the training length (`reward_max_length`) ride in that config. The reward, though, is read by
`sequence_rewards`, not by the model's own forward: Hugging Face pools at the rightmost token that is not the pad
id, which reads the wrong token when pad == EOS (it skips the final EOS); the attention mask is right whatever the
pad id and padding side.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric
from transformers import AutoModelForSequenceClassification, PreTrainedModel
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING,
)

from gpt4llm.models import adapters, model_card
from gpt4llm.models.base_module import HFBackboneModule
from gpt4llm.models.hf import quantized_loading, resize_embeddings_with_mean
from gpt4llm.models.response_logps import as_forward


def load_reward_model(
    path: str, tokenizer, dtype: str | None = None, gradient_checkpointing: bool = False, quantization=None
) -> PreTrainedModel:
    """A causal LM directory (or an exported reward model) with a one-output linear head, `score`, on top.

    From a causal LM the head is new (random, small); the LM head is left behind.
    """
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, dtype=getattr(torch, dtype) if dtype else None, **quantized_loading(quantization)
    )
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        resize_embeddings_with_mean(model, len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id  # for anyone who calls the exported model's own forward
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def sequence_rewards(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """One fp32 reward per row, read at the row's last attended token: right or left padding, any pad id."""
    return as_forward(model, _sequence_rewards, model, input_ids, attention_mask)


def _sequence_rewards(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    # Positions count real tokens only, so a left-padded row is read exactly like the same row right-padded
    # (models with absolute positions, like OPT, would otherwise see shifted positions).
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    hidden = model.base_model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state
    columns = torch.arange(attention_mask.size(-1), device=attention_mask.device)
    last = (columns * attention_mask.bool()).argmax(-1)  # the rightmost attended position
    return model.score(hidden[torch.arange(hidden.size(0), device=hidden.device), last]).squeeze(-1).float()


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(r_chosen - r_rejected), averaged over pairs, in fp32 (the paper's loss with its sign restored)."""
    return -F.logsigmoid(chosen.float() - rejected.float()).mean()


class RewardModule(HFBackboneModule):
    """Batches hold 2B sequences: B chosen, then their B rejected (gpt4llm.data.pair_datamodule.PairCollator)."""

    auto_mapping = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING
    sequences_per_example = 2  # a pair: chosen and rejected in one forward pass (the memory plan counts both)

    def __init__(self, *args, max_length: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)  # HFBackboneModule's settings
        self.max_length = max_length  # recorded in the export, so scoring truncates as training did
        self.val_loss, self.val_acc, self.val_margin = MeanMetric(), MeanMetric(), MeanMetric()
        # First and second moments of every validation reward: mean and std, summed correctly across devices.
        self.val_reward, self.val_reward_sq = MeanMetric(), MeanMetric()

    peft_task_type = "SEQ_CLS"

    def load_backbone(self, quantization=None) -> PreTrainedModel:
        model = load_reward_model(
            self.model_path, self.tokenizer, self.dtype_name, self.gradient_checkpointing, quantization
        )
        model_card.write(model, reward_max_length=self.max_length)  # scoring truncates as training did
        return model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return sequence_rewards(adapters.backbone(self.model), input_ids, attention_mask)

    def _pairs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        # Chosen and rejected in one forward pass: one pass over the weights, and both see the same dropout mode.
        return self(batch["input_ids"], batch["attention_mask"]).chunk(2)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        chosen, rejected = self._pairs(batch)
        loss = pairwise_loss(chosen, rejected)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/rm_acc", (chosen > rejected).float().mean())
        self.log("train/lr", self.lr_schedulers().get_last_lr()[0])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        chosen, rejected = self._pairs(batch)
        pairs = chosen.numel()
        self.val_loss.update(pairwise_loss(chosen, rejected), weight=pairs)  # a mean over pairs, not of batch means
        self.val_acc.update((chosen > rejected).float())
        self.val_margin.update(chosen - rejected)
        rewards = torch.cat([chosen, rejected])
        self.val_reward.update(rewards)
        self.val_reward_sq.update(rewards.square())
        self.log("val/loss", self.val_loss, prog_bar=True)
        self.log("val/rm_acc", self.val_acc, prog_bar=True)
        self.log("val/rm_margin", self.val_margin)

    def on_validation_epoch_end(self) -> None:
        if self.val_reward.update_called and not self.trainer.sanity_checking:
            mean = self.val_reward.compute().item()
            std = math.sqrt(max(self.val_reward_sq.compute().item() - mean**2, 0.0))
            self.log_dict({"val/reward_mean": mean, "val/reward_std": std})
            # Exported with the model: score = (reward - reward_mean) / reward_std puts any RM on one scale.
            model_card.write(adapters.backbone(self.model), reward_mean=mean, reward_std=std)
        self.val_reward.reset()
        self.val_reward_sq.reset()
