"""Loading Hugging Face tokenizers and causal LMs the way stanford_alpaca's train.py prepared them."""

from __future__ import annotations

import logging
import time

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PreTrainedModel,
)

from gpt4llm.data.templates import apply_template
from gpt4llm.data.tokenizer import check_model_dir, load_tokenizer
from gpt4llm.models import attention
from gpt4llm.models.zero3 import gathered

log = logging.getLogger(__name__)


def prepare_tokenizer(path: str, tiny: dict | None = None, backend: str = "auto", template: str = "alpaca"):
    """The tokenizer of the configured model (`cfg.model`), building the local tiny model first if it is the one, made
    to render `template` (data.templates: a named template's special tokens are added here, before the model sizes
    its embeddings to the tokenizer)."""
    if tiny:
        from gpt4llm.models.tiny import build_tiny_model

        build_tiny_model(path, **tiny)
    tokenizer = load_tokenizer(path, backend=backend)
    apply_template(tokenizer, template, f"model.path={path}")
    return tokenizer


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
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, dtype) if dtype else None, **extra, **quantized_loading(quantization)
    )
    log.info(f"Loaded {path} in {time.perf_counter() - start:.1f}s")
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        resize_embeddings_with_mean(model, len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


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
