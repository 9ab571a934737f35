"""What the SFT, reward-model and DPO LightningModules share: a Hugging Face backbone built where the strategy wants it,
AdamW of the implementation the strategy needs, and warmup followed by the configured schedule."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from transformers import PreTrainedModel, get_scheduler
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from gpt4llm.data.formats import resolve_format
from gpt4llm.errors import CheckpointError
from gpt4llm.models import adapters, liger, model_card
from gpt4llm.models.hf import added_token_ids, import_model_code, load_causal_lm
from gpt4llm.models.optim import (
    CHOICES,
    build_adamw,
    decay_parameter_names,
    optimizer_choice,
    parameter_groups,
    strategy_offloads_optimizer,
)
from gpt4llm.models.zero3 import hf_deepspeed_config


class HFBackboneModule(L.LightningModule):
    """Subclasses say how to load their backbone (`load_backbone`) and add their loss and metrics.

    `optimizer` holds AdamW's hyperparameters (lr, betas, eps, weight_decay); which AdamW runs them follows the
    strategy (gpt4llm.models.optim).
    """

    auto_mapping: Any = None  # transformers' auto mapping of the backbone's class (for import_model_code)
    # What the task is, for what sizes a run from its config before building it (gpt4llm.training.memory_plan):
    sequences_per_example = 1  # sequences one example puts through a forward pass

    @classmethod
    def sequences_for(cls, settings) -> int:
        """The sequences one example puts through a forward pass under these task settings."""
        return cls.sequences_per_example

    @classmethod
    def loss_chunk(cls, settings) -> int | None:
        """Positions whose vocabulary-wide logits the loss holds at once (None: all of the batch's)."""
        return None

    @classmethod
    def keeps_frozen_copy(cls, settings) -> bool:
        """Whether a run with these task settings (its `task` config) holds a frozen copy of the backbone in memory
        beside the one that trains."""
        return False

    @classmethod
    def precomputes_reference(cls, settings) -> bool:
        """Whether a run with these task settings makes a forward pass over its data before step 1."""
        return False

    def __init__(
        self,
        tokenizer,
        model_path: str,
        optimizer: dict[str, Any],
        lr_scheduler: str = "cosine",
        warmup_ratio: float = 0.03,
        dtype: str | None = None,
        gradient_checkpointing: bool = False,
        template: str = "alpaca",
        peft: dict | None = None,
        kernels: str | None = None,
    ) -> None:
        super().__init__()
        liger.check_choice(kernels)  # at start, before the run makes its directories
        self.kernels = kernels  # model.kernels: liger, or null (transformers' own modules)
        self.tokenizer = tokenizer
        # LoRA / QLoRA settings (models.adapters; conf/peft): only the adapters (and a reward head) train, checkpoints
        # hold them alone (strict_loading off: the frozen base comes from model_path, not from the checkpoint)
        self.peft = adapters.plain(peft)
        self.strict_loading = not adapters.active(self.peft)
        if adapters.active(self.peft):  # at start, before the run makes its directories
            adapters.check_targets(model_path, self.auto_mapping, self.peft["target_modules"])
        # data.formats: how prompts are rendered (`auto` decided against this tokenizer), recorded in the export
        self.prompt_format = resolve_format(template, tokenizer).format
        self.model_path, self.dtype_name, self.gradient_checkpointing = model_path, dtype, gradient_checkpointing
        self.optimizer_settings = dict(optimizer)
        self.lr_scheduler, self.warmup_ratio = lr_scheduler, warmup_ratio
        self.model: PreTrainedModel | None = None
        # the step of the last validation, kept here by training.callbacks.LastValidation (train asks the callback)
        self.validated_at_step: int | None = None

    peft_task_type = "CAUSAL_LM"  # peft's task type of the backbone

    def load_backbone(self, quantization=None) -> PreTrainedModel:
        """The transformers model, its weights in 4 bits where `quantization` (a BitsAndBytesConfig) says so."""
        raise NotImplementedError

    def load_base_for_merge(self) -> PreTrainedModel:
        """The backbone as training started from it, whole on this process's CPU in fp32, for the export to merge the
        trained adapter into: a QLoRA base is loaded in 4 bits as trained and dequantized (so the merged weights are
        the ones the adapter was trained against), then cast to fp32."""
        from gpt4llm.models.zero3 import transformers_zero3_off

        with transformers_zero3_off():
            base = self.load_backbone(adapters.quantization_config(self.peft))
        if getattr(base, "is_loaded_in_4bit", False):
            base = base.dequantize()
        return base.float().cpu()

    def setup(self, stage: str) -> None:
        # Lightning calls configure_model inside deepspeed.zero.Init under ZeRO-3, where a first import of the model's
        # code (and of torch._dynamo with it) fails; import it here, before.
        import_model_code(self.model_path, self.auto_mapping)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A checkpoint of another model (another size, vocabulary or architecture) stops with what differs, before
        torch's "size mismatch". DeepSpeed's checkpoints carry no state_dict here: DeepSpeed checks its own."""
        theirs = checkpoint.get("state_dict")
        if not theirs:
            return
        ours = self.state_dict()
        if adapters.active(self.peft):  # the checkpoint holds the adapters: the base comes from model_path
            ours = {k: v for k, v in ours.items() if k in adapters.trainable_names(self)}
        missing = sorted(set(ours) - set(theirs))
        wrong = [
            (k, tuple(v.shape), tuple(ours[k].shape))
            for k, v in theirs.items()
            if k in ours and ours[k].numel() and v.shape != ours[k].shape
        ]
        if wrong or missing:
            first = (
                f"{wrong[0][0]} is {list(wrong[0][1])} there, {list(wrong[0][2])} here"
                if wrong
                else f"it has no {missing[0]}"
            )
            raise CheckpointError(
                f"ckpt_path: the checkpoint is for another model ({first}; {len(wrong)} shapes differ, {len(missing)} "
                f"tensors missing). Resume with the model and tokenizer it was trained with "
                f"(model.path={self.model_path} now)."
            )

    def configure_model(self) -> None:
        # Built here rather than in __init__ so that sharded strategies can take over its construction.
        if self.model is None:
            # Under DeepSpeed ZeRO-3 Lightning calls this inside deepspeed.zero.Init. Registering the config with
            # transformers (kept for the run: it holds a weak reference) makes from_pretrained load the checkpoint into
            # the partitioned model, rank 0 reading it and every rank keeping its shard, instead of materialising the
            # whole model on every rank; None under any other strategy.
            self._zero3_config = hf_deepspeed_config(self._trainer.strategy if self._trainer is not None else None)
            model = self.load_backbone(adapters.quantization_config(self.peft))
            if self.kernels == "liger":
                liger.check_device(self._trainer.strategy.root_device if self._trainer is not None else model.device)
                liger.apply_kernels(model)
            adapter = self.peft if adapters.active(self.peft) else None
            model_card.record_training(model, self.tokenizer, self.prompt_format, self.model_path, adapter)
            # the rows of tokens this run added (a pad token, a template's <|im_end|>) train with the adapters:
            # frozen at the mean embedding, a new end-of-turn token could never be preferred
            added = added_token_ids(self.model_path, self.tokenizer) if adapter else []
            self.model = adapters.wrap(
                model, self.peft, self.peft_task_type, self.gradient_checkpointing, new_token_ids=added
            )
            self.model.train()  # from_pretrained returns it in eval mode, and Lightning keeps a submodule's mode
            trainable, total = adapters.parameter_counts(self.model)
            checkpointing = "on" if self.gradient_checkpointing else "off"
            rank_zero_info(
                f"Parameters: {trainable:,} trainable of {total:,} ({100 * trainable / total:.2f}%); "
                f"gradient checkpointing {checkpointing} (model.gradient_checkpointing)"
            )
            self._shard(self.model)

    def _shard(self, model):
        """Hands a model built in configure_model (the policy, a live reference) to a strategy that shards it there
        (FSDP2: training.strategies.FSDP2Strategy); collective: every rank calls it. Returns the model."""
        shard = getattr(self._trainer.strategy, "shard_model", None) if self._trainer is not None else None
        if shard is not None:
            shard(model)
        return model

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """An adapter run's checkpoint keeps the tensors that train (and their optimizer state), not the frozen base
        (under DeepSpeed, whose engine writes the weights itself, train sets exclude_frozen_parameters)."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        # FSDP2's sharded checkpoints load the whole model's state back (torch.distributed.checkpoint): they keep it
        if adapters.active(self.peft) and "state_dict" in checkpoint and getattr(strategy, "loads_partial_state", True):
            keep = adapters.trainable_names(self)
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def configure_optimizers(self):
        settings = dict(self.optimizer_settings)
        weight_decay = settings.pop("weight_decay", 0.0)
        groups = parameter_groups(self.model, weight_decay)
        strategy = self.trainer.strategy
        requested = settings.pop("implementation", "auto")
        choice = optimizer_choice(strategy_offloads_optimizer(strategy), strategy.root_device.type, requested)
        optimizer = build_adamw(groups, choice, **settings)
        trainable = adapters.trainable_names(self.model)
        decayed = len(decay_parameter_names(self.model) & trainable)
        rank_zero_info(
            f"Optimizer: {CHOICES[choice]}, lr {settings['lr']:g}, weight decay {weight_decay:g} on {decayed} of "
            f"{sum(len(g['params']) for g in groups)} parameter tensors (never on biases and norms)"
        )
        total = schedule_length(self.trainer)
        scheduler = get_scheduler(self.lr_scheduler, optimizer, math.ceil(self.warmup_ratio * total), total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def schedule_length(trainer) -> int:
    """The run's optimizer steps, counted as Lightning's `trainer.estimated_stepping_batches` counts them, but from
    the data module's batch count: that property builds the training loader, and a loader built before the checkpoint
    is restored loses its saved position (gpt4llm.data.base_datamodule)."""
    batches_per_epoch = getattr(trainer.datamodule, "batches_per_epoch", None)
    if batches_per_epoch is None:  # data not from our data modules
        return trainer.estimated_stepping_batches
    batches = batches_per_epoch(trainer.world_size) if trainer.max_epochs != -1 else 0
    return optimizer_steps(
        batches, trainer.accumulate_grad_batches, trainer.max_epochs, trainer.max_steps, trainer.limit_train_batches
    )


def optimizer_steps(
    batches_per_epoch: int, accumulation: int, max_epochs: int | None, max_steps: int, limit_batches: int | float = 1.0
) -> int:
    """Optimizer steps of a run, as Lightning counts them: each epoch's batches (cut by `limit_train_batches`), one
    step per `accumulation` of them plus one for a remainder, over the epochs, and no more than `max_steps` (-1: no
    limit). The one count both the LR schedule and `python -m gpt4llm.plan` use."""
    if max_epochs == -1 or max_epochs is None:
        return max_steps
    batches = (
        int(batches_per_epoch * limit_batches)
        if isinstance(limit_batches, float)
        else min(batches_per_epoch, int(limit_batches))
    )
    steps = math.ceil(batches / accumulation) * max(max_epochs, 1)
    return min(steps, max_steps) if max_steps != -1 else steps


class CausalLMModule(HFBackboneModule):
    """A causal LM backbone (SFT, DPO); `attn_implementation` picks transformers' attention (models.attention's
    sdpa_varlen for packed rows)."""

    auto_mapping = MODEL_FOR_CAUSAL_LM_MAPPING
    peft_task_type = "CAUSAL_LM"

    def __init__(self, *args, attn_implementation: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)  # HFBackboneModule's settings
        self.attn_implementation = attn_implementation

    def load_backbone(self, quantization=None) -> PreTrainedModel:
        return load_causal_lm(
            self.model_path,
            self.tokenizer,
            self.dtype_name,
            self.gradient_checkpointing,
            self.attn_implementation,
            quantization,
        )

    # --- a frozen copy: DPO's reference, online RL's KL reference ---------------------------------------------------
    def load_frozen_copy(self, path: str) -> PreTrainedModel:
        """The causal LM at `path`, frozen, in eval mode. Under QLoRA it is built as the policy's base is: loaded in 4
        bits and prepared and wrapped by the same code (models.adapters.wrap, its adapters untrained), and run with the
        adapters disabled, so that it computes with the very 4-bit weights the policy trains on (a full-precision
        reference would differ from the policy at step 0: DPO's loss 0.6899, not ln 2)."""
        quantization = adapters.quantization_config(self.peft)
        model = load_causal_lm(path, self.tokenizer, self.dtype_name, False, self.attn_implementation, quantization)
        if self.kernels == "liger":  # the policy's kernels, so that it equals its reference at step 0
            liger.apply_kernels(model)
        if quantization is not None:
            added = added_token_ids(path, self.tokenizer)
            model = adapters.wrap(model, self.peft, self.peft_task_type, False, new_token_ids=added)
        model.eval().requires_grad_(False)
        if quantization is not None:
            keep_4bit_training_kernels(model)
        return model

    def quantization_settings(self) -> dict | None:
        """The 4-bit settings of a QLoRA base (peft.quantization), None for a base in its own dtype."""
        return dict((self.peft or {}).get("quantization") or {}) or None

    def train(self, mode: bool = True):
        """Lightning's train and eval of the whole module: a frozen copy (`reference_model`) stays in eval mode (no
        dropout, as a precomputed reference was computed), and 4-bit layers keep the kernel they train with
        (`keep_4bit_training_kernels`)."""
        super().train(mode)
        if getattr(self, "reference_model", None) is not None:
            self.reference_model.eval()
        if getattr(self, "peft", None) and self.quantization_settings() is not None:
            keep_4bit_training_kernels(self)
        return self


def keep_4bit_training_kernels(model) -> None:
    """bitsandbytes' 4-bit layers, on a CPU with AVX512-BF16, repack their weights for another kernel on their first
    forward in eval mode without gradients (and keep them packed), whose numbers differ from the training kernel's by
    ~1e-3: a reference computed in eval mode would then differ from the policy at step 0. Kept in training mode (a
    4-bit layer holds no dropout: its mode chooses the kernel alone), the policy and its reference run one kernel.
    Nothing changes on a GPU, where the mode chooses nothing."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):  # bitsandbytes' own layer, not peft's LoRA layer around it
            module.training = True
