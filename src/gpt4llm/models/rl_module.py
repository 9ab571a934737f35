"""Online RL on prompts, the step the paper names after its reward model: `task=grpo` (Shao et al. 2024) and
`task=rloo` (Ahmadian et al. 2024), with TRL's settings, numbers (models.policy_gradient) and metric names.

Each training step, for its batch of prompts (data.prompt_datamodule):
1. rollout: `num_generations` completions per prompt from the current policy, through the generation engine
   (models.engine: continuous batching over the KV cache), sampled with temperature/top_p/top_k and seeded per
   (epoch, prompt, generation), so that a resumed run samples what the uninterrupted one would have;
2. reward: every source of `reward` (models.rewards: a function, the paper's reward model), their weighted sum;
3. advantages: group-relative (GRPO: minus the group's mean, divided by `scale_rewards`' deviation; RLOO: minus the
   mean of the other completions of the prompt, the reward first less beta x the sequence's log-ratio to the
   reference);
4. the clipped policy-gradient loss over the completion tokens (a stop id that ended a completion included, so that
   stopping is learned; `mask_truncated_completions`: completions cut at max_completion_length count nothing).

With `num_iterations` > 1 the data module yields each generation's prompts that many times in a row and the
completions are reused, the ratio taken against the log-probabilities they were sampled with (`epsilon`,
`epsilon_high` clip it). With `beta` > 0 a KL penalty to a frozen reference: a live copy (`reference=live`), or for
a LoRA policy the base with its adapters off (`reference=adapters`, no copy). Rollouts and their log-probabilities
are kept in checkpoints while reused, so that a resume between two iterations goes on with the same ones.

Validation: one sampled completion per held-out prompt (seeded by the prompt alone, so every validation samples
alike), its mean reward and length logged as val/reward, val/rewards/<name>/mean, val/completions/mean_length.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import MeanMetric

from gpt4llm.data.encoding import IGNORE_INDEX
from gpt4llm.errors import ConfigError
from gpt4llm.models import adapters
from gpt4llm.models.base_module import CausalLMModule, keep_4bit_training_kernels
from gpt4llm.models.decoding import request_seed, stop_ids
from gpt4llm.models.engine import EOS, LENGTH, Engine, Request, Sampling
from gpt4llm.models.policy_gradient import (
    LOSS_TYPES,
    SCALE_REWARDS,
    STD_EPS,
    grpo_advantages,
    grpo_loss,
    masked_mean,
    rloo_advantages,
    rloo_loss,
)
from gpt4llm.models.response_logps import TOKEN_CHUNK, labelled_token_logps
from gpt4llm.models.rewards import Reward, build_rewards, score_completions

REFERENCES = ("live", "adapters")
DEFAULT_REWARD = {"kind": "function", "fn": "gpt4llm.models.reward_functions:reference_f1"}
TABLE_ROWS = 8  # sampled completions per logged table


class OnlineRLModule(CausalLMModule):
    """What GRPO and RLOO share (module docstring); subclasses give the advantages and the loss."""

    trains_on = "prompts"  # train builds data.prompt_datamodule.PromptDataModule from the data config
    method = ""

    @classmethod
    def sequences_for(cls, settings) -> int:
        return int(settings.get("num_generations") or 8)  # a prompt's group, trained in one forward pass

    @classmethod
    def loss_chunk(cls, settings) -> int | None:
        return TOKEN_CHUNK  # labelled_token_logps: the output layer on chunks of positions

    @classmethod
    def keeps_frozen_copy(cls, settings) -> bool:
        return bool(settings.get("beta")) and settings.get("reference", "live") == "live"

    def __init__(
        self,
        *args,
        reward: dict | None = None,
        num_generations: int = 8,
        max_completion_length: int = 256,
        max_prompt_length: int | None = None,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        num_iterations: int = 1,
        epsilon: float = 0.2,
        epsilon_high: float | None = None,
        beta: float = 0.0,
        reference: str = "live",
        reference_path: str | None = None,
        mask_truncated_completions: bool = False,
        generation_rows: int = 64,
        seed: int = 0,
        log_completions_every: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)  # CausalLMModule's settings
        if isinstance(num_generations, bool) or not isinstance(num_generations, int) or num_generations < 2:
            raise ConfigError(
                f"task.num_generations={num_generations}: a group needs at least 2 completions per prompt (its "
                f"advantages compare them; 8 is usual)"
            )
        if (
            isinstance(max_completion_length, bool)
            or not isinstance(max_completion_length, int)
            or max_completion_length < 1
        ):
            raise ConfigError(f"task.max_completion_length={max_completion_length}: a number of tokens above 0")
        if not isinstance(num_iterations, int) or num_iterations < 1:
            raise ConfigError(f"task.num_iterations={num_iterations}: updates per generation, 1 or more")
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ConfigError(f"task.temperature={temperature}: above 0 (online RL samples its completions)")
        if reference not in REFERENCES:
            raise ConfigError(f"task.reference={reference!r}: choose one of {', '.join(REFERENCES)}")
        if beta and reference == "adapters" and not adapters.active(self.peft):
            raise ConfigError(
                "task.reference=adapters needs a LoRA policy (peft=lora or qlora): the base with its adapters "
                "disabled is the reference. Without adapters use reference=live"
            )
        # no reward= chosen: the demo's (word-overlap F1 with the record's reference answer), said at start
        self.reward_settings = dict(reward or DEFAULT_REWARD)
        self.num_generations, self.max_completion_length = num_generations, max_completion_length
        self.max_prompt_length = max_prompt_length
        self.sampling = Sampling(float(temperature), float(top_p), int(top_k))
        self.num_iterations, self.beta = num_iterations, float(beta)
        self.epsilon_low = float(epsilon)
        self.epsilon_high = float(epsilon if epsilon_high is None else epsilon_high)
        self.reference, self.reference_path = reference, reference_path or self.model_path
        self.mask_truncated_completions = mask_truncated_completions
        self.generation_rows, self.seed = generation_rows, seed
        self.log_completions_every = log_completions_every
        self.rewards: list[Reward] | None = None  # loaded in setup: a reward model on this process's device
        self.reward_factories: dict | None = None  # kinds built above this layer (the judge): set by the train command
        self.reference_model = None
        self.trained_batch: dict[str, torch.Tensor] | None = None
        self.rollouts: dict[str, dict[str, Any]] = {}  # reused by the next num_iterations - 1 steps (and checkpoints)
        self.val_metrics = torch.nn.ModuleDict()

    # --- set-up -------------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.rewards is None:
            device = self.trainer.strategy.root_device if self._trainer is not None else None
            self.rewards = build_rewards(self.reward_settings, device, self.reward_factories)
            names = ", ".join(f"{r.name} (x{r.weight:g})" for r in self.rewards)
            rank_zero_info(
                f"{self.method.upper()}: {self.num_generations} completions per prompt, at most "
                f"{self.max_completion_length} tokens, rewards {names}; "
                + (f"KL to the reference (beta {self.beta:g}, {self.reference})" if self.beta else "no KL (beta 0)")
            )
        for name in ["reward", "completions/mean_length", *(f"rewards/{r.name}/mean" for r in self.rewards)]:
            key = name.replace("/", "_")
            if key not in self.val_metrics:
                self.val_metrics[key] = MeanMetric()

    def configure_model(self) -> None:
        super().configure_model()
        if self.beta and self.reference == "live" and self.reference_model is None:
            self.reference_model = self._shard(self.load_frozen_copy(self.reference_path))

    # --- rollouts -------------------------------------------------------------------------------------------------
    def stop_ids(self) -> list[int]:
        ids = [*self.prompt_format.stop_ids(self.tokenizer), *stop_ids(self.model, self.tokenizer)]
        return list(dict.fromkeys(ids))

    def sample(self, rows: list[dict], generations: int, keys: list) -> list:
        """`generations` completions of each row's prompt from the current policy, in row order (sample g of row i
        at i * generations + g), each drawn with the seed of (task.seed, its key, g)."""
        requests = [
            Request(
                tuple(row["input_ids"]),
                self.max_completion_length,
                self.sampling,
                request_seed(self.seed, key, g),
            )
            for row, key in zip(rows, keys)
            for g in range(generations)
        ]
        engine = Engine(self.model, self.tokenizer, self.stop_ids(), max_rows=self.generation_rows)
        if self.quantization_settings() is not None:  # the policy's 4-bit layers stay on the kernel it trains with
            engine.after_eval = keep_4bit_training_kernels
        completions: list = [None] * len(requests)
        for k, completion in engine.run(requests):
            completions[k] = completion
        return completions

    def rollout(self, rows: list[dict], generations: int, keys: list, split: str) -> dict[str, Any]:
        """Completions, their rewards, and the tensors the loss needs (module docstring)."""
        completions = self.sample(rows, generations, keys)
        completion_ids = [list(c.token_ids) + ([c.stop_id] if c.finish_reason == EOS else []) for c in completions]
        repeated = [row for row in rows for _ in range(generations)]
        fields: dict[str, list] = {}
        records = [json.loads(row["fields"]) for row in repeated]
        for name in dict.fromkeys(k for record in records for k in record):
            fields[name] = [record.get(name) for record in records]
        fields["score_record"] = [json.loads(row["score_record"]) for row in repeated]
        texts = [c.text for c in completions]
        prompts = [row["user_text"] for row in repeated]
        total, per_source = score_completions(self.rewards, prompts, texts, fields, completion_ids)
        return {
            "prompt_ids": [list(row["input_ids"]) for row in repeated],
            "completion_ids": completion_ids,
            "truncated": torch.tensor([c.finish_reason == LENGTH for c in completions]),
            "lengths": torch.tensor([len(ids) for ids in completion_ids], dtype=torch.float32),
            "rewards": total,
            "per_source": per_source,
            "prompts": prompts,
            "texts": texts,
        }

    def sequences(self, rollout: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Prompt + completion per row, right-padded, labelled on the completion tokens only."""
        seqs = [p + c for p, c in zip(rollout["prompt_ids"], rollout["completion_ids"])]
        longest = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(seqs), longest), pad, dtype=torch.long)
        labels = torch.full((len(seqs), longest), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(seqs), longest), dtype=torch.long)
        for row, (prompt, seq) in enumerate(zip(rollout["prompt_ids"], seqs)):
            input_ids[row, : len(seq)] = torch.tensor(seq)
            labels[row, len(prompt) : len(seq)] = torch.tensor(seq[len(prompt) :], dtype=torch.long)
            mask[row, : len(seq)] = 1
        device = self.device
        return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}

    def completion_logps(self, model, rollout, entropy: bool = False):
        """Per completion token, (rows, longest completion): the log-probabilities under `model` (a peft model with
        its adapters off when `model` is "adapters-off") and with `entropy` the entropies; and the mask of tokens."""
        batch = self.sequences(rollout)
        if model is self.model and torch.is_grad_enabled():
            self.trained_batch = {k: batch[k] for k in ("input_ids", "attention_mask")}  # for train/tokens_per_s
        temperature = self.sampling.temperature  # the distribution sampled from, as TRL scores it (the reference too)
        if model == "adapters-off" or (model is not self.model and adapters.is_peft(model)):
            # the policy's base (reference=adapters), or a QLoRA reference copy, which is wrapped as the policy is
            with (self.model if model == "adapters-off" else model).disable_adapter():
                base = self.model if model == "adapters-off" else model
                flat, entropies, rows, positions = labelled_token_logps(base, batch, temperature=temperature)
        else:
            flat, entropies, rows, positions = labelled_token_logps(
                model, batch, entropy=entropy, temperature=temperature
            )
        prompt_lengths = torch.tensor([len(p) for p in rollout["prompt_ids"]], device=positions.device)
        columns = positions - (prompt_lengths[rows] - 1)  # position p predicts token p + 1
        width = max(1, max(len(c) for c in rollout["completion_ids"]))
        logps = flat.new_zeros(len(rollout["completion_ids"]), width)
        logps[rows, columns] = flat
        token_mask = torch.zeros_like(logps)
        token_mask[rows, columns] = 1.0
        table = None
        if entropies is not None:
            table = torch.zeros_like(logps)
            table[rows, columns] = entropies
        return logps, token_mask, table

    @torch.no_grad()
    def frozen_logps(self, rollout: dict[str, Any]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(the policy's log-probabilities as it sampled them, when later steps reuse the completions or RLOO's KL
        needs them; the reference's, when beta > 0)."""
        old = ref = None
        if self.num_iterations > 1 or (self.beta and self.method == "rloo"):
            old = self.completion_logps(self.model, rollout)[0]
        if self.beta:
            model = "adapters-off" if self.reference == "adapters" else self.reference_model
            ref = self.completion_logps(model, rollout)[0]
        return old, ref

    def rollout_for(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """This step's rollout: generated now, or the one generated for the same micro-batch of the same block
        (data.samplers.RepeatedBlocksSampler: `accumulate` micro-batches, yielded `num_iterations` times in a row)
        fewer than `num_iterations` passes ago. Known by its place in the epoch, not by its prompts, which padding
        can repeat within a block."""
        accumulate = self.trainer.accumulate_grad_batches if self._trainer is not None else 1
        block = f"{self.current_epoch}:{batch_idx // (accumulate * self.num_iterations)}"
        key = f"{block}:{batch_idx % accumulate}"
        kept = self.rollouts.get(key)
        if kept is None:
            rows = batch["rows"]
            keys = [f"{self.current_epoch}:{row['index']}" for row in rows]
            kept = self.rollout(rows, self.num_generations, keys, "train")
            kept["old_logps"], kept["ref_logps"] = self.frozen_logps(kept)
            kept["advantages"], kept["kl_sequences"] = self.advantages(kept)
            kept["uses"] = 0
            # only this block's micro-batches are ever reused: others (a run stopped mid-block) are dropped
            self.rollouts = {k: v for k, v in self.rollouts.items() if k.startswith(block + ":")}
            self.rollouts[key] = kept
        kept["uses"] += 1
        if kept["uses"] >= self.num_iterations:
            self.rollouts.pop(key, None)
        return kept

    # --- what GRPO and RLOO say ---------------------------------------------------------------------------------------
    def advantages(self, rollout: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def loss(self, logps, rollout, mask) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def gathered(self, values: torch.Tensor) -> torch.Tensor:
        """`values` of every rank, one after the other (this rank's alone on one process)."""
        if self._trainer is None or self.trainer.world_size == 1:
            return values
        return self.all_gather(values.to(self.device)).reshape(-1).to(values.device)

    # --- steps ------------------------------------------------------------------------------------------------------
    def token_mask(self, rollout: dict[str, Any], mask: torch.Tensor) -> torch.Tensor:
        if self.mask_truncated_completions:
            return mask * (~rollout["truncated"]).to(mask).unsqueeze(1)
        return mask

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        rollout = self.rollout_for(batch, batch_idx)
        logps, mask, entropies = self.completion_logps(self.model, rollout, entropy=True)
        mask = self.token_mask(rollout, mask)
        loss, metrics = self.loss(logps, rollout, mask)
        rewards = rollout["rewards"]
        grouped = rewards.view(-1, self.num_generations)
        lengths = rollout["lengths"]
        logged = {
            "loss": loss.detach(),
            "reward": rewards.mean(),
            "reward_std": rewards.std(),
            "frac_reward_zero_std": (grouped.std(dim=1) < 1e-8).float().mean(),
            "entropy": masked_mean(entropies, mask),
            "completions/mean_length": lengths.mean(),
            "completions/min_length": lengths.min(),
            "completions/max_length": lengths.max(),
            "completions/clipped_ratio": rollout["truncated"].float().mean(),
            **{f"rewards/{name}/mean": values.mean() for name, values in rollout["per_source"].items()},
            **{f"rewards/{name}/std": values.std() for name, values in rollout["per_source"].items()},
            **metrics,
        }
        self.log("train/loss", logged.pop("loss"), prog_bar=True)
        self.log("train/reward", logged.pop("reward"), prog_bar=True)
        self.log_dict({f"train/{k}": v.to(self.device, torch.float32) for k, v in logged.items()})
        self.log("train/lr", self.lr_schedulers().get_last_lr()[0])
        for reward in self.rewards:  # a judge's tokens and dollars so far
            for key, value in (reward.cost() if reward.cost else {}).items():
                self.log(f"train/rewards/{reward.name}/{key}", float(value))
        every = self.log_completions_every
        if every and self.global_step % every == 0 and rollout["uses"] == 1:
            self.log_completions(rollout, "train")
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        rows = batch["rows"]
        rollout = self.rollout(rows, 1, [f"validation:{row['index']}" for row in rows], "validation")
        n = len(rows)
        values = {"reward": rollout["rewards"], "completions/mean_length": rollout["lengths"]}
        values |= {f"rewards/{name}/mean": v for name, v in rollout["per_source"].items()}
        for name, value in values.items():
            metric = self.val_metrics[name.replace("/", "_")]
            metric.update(value.mean().to(self.device), weight=n)  # a mean over the split's prompts
            self.log(f"val/{name}", metric, prog_bar=name == "reward")
        if batch_idx == 0 and self.log_completions_every:
            self.log_completions(rollout, "val")

    def log_completions(self, rollout: dict[str, Any], split: str) -> None:
        """A table of sampled completions (prompt, completion, reward) to TensorBoard's text tab and W&B."""
        if not self.trainer.is_global_zero:
            return
        rows = [
            (prompt, text, round(float(reward), 4))
            for prompt, text, reward in zip(rollout["prompts"], rollout["texts"], rollout["rewards"].tolist())
        ][:TABLE_ROWS]
        for logger in self.loggers:
            kind = type(logger).__name__
            if kind == "TensorBoardLogger":
                cell = lambda text: text.replace("|", "\\|").replace("\n", "<br>")  # noqa: E731
                table = "| prompt | completion | reward |\n|---|---|---|\n" + "\n".join(
                    f"| {cell(p)} | {cell(c)} | {r} |" for p, c, r in rows
                )
                logger.experiment.add_text(f"{split}/completions", table, self.global_step)
            elif kind == "WandbLogger":
                logger.log_table(f"{split}/completions", columns=["prompt", "completion", "reward"], data=rows)

    # --- checkpoints: the rollouts later iterations reuse ---------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Each rank's rollouts (its own prompts), gathered: every rank takes its own back (as training.callbacks.
        RandomState does with the random generators)."""
        import torch.distributed as dist

        super().on_save_checkpoint(checkpoint)
        mine = {
            key: {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in rollout.items()}
            for key, rollout in self.rollouts.items()
        }
        processes: list[Any] = [mine]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            processes = [None] * dist.get_world_size()
            dist.all_gather_object(processes, mine)
        checkpoint["rl_rollouts"] = {"processes": processes}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        processes = (checkpoint.get("rl_rollouts") or {}).get("processes") or []
        rank = self.trainer.global_rank if self._trainer is not None else 0
        world = self.trainer.world_size if self._trainer is not None else 1
        # another number of processes is refused before (training.resume.check_resume); none kept: nothing to reuse
        self.rollouts = dict(processes[rank]) if len(processes) == world else {}


class GRPOModule(OnlineRLModule):
    """GRPO: group-normalized advantages and the clipped per-token surrogate, aggregated by `loss_type`."""

    method = "grpo"

    def __init__(self, *args, loss_type: str = "dapo", scale_rewards: str = "group", **kwargs) -> None:
        super().__init__(*args, **kwargs)  # OnlineRLModule's settings
        if loss_type not in LOSS_TYPES:
            raise ConfigError(f"task.loss_type={loss_type!r}: choose one of {', '.join(LOSS_TYPES)}")
        if scale_rewards not in SCALE_REWARDS:
            raise ConfigError(f"task.scale_rewards={scale_rewards!r}: choose one of {', '.join(SCALE_REWARDS)}")
        self.loss_type, self.scale_rewards = loss_type, scale_rewards

    def advantages(self, rollout):
        rewards = rollout["rewards"]
        if self.scale_rewards != "batch":
            return grpo_advantages(rewards, self.num_generations, self.scale_rewards), None
        # the batch's deviation over every rank's rewards, as TRL takes it over the gathered batch
        centered = grpo_advantages(rewards, self.num_generations, "none")
        return centered / (self.gathered(rewards).std() + STD_EPS), None

    def loss(self, logps, rollout, mask):
        old = rollout["old_logps"]
        ref = rollout["ref_logps"]
        out = grpo_loss(
            logps,
            logps.detach() if old is None else old.to(logps),
            rollout["advantages"].to(logps),
            mask,
            self.loss_type,
            self.epsilon_low,
            self.epsilon_high,
            self.beta,
            None if ref is None else ref.to(logps),
            self.max_completion_length,
            num_items=self.all_ranks_mean(mask.sum()),
        )
        metrics = {
            "clip_ratio/low_mean": out.clip_low,
            "clip_ratio/high_mean": out.clip_high,
            "clip_ratio/region_mean": out.clip_region,
        }
        if out.kl is not None:
            metrics["kl"] = out.kl.detach()
        return out.loss, metrics

    def all_ranks_mean(self, value: torch.Tensor) -> torch.Tensor:
        """`value`'s mean over the ranks (dapo's normalizer: the completion tokens of the whole batch, per rank)."""
        if self._trainer is None or self.trainer.world_size == 1:
            return value
        return self.trainer.strategy.reduce(value.float(), reduce_op="mean")


class RLOOModule(OnlineRLModule):
    """RLOO: the leave-one-out baseline on whole-sequence rewards (the KL, when any, taken from the reward) and the
    clipped surrogate on sequence ratios."""

    method = "rloo"

    def __init__(self, *args, normalize_advantages: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)  # OnlineRLModule's settings
        self.normalize_advantages = normalize_advantages

    def advantages(self, rollout):
        rewards, kl = rollout["rewards"], None
        if self.beta:
            mask = self.token_mask(rollout, completion_mask(rollout).to(rollout["old_logps"]))
            kl = ((rollout["old_logps"] - rollout["ref_logps"]) * mask).sum(1).cpu()
            rewards = rewards - self.beta * kl
        advantages = rloo_advantages(rewards, self.num_generations)
        if self.normalize_advantages:  # over every rank's advantages, as TRL over the gathered batch
            every = self.gathered(advantages)
            advantages = (advantages - every.mean()) / (every.std() + STD_EPS)
        return advantages, kl

    def loss(self, logps, rollout, mask):
        old = rollout["old_logps"]
        old_sums = (logps.detach() * mask).sum(1) if old is None else (old.to(logps) * mask).sum(1)
        advantages = rollout["advantages"].to(logps)
        loss = rloo_loss(logps, old_sums, advantages, mask, self.epsilon_low, self.epsilon_high)
        with torch.no_grad():  # TRL's clip ratios of RLOO: over sequences
            ratio = torch.exp((logps * mask).sum(1) - old_sums)
            low = ((ratio < 1 - self.epsilon_low) & (advantages < 0)).float()
            high = ((ratio > 1 + self.epsilon_high) & (advantages > 0)).float()
        metrics = {
            "clip_ratio/low_mean": low.mean(),
            "clip_ratio/high_mean": high.mean(),
            "clip_ratio/region_mean": torch.maximum(low, high).mean(),
        }
        if rollout["kl_sequences"] is not None:
            metrics["kl"] = rollout["kl_sequences"].sum() / mask.sum().clamp(min=1).cpu()
        return loss, metrics


def completion_mask(rollout: dict[str, Any]) -> torch.Tensor:
    """1 on each completion's tokens (its stop id included), 0 on the padding after them: (rows, longest)."""
    lengths = rollout["lengths"].long()
    width = max(1, int(lengths.max()))
    return (torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)).float()


def effective_prompt_length(max_length: int, max_completion_length: int, max_prompt_length: int | None) -> int:
    """The longest prompt online RL keeps: `max_prompt_length`, or what `max_length` leaves after a completion."""
    if max_prompt_length is not None:
        if isinstance(max_prompt_length, bool) or not isinstance(max_prompt_length, int) or max_prompt_length < 1:
            raise ConfigError(f"task.max_prompt_length={max_prompt_length}: a number of tokens above 0, or null")
        return max_prompt_length
    length = max_length - max_completion_length
    if length < 1:
        raise ConfigError(
            f"task.max_completion_length={max_completion_length} leaves no room for a prompt in "
            f"model.max_length={max_length}: lower it, or set task.max_prompt_length"
        )
    return int(math.floor(length))
