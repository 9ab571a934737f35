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
    """The settings as plain Python (a composed config's DictConfig and ListConfig become dict and list), checked
    (`check_lora`) where they ask for LoRA."""
    if not settings:
        return None
    from omegaconf import DictConfig, OmegaConf

    settings = OmegaConf.to_container(settings, resolve=True) if isinstance(settings, DictConfig) else dict(settings)
    return check_lora(settings) if active(settings) else settings


BIASES = ("none", "all", "lora_only")


def check_lora(settings: dict) -> dict:
    """A ConfigError, one line at start, for settings under which nothing would train or peft would fail mid-setup;
    `target_modules` as LLaMA-Factory and a command line spell it (`all`, a single name) made peft's."""
    r, alpha, dropout = settings.get("r"), settings.get("lora_alpha"), settings.get("lora_dropout", 0.0)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ConfigError(f"peft.r={r!r}: LoRA's rank is a whole number of at least 1 (8 to 64 are usual)")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ConfigError(
            f"peft.lora_alpha={alpha!r}: the adapters' output is scaled by lora_alpha / r, so it must be above 0 "
            f"(alpaca-lora uses 16 with r 8)"
        )
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ConfigError(
            f"peft.lora_dropout={dropout!r}: the share of the adapters' inputs dropped, at least 0 and below 1 "
            f"(1 drops them all, and nothing trains)"
        )
    if settings.get("bias", "none") not in BIASES:
        raise ConfigError(f"peft.bias={settings.get('bias')!r}: choose one of {', '.join(BIASES)}")
    targets = settings.get("target_modules")
    if targets in ("all", "all-linear"):  # LLaMA-Factory spells peft's all-linear "all"
        targets = "all-linear"
    elif isinstance(targets, str) and targets.strip():
        targets = [t.strip() for t in targets.split(",")]  # `peft.target_modules=q_proj` or `=q_proj,v_proj`
    if not targets or (isinstance(targets, list) and not all(isinstance(t, str) and t for t in targets)):
        raise ConfigError(
            f"peft.target_modules={targets!r}: name the layers to adapt, e.g. [q_proj,v_proj], or all-linear"
        )
    return settings | {"target_modules": targets}


def check_targets(model_path: str, auto_mapping, targets) -> None:
    """Every named target matches a layer of the model at `model_path` (peft drops one that matches nothing without a
    word, or fails when none does): a ConfigError naming it and the model's linear layers. Built on the meta device
    from its config, so it costs nothing and runs before the run starts."""
    if not isinstance(targets, list):
        return
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = auto_mapping[type(config)]._from_config(config)
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ConfigError(
            f"peft.target_modules: {', '.join(missing)} matches no layer of {type(model).__name__}; its linear "
            f"layers are {', '.join(linear)} (or use all-linear)"
        )


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


def wrap(model, settings: dict | None, task_type: str, gradient_checkpointing: bool = False, new_token_ids=()):
    """`model` with LoRA adapters (only they, a reward model's head and the rows of `new_token_ids` train), or `model`
    as it is for peft=none.

    New tokens' rows (input embeddings, and the output layer's where it is not tied) train through peft's
    `trainable_token_indices` and are saved in the adapter (a few rows, not the whole matrices that LLaMA-Factory's
    `modules_to_save` keeps): the adapter then loads with peft's documented steps, `base.resize_token_embeddings(
    len(tokenizer))` and `PeftModel.from_pretrained`, whatever the resize fills the new rows with."""
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
    tokens = new_token_layers(model, list(new_token_ids)) if new_token_ids else None
    config = LoraConfig(task_type=task_type, modules_to_save=save, trainable_token_indices=tokens, **lora)
    model = get_peft_model(model, config, autocast_adapter_dtype=not zero3)
    if zero3:
        initialize_partitioned_adapters(model)
    return model


def new_token_layers(model, ids: list[int]) -> dict[str, list[int]]:
    """peft's `trainable_token_indices`: the embedding layers (by module name) whose rows `ids` train."""
    names = {module: name for name, module in model.named_modules()}
    layers = {names[model.get_input_embeddings()]: ids}
    head = model.get_output_embeddings()
    if head is not None and head.weight is not model.get_input_embeddings().weight:  # untied (LLaMA): its own rows
        layers[names[head]] = ids
    return layers


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
