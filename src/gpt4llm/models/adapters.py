"""Parameter-efficient training through `peft`: LoRA adapters on any backbone a task loads (`peft=lora`), and QLoRA,
LoRA on a base loaded in 4-bit NF4 by bitsandbytes (`peft=qlora`). The tasks do not know about it beyond which
parameters train: the LightningModule base wraps its backbone here, checkpoints keep the trainable tensors alone, and
the export writes the adapter in peft's format and a merged model (models.export).

Settings (conf/peft/*.yaml): `method` (none | lora), LoraConfig's r, lora_alpha, lora_dropout, target_modules (a list
or "all-linear"), bias, use_rslora, use_dora; `quantization` (BitsAndBytesConfig's 4-bit settings, QLoRA).
"""

from __future__ import annotations

from typing import Any

import torch

from gpt4llm.errors import ConfigError

LORA_KEYS = ("r", "lora_alpha", "lora_dropout", "target_modules", "bias", "use_rslora", "use_dora")


def plain(settings) -> dict | None:
    """The settings as plain Python (a composed config's DictConfig and ListConfig become dict and list)."""
    if not settings:
        return None
    from omegaconf import DictConfig, OmegaConf

    return OmegaConf.to_container(settings, resolve=True) if isinstance(settings, DictConfig) else dict(settings)


def active(settings: dict | None) -> bool:
    method = (settings or {}).get("method", "none")
    if method not in ("none", "lora"):
        raise ConfigError(f"peft.method={method!r}: choose none or lora (peft=none|lora|qlora)")
    return method == "lora"


def quantization_config(settings: dict | None):
    """transformers' BitsAndBytesConfig for a QLoRA base, None without quantization. A ConfigError, at start, where
    bitsandbytes cannot load 4-bit weights here."""
    quantization = dict((settings or {}).get("quantization") or {})
    if not quantization:
        return None
    check_4bit()
    from transformers import BitsAndBytesConfig

    dtype = quantization.pop("bnb_4bit_compute_dtype", "bfloat16")
    return BitsAndBytesConfig(**quantization, bnb_4bit_compute_dtype=getattr(torch, dtype))


def check_4bit() -> None:
    """bitsandbytes is importable and quantizes a linear layer to 4 bits on this machine; else a ConfigError."""
    try:
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(torch.randn(64, 64), requires_grad=False, quant_type="nf4")
        layer.to("cuda" if torch.cuda.is_available() else "cpu")(torch.randn(1, 64, device=layer.weight.device))
    except Exception as err:  # not installed, no kernels for this device: bitsandbytes' many error types
        raise ConfigError(
            f"peft=qlora needs bitsandbytes' 4-bit layers, which do not run here ({type(err).__name__}: "
            f"{str(err)[:160]}): pip install 'gpt4llm[qlora]', or use peft=lora"
        ) from None


def wrap(model, settings: dict | None, task_type: str, gradient_checkpointing: bool = False):
    """`model` with LoRA adapters (only they, and a reward model's head, train), or `model` as it is for peft=none."""
    if not active(settings):
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False):
        # casts norms to fp32, makes the input embeddings' output require grad (for checkpointing), as QLoRA does
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.enable_input_require_grads()  # the frozen embeddings' output must carry a grad through checkpoints
    lora: dict[str, Any] = {k: settings[k] for k in LORA_KEYS if settings.get(k) is not None}
    if isinstance(lora.get("target_modules"), (list, tuple)):
        lora["target_modules"] = list(lora["target_modules"])
    save = ["score"] if task_type == "SEQ_CLS" else None  # the reward head trains, as TRL and LLaMA-Factory do
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    zero3 = is_deepspeed_zero3_enabled()
    # peft keeps adapters in fp32 over a 16-bit base; under ZeRO-3 every trainable tensor must share the base's
    # dtype (DeepSpeed keeps the fp32 master copies itself)
    config = LoraConfig(task_type=task_type, modules_to_save=save, **lora)
    model = get_peft_model(model, config, autocast_adapter_dtype=not zero3)
    if zero3:
        initialize_partitioned_adapters(model)
    return model


def initialize_partitioned_adapters(model) -> None:
    """Under ZeRO-3 (Lightning builds the model inside deepspeed.zero.Init) a new adapter is partitioned as it is
    made, so peft's initialisation (B = 0, so that training starts from the base model) wrote into empty
    placeholders and the adapters kept torch's default init. It is done again on the gathered tensors."""
    from peft.tuners.lora import LoraLayer

    from gpt4llm.models.zero3 import gathered

    for module in model.modules():
        if isinstance(module, LoraLayer):
            params = [p for name, p in module.named_parameters() if "lora_" in name]
            with gathered(params):
                for name in module.active_adapters:
                    module.reset_lora_parameters(name, model.peft_config[name].init_lora_weights)


def is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def backbone(model):
    """The transformers model (a PeftModel's, with its adapters in place, or `model`)."""
    return model.get_base_model() if is_peft(model) else model


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, all) parameters, counted as the model holds them: a 4-bit tensor packs two weights per byte,
    ZeRO-3 keeps full sizes in `ds_numel`."""
    trainable = total = 0
    for p in model.parameters():
        n = int(getattr(p, "ds_numel", p.numel()))
        if p.__class__.__name__ == "Params4bit":
            n *= 2
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def trainable_names(module) -> set[str]:
    """The names (in `module`'s state dict) of the tensors that train: what a checkpoint of an adapter run keeps."""
    return {name for name, p in module.named_parameters() if p.requires_grad}


def merge_into_base(base, adapter_dir):
    """`base` with the adapter in `adapter_dir` loaded by peft itself (as a user would) and merged into its weights."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
