"""The final model in Hugging Face format: `from_pretrained(<run dir>/export)` loads model and tokenizer.

Whatever the strategy, the export holds complete weights or does not exist:
  - plain modules (one device, DDP): their state dict;
  - DeepSpeed ZeRO-3: each module's partitions gathered in turn onto rank 0 (16-bit, as trained; what
    `stage3_gather_16bit_weights_on_model_save` does for DeepSpeed's own save), so it never needs the whole model on
    one GPU;
  - FSDP and FSDP2: a full state dict, offloaded to CPU on rank 0.
It is written into a sibling directory, reloaded with `from_pretrained` and checked: every tensor has the shape the
model's config gives (an empty or partial tensor, a missing or unexpected key is an error), and the reloaded model's
logits on a fixed batch match the in-training model's within the tolerance of the precision it computed in. Only
then is the directory renamed into place, with a checksum manifest of its files (gpt4llm.io.checksums, verified where
the export is loaded) and the modes the umask gives. With sharded weights, call it on every rank (the gather is
collective); rank 0 writes, and an error on rank 0 is raised on every rank.

A DeepSpeed checkpoint directory (checkpoints/last.ckpt/ under ZeRO) becomes a single fp32 file with Lightning's
`lightning.pytorch.utilities.deepspeed.convert_zero_checkpoint_to_fp32_state_dict(ckpt_dir, out_file)`.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from gpt4llm.data.prompts import format_prompt
from gpt4llm.errors import ExportError
from gpt4llm.io import atomic, checksums
from gpt4llm.models import adapters, model_card
from gpt4llm.models.zero3 import transformers_zero3_off, zero3_state_dict

# Relative RMS difference of the logits allowed between the in-training model and the reloaded export, by the dtype
# the in-training model computed in. fp32 is a round trip of the same numbers (CPU vs GPU kernels differ in
# summation order only); 16-bit in-training logits differ from the fp32 reload by their rounding through 32 layers.
# A wrong or missing tensor moves the logits by tens of percent.
LOGIT_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}

VERIFY_PROMPTS = [
    format_prompt("Give three tips for staying healthy."),
    format_prompt("把这句话翻译成英文。", "今天天气很好。"),
]


def export_hf(model, tokenizer, directory: str | Path, trainer=None, verify: bool = True, load_base=None) -> Path:
    """Saves `model` (the Hugging Face model inside the LightningModule) and `tokenizer` into `directory`.

    `trainer` (when given) says how the weights are distributed and runs the in-training forward through the
    strategy's wrapper; without it the model is taken to be whole on this process.

    A model with LoRA adapters (models.adapters) is written two ways: the adapter in peft's format in
    `directory/adapter` (adapter_config.json with base_model_name_or_path, adapter_model.safetensors), and, in
    `directory`, the merged model: `load_base()` (the base as training started from it) with that adapter loaded by
    peft's own `PeftModel.from_pretrained` and merged, checked by logits like any export. Only the trainable tensors
    are gathered under ZeRO-3.
    """
    directory = Path(directory)
    strategy = trainer.strategy if trainer is not None else None
    rank_zero = trainer.is_global_zero if trainer is not None else True
    batch = verification_batch(tokenizer)

    # Collective steps first, on every rank: the reference forward and the gather.
    reference = in_training_logits(model, batch, trainer) if verify else None
    with_adapters = adapters.is_peft(model)
    state_dict = full_state_dict(model, trainer, adapters.trainable_names(model) if with_adapters else None)

    error = None
    if rank_zero:
        try:
            if with_adapters:
                _write_adapter_and_merged(model, tokenizer, directory, state_dict, reference, batch, load_base)
            else:
                _write_verified(model, tokenizer, directory, state_dict, reference, batch)
        except Exception as err:  # handed to every rank below, so that no rank waits for one that stopped
            error = err
    if strategy is not None and trainer.world_size > 1:
        message = strategy.broadcast(f"{type(error).__name__}: {error}" if error else None, src=0)
        if message and not rank_zero:
            raise ExportError(f"the export failed on rank 0: {message}")
    if error is not None:
        raise error
    return directory


def verification_batch(tokenizer) -> dict[str, torch.Tensor]:
    """A fixed batch: two Alpaca prompts (English, Chinese), right-padded as in training, at most 48 tokens."""
    encoded = tokenizer(VERIFY_PROMPTS, padding=True, truncation=True, max_length=48, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


@torch.no_grad()
def in_training_logits(model, batch, trainer=None) -> torch.Tensor:
    """Logits of the model as it trains: through the strategy's wrapper (DDP, FSDP, the DeepSpeed engine), on its
    device, in its precision. Collective under sharding: every rank runs it."""
    wrapper = getattr(trainer.strategy, "model", None) if trainer is not None else None
    module = trainer.lightning_module if trainer is not None else None
    if wrapper is None or module is None or wrapper is module:
        device = next(model.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items()}
        training = model.training
        model.eval()
        try:
            return model(**batch).logits.detach().cpu()
        finally:
            model.train(training)
    # The wrapper runs its module's forward where the weights are (gathering FSDP units and ZeRO-3 partitions on
    # the way): for the length of this call that forward is the Hugging Face model's, whatever the LightningModule's
    # own forward takes (the redirection Lightning uses for training_step).
    batch = {k: v.to(trainer.strategy.root_device) for k, v in batch.items()}
    training = wrapper.training
    wrapper.eval()
    module.forward = lambda b: model(**b).logits
    try:
        with trainer.precision_plugin.forward_context():
            return wrapper(batch).detach().cpu()
    finally:
        del module.forward  # the class's forward again
        wrapper.train(training)


def full_state_dict(model, trainer=None, only: set[str] | None = None) -> dict[str, torch.Tensor] | None:
    """The complete state dict on rank 0 (CPU tensors), None on the other ranks; `only` these parameters where
    given (an adapter's). Collective under sharding."""
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        return zero3_state_dict(model, trainer.is_global_zero if trainer is not None else True, only)
    if any(_is_dtensor(p) for p in model.parameters()):  # FSDP2
        return _fsdp2_state_dict(model, only)
    root = getattr(trainer.strategy, "model", None) if trainer is not None else None
    if root is not None and _is_fsdp(root):
        full = _fsdp_state_dict(model, root, trainer)
        return full if only is None or full is None else {k: v for k, v in full.items() if k in only}
    if trainer is not None and not trainer.is_global_zero:
        return None
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if only is None or k in only}


def _is_fsdp(module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(module, FullyShardedDataParallel)


def _is_dtensor(tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _fsdp2_state_dict(model, only: set[str] | None) -> dict[str, torch.Tensor] | None:
    """fully_shard's DTensors gathered whole onto rank 0's CPU, tensor by tensor (never the whole model on a GPU)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    return {k: v for k, v in full.items() if only is None or k in only}


def _fsdp_state_dict(model, root, trainer) -> dict[str, torch.Tensor] | None:
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    config = FullStateDictConfig(offload_to_cpu=True, rank0_only=True)
    with FSDP.state_dict_type(root, StateDictType.FULL_STATE_DICT, config):
        full = root.state_dict()
    if not trainer.is_global_zero:
        return None
    # keys are the LightningModule's ("model.model.layers..."): keep those under the Hugging Face model
    prefix = next(name for name, child in trainer.lightning_module.named_children() if child is model) + "."
    return {k[len(prefix) :]: v for k, v in full.items() if k.startswith(prefix)}


def expected_shapes(model) -> dict[str, tuple[int, ...]]:
    """Every persistent tensor the model's class and config define, with its shape (built on the meta device)."""
    config = copy.deepcopy(model.config)
    with transformers_zero3_off(), torch.device("meta"):
        skeleton = type(model)(config)
    return {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}


def check_complete(state_dict: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> None:
    problems = []
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing:
        problems.append(f"{len(missing)} missing (first: {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (first: {', '.join(unexpected[:3])})")
    for name, shape in expected.items():
        tensor = state_dict.get(name)
        if tensor is None:
            continue
        if tensor.numel() == 0 or tuple(tensor.shape) != shape:
            problems.append(f"{name}: shape {tuple(tensor.shape)}, config says {shape}")
    if problems:
        raise ExportError(
            "the gathered weights are incomplete (a sharded or empty tensor would load as garbage): "
            + "; ".join(problems[:8])
        )


def carry_chat_template(model, tokenizer) -> None:
    """The chat template of the prompt the model learned, set on the tokenizer the export saves: the paper's Alpaca
    prompt as a chat template (a base model's own template, copied by model=hf, would not be the one it learned), or
    the chat template it was trained with (the tokenizer's already)."""
    template = model_card.prompt_format_of(model).format.export_chat_template()
    if template is not None:
        tokenizer.chat_template = template


def _write_verified(model, tokenizer, directory: Path, state_dict, reference, batch) -> None:
    check_complete(state_dict, expected_shapes(model))
    carry_chat_template(model, tokenizer)
    with atomic.atomic_path(directory) as tmp:
        model.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        checksums.write_manifest(tmp)
        if reference is not None:
            verify_export(tmp, reference, batch, type(model))


def _write_adapter_and_merged(model, tokenizer, directory: Path, adapter_state, reference, batch, load_base) -> None:
    if load_base is None:
        raise ExportError("an adapter export needs the base model to merge into (export_hf(load_base=...))")
    carry_chat_template(model, tokenizer)
    quantized = getattr(adapters.backbone(model), "is_loaded_in_4bit", False)
    with atomic.atomic_path(directory) as tmp:
        adapter_dir = tmp / "adapter"
        # the tokenizer's added rows are the base's mean embedding, made again when the base is loaded with it
        model.save_pretrained(adapter_dir, state_dict=adapter_state, save_embedding_layers=False)
        tokenizer.save_pretrained(adapter_dir)
        merged = adapters.merge_into_base(load_base(), adapter_dir)
        model_card.copy(model.config, merged.config)  # what training recorded
        if model.generation_config is not None and merged.generation_config is not None:
            merged.generation_config.eos_token_id = model.generation_config.eos_token_id
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        checksums.write_manifest(tmp)  # the adapter's files too
        if reference is not None:  # a QLoRA run computed through 4-bit weights in its compute dtype: bf16's tolerance
            verify_export(tmp, reference, batch, type(merged), LOGIT_TOLERANCE[torch.bfloat16] if quantized else None)


@torch.no_grad()
def verify_export(
    directory: Path, reference: torch.Tensor, batch, model_class, tolerance: float | None = None
) -> float:
    """Reloads the export (as `model_class`: a causal LM, a reward model) in fp32 on CPU and compares its logits with
    the in-training model's; returns the relative RMS difference, raises ExportError when it is beyond
    LOGIT_TOLERANCE or a key did not load."""
    with transformers_zero3_off():  # a plain load on rank 0 alone, not a collective ZeRO-3 one
        reloaded, info = model_class.from_pretrained(directory, dtype=torch.float32, output_loading_info=True)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise ExportError(f"{directory}: from_pretrained did not load every tensor: {bad}")
    logits = reloaded.eval()(**batch).logits
    if logits.dim() == 3:  # per token: padded positions are not compared
        mask = batch["attention_mask"].bool()
        logits, reference = logits[mask], reference[mask]
    got, want = logits.float(), reference.float()
    error = float((got - want).norm() / want.norm().clamp_min(1e-12))
    tolerance = tolerance or LOGIT_TOLERANCE.get(reference.dtype, 3e-2)
    if not error <= tolerance:
        raise ExportError(
            f"{directory}: the reloaded model's logits differ from the in-training model's by {error:.3g} (relative "
            f"RMS; allowed {tolerance:g} for {reference.dtype}): the export does not hold the trained weights"
        )
    return error
