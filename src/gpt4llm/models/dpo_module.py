"""Direct Preference Optimization (Rafailov et al. 2023) and its common variants on preference pairs: `task=dpo`.

The policy is a causal LM (an SFT export, or any), trained so that it prefers each pair's chosen response over the
rejected one more than a frozen reference does. A response's log-probability is the sum of its tokens' (the prompt's
are masked), on padded or packed batches alike (models.response_logps). With z = (log pi(c) - log ref(c)) - (log pi(r) -
log ref(r)):

    sigmoid   -log sigmoid(beta z)                                           the paper's DPO
              with label_smoothing e: -(1 - e) log sigmoid(beta z) - e log sigmoid(-beta z)   conservative DPO
    ipo       (z' - 1 / (2 beta))^2, z' with each log-ratio averaged over its response's tokens     IPO
    hinge     max(0, 1 - beta z)                                                   SLiC's hinge

The reference, `reference`:
    precomputed  its log-probabilities, from one pass over the pairs before training, cached beside the data (keyed by
                 the reference model's files and the data); only the policy is in memory while training (default)
    live         a frozen copy in memory, evaluated on every batch
    adapters     for a LoRA policy: the policy with its adapters disabled (the base), no copy

Metrics carry TRL's names (rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins, logps/chosen,
logps/rejected) under train/ and val/, with beta x log-ratio as the rewards.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import MeanMetric
from transformers import PreTrainedModel

from gpt4llm.errors import ConfigError
from gpt4llm.models import adapters
from gpt4llm.models.base_module import CausalLMModule
from gpt4llm.models.hf import load_causal_lm
from gpt4llm.models.response_logps import response_logps

LOSSES = ("sigmoid", "ipo", "hinge")
REFERENCES = ("precomputed", "live", "adapters")
METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


def preference_loss(
    chosen,
    rejected,
    ref_chosen,
    ref_rejected,
    loss: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    chosen_tokens=None,
    rejected_tokens=None,
) -> torch.Tensor:
    """The per-pair loss from the four summed log-probabilities (module docstring)."""
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    z = chosen_ratio - rejected_ratio
    if loss == "sigmoid":
        return -(1 - label_smoothing) * F.logsigmoid(beta * z) - label_smoothing * F.logsigmoid(-beta * z)
    if loss == "ipo":  # log-ratios averaged over each response's tokens, as TRL and the IPO authors do it
        averaged = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        return (averaged - 1 / (2 * beta)) ** 2
    if loss == "hinge":
        return torch.relu(1 - beta * z)
    raise ConfigError(f"task.loss={loss!r}: choose one of {', '.join(LOSSES)}")


class DPOModule(CausalLMModule):
    """Batches: data.collators.PairCollator's 2B sequences (B chosen, then B rejected) with labels, padded or packed,
    and with the precomputed reference, `pair_index` (the reference is data.reference_logps[split][pair_index])."""

    def __init__(
        self,
        *args,
        loss: str = "sigmoid",
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        reference: str = "precomputed",
        reference_path: str | None = None,
        cache_dir: str = "data/cache",
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)  # CausalLMModule's settings
        if loss not in LOSSES:
            raise ConfigError(f"task.loss={loss!r}: choose one of {', '.join(LOSSES)}")
        if reference not in REFERENCES:
            raise ConfigError(f"task.reference={reference!r}: choose one of {', '.join(REFERENCES)}")
        if reference == "adapters" and not adapters.active(self.peft):
            raise ConfigError(
                "task.reference=adapters needs a LoRA policy (peft=lora or qlora): the base with its "
                "adapters disabled is the reference. Without adapters use precomputed or live"
            )
        if not 0 <= label_smoothing < 0.5 or beta <= 0:
            raise ConfigError(f"task.beta={beta} must be > 0 and task.label_smoothing={label_smoothing} in [0, 0.5)")
        self.loss_name, self.beta, self.label_smoothing = loss, beta, label_smoothing
        self.reference, self.reference_path = reference, reference_path or self.model_path
        self.cache_dir = cache_dir
        self.reference_model: PreTrainedModel | None = None
        self.val_metrics = torch.nn.ModuleDict({k.replace("/", "_"): MeanMetric() for k in ("loss", *METRICS)})

    def load_reference(self) -> PreTrainedModel:
        model = load_causal_lm(self.reference_path, self.tokenizer, self.dtype_name, False, self.attn_implementation)
        return model.eval().requires_grad_(False)

    # --- the reference --------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.reference == "precomputed" and self.trainer is not None and self.trainer.datamodule is not None:
            self.precompute_reference(self.trainer.datamodule)

    def configure_model(self) -> None:
        super().configure_model()
        if self.reference == "live" and self.reference_model is None:
            self.reference_model = self.load_reference()

    def precompute_reference(self, data) -> None:
        """The reference's log-probabilities of every pair, computed once (rank 0, on this process's device) and
        cached under cache_dir by the reference's files and the splits; every rank reads the cache."""
        if data.reference_columns:  # setup runs for each stage (validate, fit): once is enough
            return
        strategy = self.trainer.strategy
        files = (
            sorted(p for p in Path(self.reference_path).glob("*") if p.is_file())
            if Path(self.reference_path).is_dir()
            else []
        )
        identity = {
            "reference": str(self.reference_path),
            "files": [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files],
            "splits": {name: split._fingerprint for name, split in data.splits.items()},
            "max_length": data.max_length,
            "template": data.template,
            "precision": str(self.trainer.precision),
        }
        key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]
        target = Path(self.cache_dir) / f"dpo-reference-{key}.json"
        if strategy.is_global_zero and not target.exists():
            from gpt4llm.io import atomic

            model = self.in_training_precision(self.load_reference().to(strategy.root_device))
            with self.trainer.precision_plugin.forward_context():
                splits = [name for name, split in data.splits.items() if len(split)]
                values = {name: self.reference_pass(model, data, name) for name in splits}
            atomic.write_text(target, json.dumps(values))
            del model
            rank_zero_info(f"Reference log-probabilities of {sum(len(v[0]) for v in values.values())} pairs: {target}")
        strategy.barrier("dpo-reference")
        for name, (chosen, rejected) in json.loads(target.read_text()).items():
            data.set_reference_logps(name, chosen, rejected)

    def in_training_precision(self, model: PreTrainedModel) -> PreTrainedModel:
        """The reference in the dtype the policy's forward runs in, so that at step 0 the policy's log-probabilities
        equal the reference's and the loss is exactly ln 2: DeepSpeed's 16-bit modes cast the weights themselves
        (Lightning's autocast covers the rest, through the precision plugin's forward context)."""
        from lightning.pytorch.plugins.precision.deepspeed import DeepSpeedPrecision

        plugin = self.trainer.precision_plugin
        if isinstance(plugin, DeepSpeedPrecision) and plugin.precision in ("16-mixed", "bf16-mixed"):
            return model.to(plugin._desired_dtype)
        return plugin.convert_module(model)

    @torch.no_grad()
    def reference_pass(self, model, data, split: str) -> tuple[list[float], list[float]]:
        from tqdm.auto import tqdm

        chosen, rejected = [], []
        loader = data.reference_loader(split, data.eval_batch_size)
        for batch in tqdm(loader, desc=f"Reference log-probabilities ({split})", disable=not len(loader) > 1):
            batch = {k: v.to(model.device) for k, v in batch.items()}
            c, r = response_logps(model, batch)[0].chunk(2)  # as the policy's in training: the same numerics
            chosen += c.tolist()
            rejected += r.tolist()
        return chosen, rejected

    # --- the loss ---------------------------------------------------------------------------------------------------
    def reference_logps(self, batch, split: str) -> torch.Tensor:
        if self.reference == "precomputed":
            table = self.trainer.datamodule.reference_logps[split].to(batch["pair_index"].device)
            return table[batch["pair_index"]].T.reshape(-1)  # the chosen, then the rejected
        with torch.no_grad():
            if self.reference == "adapters":
                with self.model.disable_adapter():
                    return response_logps(self.model, batch)[0]
            return response_logps(self.reference_model, batch)[0]

    def step(self, batch: dict[str, torch.Tensor], split: str = "train") -> dict[str, torch.Tensor]:
        policy, tokens = response_logps(self.model, batch)
        reference = self.reference_logps(batch, split).to(policy)
        (chosen, rejected), (ref_chosen, ref_rejected) = policy.chunk(2), reference.chunk(2)
        chosen_tokens, rejected_tokens = tokens.chunk(2)
        losses = preference_loss(
            chosen,
            rejected,
            ref_chosen,
            ref_rejected,
            self.loss_name,
            self.beta,
            self.label_smoothing,
            chosen_tokens,
            rejected_tokens,
        )
        chosen_rewards = self.beta * (chosen - ref_chosen).detach()
        rejected_rewards = self.beta * (rejected - ref_rejected).detach()
        return {
            "loss": losses.mean(),
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": chosen.detach().mean(),
            "logps/rejected": rejected.detach().mean(),
            "pairs": torch.tensor(len(chosen)),
        }

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self.step(batch)
        self.log("train/loss", out["loss"], prog_bar=True)
        self.log_dict({f"train/{k}": out[k] for k in METRICS})
        self.log("train/lr", self.lr_schedulers().get_last_lr()[0])
        return out["loss"]

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        out = self.step(batch, "validation")
        for key in ("loss", *METRICS):  # means over pairs of the whole split, not of batch means
            metric = self.val_metrics[key.replace("/", "_")]
            metric.update(out[key], weight=out["pairs"])
            self.log(f"val/{key}", metric, prog_bar=key in ("loss", "rewards/accuracies"))

    def on_validation_epoch_end(self) -> None:
        self.validated_at_step = self.global_step
