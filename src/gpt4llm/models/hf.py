"""Loading Hugging Face tokenizers and causal LMs the way stanford_alpaca's train.py prepared them."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PreTrainedModel,
)

from gpt4llm.data.formats import resolve_format
from gpt4llm.data.tokenizer import check_model_dir, load_tokenizer
from gpt4llm.errors import MissingFileError
from gpt4llm.models import attention
from gpt4llm.models.zero3 import gathered

log = logging.getLogger(__name__)


def prepare_tokenizer(path: str, tiny: dict | None = None, backend: str = "auto", template: str = "alpaca"):
    """The tokenizer of the configured model (`cfg.model`), building the local tiny model first if it is the one, made
    to render the prompt format `template` (data.formats: `auto` decided against this tokenizer; a shipped template's
    special tokens are added here, before the model sizes its embeddings to the tokenizer), and that format with how
    it was chosen."""
    if tiny:
        from gpt4llm.models.tiny import build_tiny_model

        build_tiny_model(path, **tiny)
    tokenizer = load_tokenizer(path, backend=backend)
    resolved = resolve_format(template, tokenizer)
    resolved.format.prepare_tokenizer(tokenizer, f"model.path={path}")
    return tokenizer, resolved


def added_token_ids(path: str, tokenizer) -> list[int]:
    """The ids of the tokens `tokenizer` has and the model at `path` was not trained with: the pad token and a
    template's special tokens that this run added (prepare_tokenizer, data.tokenizer.load_tokenizer)."""
    from gpt4llm.data.tokenizer import load_pretrained_tokenizer

    base = load_pretrained_tokenizer(path).get_vocab()
    return sorted(i for token, i in tokenizer.get_vocab().items() if token not in base)


def import_model_code(path: str, auto_mapping) -> None:
    """Imports torch._dynamo and the backbone's modeling module (transformers imports a model's code lazily, on first
    use). Call it before entering a sharded-init context: with torch 2.13, a first import of torch._dynamo inside
    deepspeed.zero.Init fails with "Signature mismatch ... tensor_pynew"."""
    import torch._dynamo  # noqa: F401

    check_model_dir(path)
    config = AutoConfig.from_pretrained(path)
    if auto_mapping is not None and type(config) in auto_mapping:
        auto_mapping[type(config)]  # the lookup imports the class's module


def load_causal_lm(
    path: str,
    tokenizer,
    dtype: str | None = None,
    gradient_checkpointing: bool = False,
    attn_implementation: str | None = None,
    quantization=None,
) -> PreTrainedModel:
    check_model_dir(path)  # said as a missing directory, not as transformers' "Repo id must be in the form..."
    # attn_implementation None: transformers' choice (SDPA where the model supports it).
    if attn_implementation == attention.NAME:
        attention.register()
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    start = time.perf_counter()  # one line a load, where transformers' bar was (gpt4llm.app.cli.quiet_libraries)
    adapter = adapter_base(path)
    model = AutoModelForCausalLM.from_pretrained(
        adapter or path, dtype=getattr(torch, dtype) if dtype else None, **extra, **quantized_loading(quantization)
    )
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        resize_embeddings_with_mean(model, len(tokenizer))
    if adapter:  # peft's documented steps: the base, resized to the adapter's tokenizer, then the adapter, merged
        from gpt4llm.models.adapters import merge_into_base

        model = merge_into_base(model, path)
    log.info(f"Loaded {path}{f' onto {adapter}' if adapter else ''} in {time.perf_counter() - start:.1f}s")
    model.config.pad_token_id = tokenizer.pad_token_id
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def adapter_base(path: str) -> str | None:
    """For a peft adapter directory (an export's adapter/: adapter_config.json, no config.json), the base model it
    names; None for a model directory. transformers would load the base at its own size and fail on the adapter's
    rows of tokens the run added."""
    local = Path(path).expanduser()
    if not (local / "adapter_config.json").is_file() or (local / "config.json").is_file():
        return None
    base = json.loads((local / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise MissingFileError(f"{path}/adapter_config.json names no base_model_name_or_path: set it to the base model")
    try:
        check_model_dir(base)
    except MissingFileError as err:
        raise MissingFileError(
            f"{path} is an adapter for {base} (its base_model_name_or_path), which is missing: {err}"
        ) from None
    return base


def quantized_loading(quantization) -> dict:
    """from_pretrained's arguments for a 4-bit base (QLoRA): bitsandbytes quantizes as it places the weights, so the
    device is chosen at load (this process's GPU, or the CPU)."""
    if quantization is None:
        return {}
    import os

    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    return {"quantization_config": quantization, "device_map": {"": device}}


@torch.no_grad()
def resize_embeddings_with_mean(model: PreTrainedModel, new_size: int) -> None:
    """stanford_alpaca's smart_tokenizer_and_embedding_resize: new rows start at the mean of the old ones."""
    old = model.get_input_embeddings().num_embeddings
    model.resize_token_embeddings(new_size, mean_resizing=False)
    embeddings = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    weights = [embeddings] + (
        [head.weight] if head is not None and head.weight is not embeddings else []
    )  # untied (LLaMA)
    with gathered(weights):  # under ZeRO-3 each rank holds a slice: rank 0 writes the full rows, then they re-shard
        for weight in weights:
            weight[old:] = weight[:old].mean(dim=0, keepdim=True)
