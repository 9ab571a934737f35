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
                 what decides the numbers: the reference's weights digest, dtype, quantization, precision, template,
                 length and the pairs' ids; the file carries a digest of its values, checked on read); only the policy
                 is in memory while training (default)
    live         a frozen copy in memory, evaluated on every batch
    adapters     for a LoRA policy: the policy with its adapters disabled (the base), no copy
Under QLoRA (a 4-bit base) the precomputed and the live reference are the 4-bit base too, loaded and prepared as the
policy's is and run with the adapters disabled: at step 0 the policy equals its reference exactly (loss ln 2).

Metrics carry TRL's names (rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins, logps/chosen,
logps/rejected) under train/ and val/, with beta x log-ratio as the rewards.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import MeanMetric
from transformers import PreTrainedModel

from gpt4llm.errors import ConfigError, RecordError
from gpt4llm.models import adapters
from gpt4llm.models.base_module import CausalLMModule
from gpt4llm.models.hf import adapter_base
from gpt4llm.models.response_logps import TOKEN_CHUNK, response_logps

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
CACHE_FORMAT = 2  # the reference cache's layout: bump when what it holds or how it is keyed changes
WEIGHT_SUFFIXES = (".safetensors", ".bin")


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
    and with the precomputed reference, `pair_index` (the reference is precomputed_logps[split][pair_index])."""

    sequences_per_example = 2  # a pair: chosen and rejected in one forward pass

    @classmethod
    def loss_chunk(cls, settings) -> int | None:
        return TOKEN_CHUNK  # response_logps: the output layer on chunks of positions

    @classmethod
    def keeps_frozen_copy(cls, settings) -> bool:
        # precomputed keeps two floats per pair, adapters nothing but the policy
        return settings.get("reference") == "live"

    @classmethod
    def precomputes_reference(cls, settings) -> bool:
        return settings.get("reference") == "precomputed"

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
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
            raise ConfigError(
                f"task.beta={beta}: DPO's beta scales the log-ratios in the loss, a finite number above 0 (0.1 is "
                f"usual; Zephyr's recipe uses 0.1, IPO often 0.01 to 0.5)"
            )
        if not 0 <= label_smoothing < 0.5:
            raise ConfigError(f"task.label_smoothing={label_smoothing} must be in [0, 0.5)")
        self.loss_name, self.beta, self.label_smoothing = loss, beta, label_smoothing
        self.reference, self.reference_path = reference, reference_path or self.model_path
        self.cache_dir = cache_dir
        self.reference_model: PreTrainedModel | None = None
        self.precomputed_logps: dict[str, torch.Tensor] = {}  # reference=precomputed: set_reference_logps
        self.val_metrics = torch.nn.ModuleDict({k.replace("/", "_"): MeanMetric() for k in ("loss", *METRICS)})

    # --- the reference --------------------------------------------------------------------------------------------
    def load_reference(self) -> PreTrainedModel:
        """The reference, frozen, in eval mode (CausalLMModule.load_frozen_copy: under QLoRA the 4-bit base run with
        its adapters disabled, so that at step 0 the policy equals its reference exactly, loss ln 2)."""
        return self.load_frozen_copy(self.reference_path)

    @staticmethod
    def reference_forward(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The summed log-probabilities of a batch's responses under a loaded reference (a QLoRA reference, a peft
        model, with its adapters disabled)."""
        if adapters.is_peft(model):
            with model.disable_adapter():
                return response_logps(model, batch)[0]
        return response_logps(model, batch)[0]

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.reference == "precomputed" and self.trainer is not None and self.trainer.datamodule is not None:
            self.precompute_reference(self.trainer.datamodule)

    def configure_model(self) -> None:
        super().configure_model()
        if self.reference == "live" and self.reference_model is None:
            self.reference_model = self._shard(self.load_reference())

    def precompute_reference(self, data) -> None:
        """The reference's log-probabilities of every pair, computed once (rank 0, on this process's device) and
        cached under cache_dir by what decides them (`reference_identity`); every rank reads the cache, checked
        (`read_reference_cache`), into `precomputed_logps`, and the data module indexes the pairs so that each batch
        says which rows are its own."""
        if self.precomputed_logps:  # setup runs for each stage (validate, fit): once is enough
            return
        identity = self.reference_identity(data)
        target = self.reference_cache(data, identity)
        strategy = self.trainer.strategy
        if strategy.is_global_zero and not target.exists():
            pairs = sum(len(split) for split in data.splits.values())
            rank_zero_info(
                f"Reference log-probabilities: one pass over {pairs} pairs before step 1, cached in {target}"
            )
            self.write_reference_cache(data, target, identity)
        elif target.exists():
            rank_zero_info(f"Reference log-probabilities: reused from {target} (same weights, data and precision)")
        strategy.barrier("dpo-reference")
        sizes = {name: len(split) for name, split in data.splits.items() if len(split)}
        for name, (chosen, rejected) in read_reference_cache(target, identity, sizes).items():
            self.set_reference_logps(name, chosen, rejected)
            data.index_pairs(name)

    def reference_identity(self, data) -> dict:
        """Everything the reference's log-probabilities depend on, as JSON: the reference's weights (a digest of
        their bytes, `weights_digest`: not names, sizes and times, which a swapped model can keep), the dtype it
        loads in, its 4-bit quantization, the attention kernel, the training precision (and the plugin that applies
        it), the vocabulary (the embeddings are resized to it), the template and length, and the pairs' ids of every
        non-empty split (PairDataModule.pairs_digest)."""
        return {
            "format": CACHE_FORMAT,
            "weights": weights_digest(self.reference_path),
            "dtype": self.dtype_name,
            "quantization": self.quantization_settings(),
            "attn_implementation": self.attn_implementation,
            "precision": str(self.trainer.precision),
            "precision_plugin": type(self.trainer.precision_plugin).__name__,
            "vocabulary": len(self.tokenizer),
            "template": data.prompt_format.name,
            "max_length": data.max_length,
            "pairs": {name: data.pairs_digest(name) for name, split in data.splits.items() if len(split)},
        }

    def reference_cache(self, data, identity: dict | None = None) -> Path:
        """The cache file, named by the digest of `reference_identity`."""
        identity = self.reference_identity(data) if identity is None else identity
        key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]
        return Path(self.cache_dir) / f"dpo-reference-{key}.json"

    def write_reference_cache(self, data, target: Path, identity: dict | None = None) -> None:
        """One pass of the reference, in the policy's training precision, over every non-empty split, written with
        its identity and the digest of its values (`values_digest`), which reading checks."""
        from gpt4llm.io import json_files

        identity = self.reference_identity(data) if identity is None else identity
        model = self.load_reference()
        if self.quantization_settings() is None:  # a 4-bit model is placed on this process's device as it loads
            model = model.to(self.trainer.strategy.root_device)
        model = self.in_training_precision(model)
        with self.trainer.precision_plugin.forward_context():
            splits = [name for name, split in data.splits.items() if len(split)]
            values = {
                name: dict(zip(("chosen", "rejected"), self.reference_pass(model, data, name))) for name in splits
            }
        del model
        content = {"format": CACHE_FORMAT, "identity": identity, "sha256": values_digest(values), "splits": values}
        json_files.write_json(target, content, indent=None)
        rank_zero_info(
            f"Reference log-probabilities of {sum(len(v['chosen']) for v in values.values())} pairs: {target}"
        )

    def set_reference_logps(self, split: str, chosen: list[float], rejected: list[float]) -> None:
        """The reference model's log-probabilities of each pair's responses, kept in fp32 as
        `precomputed_logps[split]` (pairs x [chosen, rejected]) and found by the `pair_index` each batch carries.
        Not in the batches themselves: Lightning casts a batch's floating tensors to the 16-bit dtype under
        DeepSpeed's and the true-half precisions, and a sum of a hundred log-probabilities in bf16 is a quarter nat
        off. Nor a registered buffer, which DeepSpeed casts with the weights: a plain attribute of the module."""
        self.precomputed_logps[split] = torch.tensor([chosen, rejected], dtype=torch.float32).T.contiguous()

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
            c, r = self.reference_forward(model, batch).chunk(2)  # as the policy's in training: the same numerics
            chosen += c.tolist()
            rejected += r.tolist()
        return chosen, rejected

    # --- the loss ---------------------------------------------------------------------------------------------------
    def reference_logps(self, batch, split: str) -> torch.Tensor:
        if self.reference == "precomputed":
            table = self.precomputed_logps[split].to(batch["pair_index"].device)
            return table[batch["pair_index"]].T.reshape(-1)  # the chosen, then the rejected
        with torch.no_grad():
            if self.reference == "adapters":
                with self.model.disable_adapter():
                    return response_logps(self.model, batch)[0]
            return self.reference_forward(self.reference_model, batch)

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


# --- the reference cache's file -------------------------------------------------------------------------------------
def values_digest(values: dict) -> str:
    """The digest a reference cache carries of its own values, over their canonical JSON (a float's JSON is its
    shortest round-tripping repr, so values read back give the digest they were written with)."""
    return hashlib.sha256(json.dumps(values, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_reference_cache(target: Path, identity: dict, sizes: dict[str, int]) -> dict[str, tuple[list, list]]:
    """The (chosen, rejected) log-probabilities of each split in `sizes` (split -> pairs) from the cache file, checked
    whole before training starts: a file cut short, emptied, overwritten, edited (its digest), written for another
    run (its identity) or missing a split is a RecordError naming the file and how to rebuild it, not a
    JSONDecodeError, KeyError or IndexError mid-training."""

    def damaged(why: str) -> RecordError:
        return RecordError(
            f"{target}: the DPO reference cache is damaged ({why}); delete it and run again to rebuild it (the "
            f"reference's log-probabilities are then computed anew)"
        )

    try:
        content = json.loads(target.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise damaged(f"not valid JSON: {type(err).__name__}") from None
    if (
        not isinstance(content, dict)
        or content.get("format") != CACHE_FORMAT
        or not isinstance(content.get("splits"), dict)
    ):
        raise damaged(f"not a reference cache of format {CACHE_FORMAT}")
    if content.get("sha256") != values_digest(content["splits"]):
        raise damaged("its values do not match the digest written with them: edited or corrupted")
    if content.get("identity") != json.loads(json.dumps(identity)):
        raise damaged("written for another reference model, precision or data")
    values = {}
    for name, size in sizes.items():
        split = content["splits"].get(name)
        if not isinstance(split, dict):
            raise damaged(f"no log-probabilities for the split {name!r}")
        columns = []
        for side in ("chosen", "rejected"):
            column = split.get(side)
            if not isinstance(column, list) or len(column) != size:
                held = len(column) if isinstance(column, list) else "no"
                raise damaged(f"{held} {side} log-probabilities for the {size} pairs of the split {name!r}")
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in column):
                raise damaged(f"a {side} log-probability of the split {name!r} is not a number")
            columns.append(column)
        values[name] = tuple(columns)
    return values


# Each weight file's sha256 by (path, size, mtime, ctime, inode), in this process only: on disk, a stale entry is the
# very thing a content digest is there to catch.
_file_digests: dict[tuple, str] = {}


def weights_digest(path: str) -> str:
    """sha256 over a model's weight files (*.safetensors, *.bin) and its config, names included, and for an adapter
    directory over its base's too. Every byte is read: a 13 GB model (LLaMA-7B in fp16) takes ~10-20 s, once per
    run, which is what it costs to notice a model swapped for another of the same size and mtime."""
    digest = hashlib.sha256()
    directory = _model_directory(path)
    configs = ("config.json", "adapter_config.json")
    files = (
        sorted(p for p in directory.iterdir() if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name in configs))
        if directory is not None
        else []
    )
    if not files:  # nothing here to read (a hub id not in the hub cache): the name, and the load will say more
        digest.update(f"name:{path}".encode())
    for file in files:
        digest.update(f"{file.name}\0{_file_sha256(file)}\n".encode())
    base = adapter_base(str(path)) if directory is not None else None
    if base:
        digest.update(f"base:{weights_digest(base)}".encode())
    return digest.hexdigest()


def _model_directory(path: str) -> Path | None:
    """A local model directory, or a hub model's snapshot (of its revision) in the hub cache; None where neither is."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    from gpt4llm.data.tokenizer import model_file

    try:
        found = model_file(path, "config.json")
    except (OSError, ValueError):
        return None
    return found.parent if found else None


def _file_sha256(path: Path) -> str:
    from gpt4llm.io.checksums import file_sha256

    stat = path.stat()  # of the file a symlink points at (the hub cache's blobs)
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)
    if key not in _file_digests:
        _file_digests[key] = file_sha256(path)
    return _file_digests[key]
