"""Plan: `python -m gpt4llm.plan [the overrides you give train]` (conf/plan.yaml, which composes conf/train.yaml).

For the composed run, before anything is launched: memory per GPU (parameters, gradients, optimizer states,
activations with and without gradient checkpointing, buffers), what is offloaded to CPU and the CPU memory per node,
whether that fits the devices, and the training FLOPs and time at a stated utilisation. Prints a table and writes
plan.json in its run directory. Nothing is downloaded: the architecture comes from a local model directory, the tiny
model's spec, or the `arch` block of conf/model/<name>.yaml.

Model-state bytes follow DeepSpeed's own estimators (estimate_zero2_model_states_mem_needs and
estimate_zero3_model_states_mem_needs in deepspeed/runtime/zero/), split into parameters, gradients and optimizer
states; DDP and FSDP are counted the same way (tests/test_plan.py checks the DeepSpeed figures against DeepSpeed).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

from omegaconf import DictConfig

from gpt4llm.errors import ConfigError, LaunchError
from gpt4llm.training.flops import training_flops
from gpt4llm.training.hardware import check_precision, derive_accumulation

GIB = 2**30
ADAM_BYTES = 8  # Adam's two fp32 moments per parameter


# --------------------------------------------------------------------------------------------- the architecture
@dataclass(frozen=True)
class Arch:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int  # embedding rows as trained: the model's vocabulary plus tokens the tokenizer adds ([PAD])
    tie_word_embeddings: bool = False


def arch_of(model_cfg) -> Arch:
    """The architecture of `cfg.model`: the tiny spec, a local directory's config.json and tokenizer, or `arch`."""
    if model_cfg.get("tiny"):
        from gpt4llm.io.model_dirs import refuse_foreign_directory

        refuse_foreign_directory(Path(str(model_cfg.path)))  # a model of yours there: you meant model=hf
        return _tiny_arch(model_cfg.tiny)
    path = Path(str(model_cfg.path))
    if path.is_dir() and (path / "config.json").exists():
        return _local_arch(path)
    return _declared_arch(model_cfg)


def _tiny_arch(t) -> Arch:
    return Arch(
        t.hidden_size,
        t.num_hidden_layers,
        t.num_attention_heads,
        t.num_attention_heads,
        t.intermediate_size,
        t.vocab_size,
    )


def _local_arch(path: Path) -> Arch:
    """A model directory's config.json, with the embedding rows its tokenizer makes it grow to."""
    from transformers import AutoConfig

    from gpt4llm.data.tokenizer import load_tokenizer

    config = AutoConfig.from_pretrained(path)
    if config.model_type != "llama":
        raise ConfigError(f"{path}: model_type {config.model_type!r}; the plan knows LLaMA-architecture models")
    rows = config.vocab_size
    if (path / "tokenizer_config.json").exists() or (path / "tokenizer.model").exists():
        rows = max(rows, len(load_tokenizer(str(path))))  # load_causal_lm resizes the embeddings to this
    return Arch(
        config.hidden_size,
        config.num_hidden_layers,
        config.num_attention_heads,
        config.num_key_value_heads or config.num_attention_heads,
        config.intermediate_size,
        rows,
        bool(config.tie_word_embeddings),
    )


def _declared_arch(model_cfg) -> Arch:
    """The model config's `arch` block, for a model that is not on this machine."""
    arch = model_cfg.get("arch")
    if not arch:
        raise ConfigError(
            f"model.path={model_cfg.path} is not a local model directory and the model config has no `arch` block: "
            "point model.path at a local directory, or add arch (see conf/model/llama7b.yaml)"
        )
    if arch.get("model_type", "llama") != "llama":
        raise ConfigError(f"model.arch.model_type={arch.model_type!r}; the plan knows LLaMA-architecture models")
    return Arch(
        arch.hidden_size,
        arch.num_hidden_layers,
        arch.num_attention_heads,
        arch.get("num_key_value_heads") or arch.num_attention_heads,
        arch.intermediate_size,
        arch.vocab_size + arch.get("added_tokens", 0),
        bool(arch.get("tie_word_embeddings", False)),
    )


def llama_parameters(a: Arch) -> dict[str, int]:
    """Exact parameter counts of LlamaForCausalLM (no biases): embeddings V x h; per decoder layer q and o h x h, k and
    v h x (kv_heads x head_dim), gate, up and down h x i, two RMSNorms h; a final RMSNorm h; an untied lm_head V x h."""
    h, i, v = a.hidden_size, a.intermediate_size, a.vocab_size
    kv = a.num_key_value_heads * (h // a.num_attention_heads)
    layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    embedding = v * h
    head = 0 if a.tie_word_embeddings else v * h
    total = embedding + a.num_hidden_layers * layer + h + head
    return {
        "total": total,
        "embedding": embedding,
        "per_layer": layer,
        "lm_head": head,
        # DeepSpeed's "largest layer": the most parameters one module holds itself (the embedding, for LLaMA)
        "largest_module": max(embedding, head, h * i, h * h),
        # FSDP's largest unit with one unit per decoder layer: the root keeps embeddings, final norm and lm_head
        "largest_fsdp_unit": max(layer, embedding + head + h),
    }


# ------------------------------------------------------------------------------------------------ the set-up
@dataclass(frozen=True)
class Setup:
    strategy: str  # deepspeed | fsdp | ddp | single
    gpus_per_node: int
    nodes: int
    precision: str
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_parameters: bool = False
    fsdp_sharding: str = "FULL_SHARD"
    fsdp_cpu_offload: bool = False
    fsdp2: bool = False  # fully_shard (FSDP2Strategy): its reshard_after_forward true/false is FULL_SHARD/SHARD_GRAD_OP
    ddp_bucket_view: bool = False
    overlap_comm: bool = True
    allgather_bucket_size: int = 200_000_000
    reduce_bucket_size: int = 200_000_000
    prefetch_bucket_size: int = 50_000_000

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def half(self) -> bool:
        return not self.precision.startswith("32")

    @property
    def label(self) -> str:
        if self.strategy == "deepspeed":
            off = [
                n for n, on in (("optimizer", self.offload_optimizer), ("parameters", self.offload_parameters)) if on
            ]
            return f"DeepSpeed ZeRO-{self.zero_stage}" + (f", offload {' + '.join(off)} to CPU" if off else "")
        if self.strategy == "fsdp" and self.fsdp2:
            keeps = "reshard after forward" if self.fsdp_sharding == "FULL_SHARD" else "gathered until backward"
            return f"FSDP2 ({keeps})" + (", CPU offload" if self.fsdp_cpu_offload else "")
        if self.strategy == "fsdp":
            return f"FSDP {self.fsdp_sharding}" + (", CPU offload" if self.fsdp_cpu_offload else "")
        return {"ddp": "DDP", "single": "one device"}[self.strategy]


def setup_of(cfg: DictConfig, devices_per_node: int) -> Setup:
    s, t = cfg.strategy, cfg.trainer
    devices = _device_count(t.devices, devices_per_node)
    nodes, precision = int(t.num_nodes), str(t.precision)
    target = str(s.get("_target_", "")) if isinstance(s, DictConfig) else ""
    common = dict(gpus_per_node=devices, nodes=nodes, precision=precision)
    if target.endswith("DeepSpeedStrategy"):
        return Setup(
            "deepspeed",
            zero_stage=int(s.get("stage", 2)),
            offload_optimizer=bool(s.get("offload_optimizer", False)),
            offload_parameters=bool(s.get("offload_parameters", False)),
            overlap_comm=bool(s.get("overlap_comm", True)),
            allgather_bucket_size=int(s.get("allgather_bucket_size", 200_000_000)),
            reduce_bucket_size=int(s.get("reduce_bucket_size", 200_000_000)),
            prefetch_bucket_size=int(s.get("stage3_prefetch_bucket_size", 50_000_000)),
            **common,
        )
    if target.endswith("FSDP2Strategy"):  # the same states as FSDP's: the gathered units differ in name only
        sharding = "FULL_SHARD" if s.get("reshard_after_forward", True) else "SHARD_GRAD_OP"
        return Setup("fsdp", fsdp_sharding=sharding, fsdp_cpu_offload=bool(s.get("cpu_offload")), fsdp2=True, **common)
    if target.endswith("FSDPStrategy"):
        sharding = str(s.get("sharding_strategy", "FULL_SHARD"))
        if sharding == "NO_SHARD":
            return Setup("ddp", **common)
        return Setup("fsdp", fsdp_sharding=sharding, fsdp_cpu_offload=bool(s.get("cpu_offload") or False), **common)
    if target.endswith("DDPStrategy"):
        return Setup("ddp", ddp_bucket_view=bool(s.get("gradient_as_bucket_view", False)), **common)
    return Setup("single" if devices * nodes == 1 else "ddp", **common)  # "auto": Lightning picks DDP for several


def _device_count(devices, devices_per_node: int) -> int:
    """Devices per node from `trainer.devices`: a count, "0,1,2" or a list of ids, or all of them ("auto", -1)."""
    if isinstance(devices, str) and devices not in ("auto", "-1"):
        return len([d for d in devices.split(",") if d.strip()]) if "," in devices else int(devices)
    if devices in ("auto", "-1", -1, None):
        return int(devices_per_node)
    if not isinstance(devices, int):
        return len(devices)  # a list of device ids
    return devices


# ----------------------------------------------------------------------------------------------- model states
def model_states(s: Setup, total: int, largest_module: int, largest_unit: int, cpu_factor: float = 1.5) -> dict:
    """Bytes of parameters, gradients and optimizer states per GPU, and per node on CPU (the offloaded part, or the
    full model each process loads before training).

    DeepSpeed (bytes per parameter, P parameters, N GPUs, n nodes, g GPUs per node), as its estimators:
      ZeRO-2: parameters 2 on every GPU; gradients 2 + 4 (16-bit and fp32) and optimizer 4 + 8 (fp32 master, Adam)
              sharded: 2P + 18P/N. Optimizer offload moves the sharded part to CPU, where the estimator counts
              max(4N, 16) x P.
      ZeRO-3: parameters 2, gradients 4 (fp32 partition), optimizer 12, all sharded: 18P/N, plus the largest module
              gathered (4 bytes per parameter: 16-bit, twice for prefetch). Offload moves the optimizer part (16 with
              the gradients) and the parameters (2) to CPU.
      Without fp16 (32-true) the 16-bit copies are fp32 and there is no separate master copy.
    DDP (Lightning's AMP keeps fp32 weights): parameters 4 (+2 for autocast's 16-bit copies kept for backward),
      gradients 4 (+4 when DDP's buckets hold a copy), Adam 8, all on every GPU.
    FSDP: fp32 parameters, gradients and Adam sharded (16P/N), plus two units (current and prefetched) gathered in
      16-bit; SHARD_GRAD_OP keeps the gathered 16-bit parameters from forward to backward (2P).
    CPU figures include DeepSpeed's estimation factor cpu_factor (its additional_buffer_factor, 1.5).
    """
    if s.strategy == "deepspeed" and s.zero_stage == 3:
        parameters, gradients, optimizer, cpu = _zero3_states(s, total, largest_module)
    elif s.strategy == "deepspeed":
        parameters, gradients, optimizer, cpu = _zero12_states(s, total)
    elif s.strategy == "fsdp":
        parameters, gradients, optimizer, cpu = _fsdp_states(s, total, largest_unit)
    else:
        parameters, gradients, optimizer, cpu = _ddp_states(s, total)
    gpu = {"parameters": parameters, "gradients": gradients, "optimizer": optimizer}
    gpu["total"] = parameters + gradients + optimizer
    return {"gpu": gpu, "cpu_per_node": cpu * cpu_factor}


# Each: bytes per GPU of (parameters, gradients, optimizer states), and per node on CPU, before cpu_factor.
def _zero3_states(s: Setup, P: int, largest_module: int) -> tuple[float, float, float, float]:
    N, n, g = s.world, s.nodes, s.gpus_per_node
    p = 2 if s.half else 4  # bytes of the weights computed with
    master = 4 if s.half else 0  # fp32 master copy beside 16-bit weights
    gathered = 2 * p * largest_module
    grads, optim = 4, master + ADAM_BYTES
    parameters = gathered + (0 if s.offload_parameters else p * P / N)
    if s.offload_optimizer:
        # zero.Init (Lightning's sharded context) builds each rank's shard only: CPU holds shards, not models
        return parameters, 0.0, 0.0, (grads + optim + (p if s.offload_parameters else 0)) * P / n
    # zero.Init materialises one module at a time, in fp32
    return parameters, grads * P / N, optim * P / N, 4 * largest_module * g


def _zero12_states(s: Setup, P: int) -> tuple[float, float, float, float]:
    N, g = s.world, s.gpus_per_node
    p = 2 if s.half else 4
    master = 4 if s.half else 0
    grads = (p + 4) if s.half else 4
    if s.offload_optimizer:
        return p * P, 0.0, 0.0, max(4 * N, 16) * P  # the estimator's figure (4 bytes for every GPU of the job)
    # every process loads the fp32 model before DeepSpeed takes it
    return p * P, grads * P / N, (master + ADAM_BYTES) * P / N, 4 * P * g


def _fsdp_states(s: Setup, P: int, largest_unit: int) -> tuple[float, float, float, float]:
    p = 2 if s.half else 4
    shards = s.gpus_per_node if s.fsdp_sharding.startswith("HYBRID") else s.world
    gathered = 2 * p * largest_unit
    if s.fsdp_sharding == "SHARD_GRAD_OP":
        gathered = p * P
    if s.fsdp_cpu_offload:
        return gathered, 0.0, 0.0, 16 * P / s.nodes
    # from_pretrained materialises the full fp32 model in every process before sharding
    return gathered + 4 * P / shards, 4 * P / shards, ADAM_BYTES * P / shards, 4 * P * s.gpus_per_node


def _ddp_states(s: Setup, P: int) -> tuple[float, float, float, float]:
    """DDP, or one device."""
    parameters = 4 * P + (2 * P if s.half and s.precision.endswith("mixed") else 0)
    gradients = 4 * P * (1 if s.ddp_bucket_view or s.strategy == "single" else 2)
    return parameters, gradients, ADAM_BYTES * P, 4 * P * s.gpus_per_node


def buffer_bytes(s: Setup) -> float:
    """DeepSpeed's communication buckets per GPU. ZeRO-1/2 with overlap_comm uses 4.5x the allgather and reduce
    bucket sizes (Hugging Face's DeepSpeed guide: 5e8 x 2 bytes x 2 x 4.5 = 9 GB); ZeRO-3 double-buffers the reduce
    bucket and keeps one prefetch bucket. DDP's and FSDP's buffers are in the overhead."""
    if s.strategy != "deepspeed":
        return 0.0
    p = 2 if s.half else 4
    if s.zero_stage == 3:
        return p * (s.reduce_bucket_size * (2 if s.overlap_comm else 1) + s.prefetch_bucket_size)
    return p * (s.allgather_bucket_size + s.reduce_bucket_size) * (4.5 if s.overlap_comm else 1)


# ----------------------------------------------------------------------------------------------- adapters
LORA_MODULES = {  # LLaMA's linear layers: (in, out) features, as functions of hidden, kv width and intermediate
    "q_proj": lambda h, kv, i: (h, h),
    "k_proj": lambda h, kv, i: (h, kv),
    "v_proj": lambda h, kv, i: (h, kv),
    "o_proj": lambda h, kv, i: (h, h),
    "gate_proj": lambda h, kv, i: (h, i),
    "up_proj": lambda h, kv, i: (h, i),
    "down_proj": lambda h, kv, i: (i, h),
}


def lora_targets(target_modules) -> list[str]:
    """The LLaMA linear layers LoRA wraps: a list of names, or peft's "all-linear" (every linear but the output
    layer)."""
    if target_modules == "all-linear":
        return list(LORA_MODULES)
    unknown = [t for t in target_modules if t not in LORA_MODULES]
    if unknown:
        raise ConfigError(
            f"peft.target_modules: the plan knows LLaMA's {', '.join(LORA_MODULES)} or all-linear, not {unknown}"
        )
    return list(target_modules)


def lora_parameters(a: Arch, r: int, target_modules) -> int:
    """The adapters' parameters: r x (in + out) for every targeted linear layer of every decoder layer (A and B)."""
    kv = a.num_key_value_heads * (a.hidden_size // a.num_attention_heads)
    per_layer = sum(
        r * sum(LORA_MODULES[t](a.hidden_size, kv, a.intermediate_size)) for t in lora_targets(target_modules)
    )
    return a.num_hidden_layers * per_layer


def adapter_states(
    s: Setup, a: Arch, total: int, adapters: int, quantized: bool, base_bytes: int, optimizer_bytes: float = ADAM_BYTES
) -> dict:
    """Bytes per GPU of a LoRA run: the frozen base in its dtype (4-bit NF4 for QLoRA: half a byte per linear weight
    plus its double-quantized scales, the embeddings and output layer in the compute dtype), and the adapters in fp32
    with their gradients and optimizer states. ZeRO-3 and FSDP shard the base across the GPUs."""
    linear = a.num_hidden_layers * (llama_parameters(a)["per_layer"] - 2 * a.hidden_size)
    if quantized:  # NF4: 4 bits; blocks of 64 with an 8-bit scale, and those in blocks of 256 with an fp32 one
        base = linear * (0.5 + 1 / 64 + 4 / (64 * 256)) + (total - linear) * base_bytes
    else:
        base = total * base_bytes
    shards = s.world if (s.strategy == "deepspeed" and s.zero_stage == 3) or s.strategy == "fsdp" else 1
    return {
        "parameters": base / shards + 4 * adapters,
        "gradients": 4 * adapters,
        "optimizer": optimizer_bytes * adapters,
    }


def lora_activation_bytes(
    a: Arch,
    s: Setup,
    micro_batch: int,
    seq: int,
    r: int,
    target_modules,
    dropout: float,
    checkpointing: bool,
    mask_bytes: int = 1,
    loss_chunk: int | None = None,
) -> float:
    """Bytes kept for backward per GPU in a LoRA run, where the base is frozen (activation_bytes for full training).

    A frozen linear layer keeps nothing of its input (its weight's gradient is not asked for), so per decoder layer
    and token what stays is: each RMSNorm's fp32 input (4h; its weight frozen, its output not kept); attention's q, k
    (after RoPE), v and output (4xh); SiLU's input and both factors of the SwiGLU product (3xi; down_proj keeps
    nothing). Each adapter adds its A's r outputs (kept by B) and A's input: with dropout a new tensor and its mask
    (x + `mask_bytes` per input feature: a bool on GPUs, torch keeps the mask in the input's dtype on the CPU),
    without dropout the layer input itself, shared by the layers that read it (the
    attention norm's output for q, k, v; the MLP norm's for gate and up; the product for down; o_proj reads
    attention's output, kept already). Outside the layers: the final norm's input and the loss's logits (x + 8
    bytes per vocabulary entry), as for full training. Checkpointing keeps each layer's input (r h) and recomputes one
    layer during backward."""
    h, i, L, v = a.hidden_size, a.intermediate_size, a.num_hidden_layers, a.vocab_size
    x = 2 if s.half else 4
    res = 2 if s.half and not (s.strategy in ("ddp", "single") and s.precision.endswith("mixed")) else 4
    kv = a.num_key_value_heads * (h // a.num_attention_heads)
    targets = lora_targets(target_modules)
    layer = 2 * 4 * h + 4 * x * h + 3 * x * i + sum(r * x for _ in targets)
    if dropout > 0:
        layer += sum((x + mask_bytes) * LORA_MODULES[t](h, kv, i)[0] for t in targets)
    else:
        read = {"attention norm": {"q_proj", "k_proj", "v_proj"}, "mlp norm": {"gate_proj", "up_proj"}}
        layer += x * h * sum(bool(set(targets) & names) for names in read.values()) + x * i * ("down_proj" in targets)
    per_token = (L * res * h + layer if checkpointing else L * layer) + 4 * h
    return per_token * micro_batch * seq + loss_bytes(x, h, v, micro_batch * seq, loss_chunk)


def loss_bytes(x: int, h: int, v: int, tokens: int, chunk: int | None) -> float:
    """The loss's logits: x + 8 bytes per vocabulary entry (16-bit logits, their fp32 copy and log-softmax; a peak)
    for every token, or, chunked (models.response_logps), for one chunk of positions at a time, plus the final hidden
    state of every token that the chunks are recomputed from (x h)."""
    if chunk is None:
        return (x + 8) * v * tokens
    return (x + 8) * v * min(tokens, chunk) + x * h * tokens


# ----------------------------------------------------------------------------------------------- activations
def activation_bytes(
    a: Arch,
    s: Setup,
    micro_batch: int,
    seq: int,
    checkpointing: bool,
    attention: str = "sdpa",
    loss_chunk: int | None = None,
) -> float:
    """Bytes kept for backward per GPU, for micro_batch sequences of seq tokens.

    Per decoder layer and token, after Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
    Transformer Models": s b h (34 + 5 a s / h) for GPT), redone for LLaMA, with `x` bytes per 16-bit/32-bit
    activation and `r` bytes per residual-stream value (fp32 under Lightning's AMP, 16-bit when DeepSpeed or FSDP
    cast the weights):
      two RMSNorms, each: its fp32 input (4h), the normalised value (r h), the weighted output that the next
                 matmuls keep (x h; under autocast each of them keeps its own 16-bit cast: 3 for q, k, v, 2 for
                 gate, up)
      attention: q and k after RoPE, v, the attention output that o_proj keeps              4 x h
                 (eager attention also keeps the fp32 softmax and its 16-bit copy: (4 + x) heads s)
      SwiGLU MLP: gate output, SiLU output, up output and their product                     4 x i
    LLaMA has no dropout, so there are no masks to keep. Whole model: every layer, plus the final norm and the
    loss: 16-bit logits, their fp32 copy and log-softmax (x + 8 bytes per vocabulary entry; a peak, not all kept),
    for one chunk of `loss_chunk` positions at a time where the task's loss is chunked (`loss_bytes`).
    With gradient checkpointing (one checkpoint per decoder layer, as transformers does it) only each layer's
    input stays (r h), plus one layer recomputed during backward.
    The per-layer figures match, within 3%, the tensors a real LlamaForCausalLM saves for backward (fp32, bf16,
    bf16 autocast; sdpa and eager; with and without checkpointing: tests/test_plan.py).
    """
    h, i, L, v = a.hidden_size, a.intermediate_size, a.num_hidden_layers, a.vocab_size
    x = 2 if s.half else 4
    autocast = s.strategy in ("ddp", "single") and s.precision.endswith("mixed")  # fp32 weights, 16-bit matmuls
    r = 2 if s.half and not autocast else 4
    norm = (4 + r + x) * h
    layer = 2 * norm + (3 * x * h if autocast else 0) + 4 * x * h + 4 * x * i
    if attention == "eager":
        layer += (4 + (x if s.half else 0)) * a.num_attention_heads * seq  # in fp32 the "copy" is the same tensor
    per_token = (L * r * h + layer if checkpointing else L * layer) + norm
    return per_token * micro_batch * seq + loss_bytes(x, h, v, micro_batch * seq, loss_chunk)


# ----------------------------------------------------------------------------------------------- the plan
def examples_per_epoch(cfg: DictConfig) -> int | None:
    d = cfg.data
    records = cfg.plan.get("examples") or d.get("num_records") or ((d.get("demo") or {}).get("num_records"))
    if not records:
        return None
    if cfg.plan.get("examples"):
        return int(records)
    from gpt4llm.data.base_datamodule import held_out

    return int(records) - held_out(d.get("val_size") or 0, int(records))


@dataclass(frozen=True)
class GpuBytes:
    parameters: float
    gradients: float
    optimizer: float
    model_states: float
    activations_with_checkpointing: float
    activations_without_checkpointing: float
    buffers: float
    overhead: float
    total: float
    # online RL (task=grpo|rloo): the KV cache of the sequences generated at once, and a reward model's weights
    rollout_kv_cache: float = 0.0
    reward_model: float = 0.0


@dataclass(frozen=True)
class OffloadTraffic:
    """What offloaded states move over PCIe: a lower bound on the step time when the transfers do not overlap."""

    bytes_per_gpu_per_step: float
    seconds_per_step: float | None
    seconds_total: float | None = None


@dataclass(frozen=True)
class Plan:
    """Everything `python -m gpt4llm.plan` says about a run; plan.json is `as_json()`."""

    model: str
    arch: Arch
    parameters: dict[str, int]
    device: str
    device_memory_gib: float | None
    node_memory_gib: float | None
    setup: Setup
    optimizer: str  # what HFBackboneModule.configure_optimizers will build for this strategy (plans are for GPUs)
    micro_batch: int
    max_length: int
    accumulation: int | None  # None: the global batch is not a multiple of micro-batch x devices (a problem)
    global_batch: int
    gradient_checkpointing: bool
    gpu_bytes: GpuBytes
    cpu_bytes_per_node: float
    fits: bool | None  # None: the device's memory is not known
    fits_without_checkpointing: bool | None
    cpu_fits: bool | None
    examples_per_epoch: int | None
    tokens_per_example: int
    tokens_per_example_is_upper_bound: bool
    optimizer_steps: int | None
    training_tokens: int | None
    training_flops: float | None
    peak_tflops_per_device: float | None
    utilization: float
    hours: float | None
    reference_pass_hours: float | None  # DPO's precomputed reference: one forward pass over the data before step 1
    offload_traffic: OffloadTraffic | None
    problems: list[str]

    def as_json(self) -> dict:
        return asdict(self) | {"setup": asdict(self.setup) | {"label": self.setup.label, "world": self.setup.world}}


def make_plan(cfg: DictConfig, device: str | None = None) -> Plan:
    plan_cfg = cfg.plan
    device = _plan_device(plan_cfg, device or plan_cfg.device)
    hw = plan_cfg.devices[device]
    arch = arch_of(cfg.model)
    counts = llama_parameters(arch)
    s = setup_of(cfg, hw.devices_per_node)
    precision_problems = _precision_problems(s, str(cfg.trainer.accelerator), hw, device)
    memory = _training_memory(cfg, arch, counts, s, device)
    checkpointing = bool(cfg.model.get("gradient_checkpointing", False))
    gpu_bytes = _gpu_bytes(memory, checkpointing, buffer_bytes(s), _overhead_bytes(cfg), *_rollout_bytes(cfg, arch, s))
    micro, seq = int(cfg.data.batch_size), int(cfg.data.max_length)
    accumulation, global_batch, batch_problems = _batch(cfg, micro, s.world)
    examples = examples_per_epoch(cfg)
    steps = _optimizer_steps(cfg, examples, s.world, micro, accumulation)
    tokens_per_example = int(plan_cfg.tokens_per_example or seq)
    tokens = steps * global_batch * tokens_per_example if steps else None
    flops = _flops_per_token(arch, counts, tokens_per_example) * tokens if tokens else None
    peak = hw.tflops.get(s.precision)
    return Plan(
        model=str(cfg.model.path),
        arch=arch,
        parameters=counts | {"trainable": memory.trainable},
        device=device,
        device_memory_gib=hw.memory_gib,
        node_memory_gib=hw.node_memory_gib,
        setup=s,
        optimizer=_optimizer_name(cfg, s),
        micro_batch=micro,
        max_length=seq,
        accumulation=accumulation,
        global_batch=global_batch,
        gradient_checkpointing=checkpointing,
        gpu_bytes=gpu_bytes,
        cpu_bytes_per_node=memory.cpu_per_node,
        fits=_within(gpu_bytes.total, hw.memory_gib),
        fits_without_checkpointing=_within(_total_without_checkpointing(gpu_bytes, checkpointing), hw.memory_gib),
        cpu_fits=_within(memory.cpu_per_node, hw.node_memory_gib),
        examples_per_epoch=examples,
        tokens_per_example=tokens_per_example,
        tokens_per_example_is_upper_bound=plan_cfg.tokens_per_example is None,
        optimizer_steps=steps,
        training_tokens=tokens,
        training_flops=flops,
        peak_tflops_per_device=peak,
        utilization=plan_cfg.utilization,
        hours=_hours(flops, peak, plan_cfg.utilization, s.world),
        reference_pass_hours=_reference_pass_hours(cfg, arch, counts, examples, tokens_per_example, peak, s.world),
        offload_traffic=offload_traffic(s, counts["total"], accumulation, checkpointing, steps, hw.host_link_gb_s),
        problems=precision_problems + batch_problems,
    )


def _plan_device(plan_cfg, device: str) -> str:
    """A key of plan.devices: the one asked for, or for "auto" the one the trainer config is written for."""
    if device == "auto":
        device = _trainer_choice_device(plan_cfg)
    if device not in plan_cfg.devices:
        raise ConfigError(f"plan.device={device}: not one of {', '.join(plan_cfg.devices)} (conf/plan.yaml)")
    return device


def _precision_problems(s: Setup, accelerator: str, hw, device: str) -> list[str]:
    """What train's precision check would stop the run for, as a problem of the plan (a device without a bf16 peak
    has no bf16)."""
    has_bf16 = any(str(k).startswith("bf16") for k in hw.tflops) if device != "cpu" else None
    try:
        check_precision(s.precision, accelerator, has_bf16, device)
    except LaunchError as err:
        return [str(err)]
    return []


@dataclass(frozen=True)
class TrainingMemory:
    """What training keeps: model states per GPU (parameters, gradients, optimizer, total), CPU memory per node, and
    the activations kept for backward with and without gradient checkpointing."""

    gpu: dict[str, float]
    cpu_per_node: float
    with_checkpointing: float
    without_checkpointing: float
    trainable: int


def _training_memory(cfg: DictConfig, arch: Arch, counts: dict[str, int], s: Setup, device: str) -> TrainingMemory:
    """Full training or adapters, and the frozen reference copy where the task keeps one; the task class says how
    many sequences an example puts through the forward pass and whether it keeps that copy."""
    from hydra.utils import get_object

    task = get_object(str(cfg.task._target_))
    sequences = task.sequences_for(cfg.task) * int(cfg.data.batch_size)
    states = model_states(
        s, counts["total"], counts["largest_module"], counts["largest_fsdp_unit"], cfg.plan.cpu_buffer_factor
    )
    peft = cfg.get("peft") or {}
    if peft.get("method", "none") == "lora":
        from omegaconf import OmegaConf

        from gpt4llm.models.adapters import plain

        peft = OmegaConf.create(plain(peft))  # checked as training checks them: no plan of negative parameters
        memory = _adapter_memory(
            cfg, peft, arch, counts["total"], s, sequences, device, states["cpu_per_node"], _loss_chunk(task, cfg, s)
        )
    else:
        memory = _full_memory(cfg, arch, counts["total"], s, sequences, states, _loss_chunk(task, cfg, s))
    if not task.keeps_frozen_copy(cfg.task):
        return memory
    return _with_frozen_copy(memory, counts["total"], s, quantized=bool(peft.get("quantization")))


def _loss_chunk(task, cfg: DictConfig, s: Setup) -> int | None:
    """The task's loss chunk (its class says), none under FSDP (the loss takes the model's whole logits there;
    FSDP2 runs the chunks inside the model's forward, models.response_logps.as_forward)."""
    return None if s.strategy == "fsdp" and not s.fsdp2 else task.loss_chunk(cfg.task)


def _full_memory(
    cfg: DictConfig, arch: Arch, total: int, s: Setup, sequences: int, states: dict, loss_chunk: int | None = None
) -> TrainingMemory:
    with_ckpt, without_ckpt = (
        activation_bytes(arch, s, sequences, int(cfg.data.max_length), c, cfg.plan.attention, loss_chunk)
        for c in (True, False)
    )
    return TrainingMemory(states["gpu"], states["cpu_per_node"], with_ckpt, without_ckpt, total)


def _adapter_memory(
    cfg: DictConfig,
    peft,
    arch: Arch,
    total: int,
    s: Setup,
    sequences: int,
    device: str,
    cpu_per_node: float,
    loss_chunk: int | None = None,
) -> TrainingMemory:
    """LoRA or QLoRA: the frozen base, the adapters' states (8-bit optimizers keep two bytes per parameter), and
    what the adapters keep for backward."""
    trainable = lora_parameters(arch, int(peft.r), peft.target_modules)
    dtype_bytes = {"float16": 2, "bfloat16": 2}.get(str(cfg.model.get("dtype")), 2 if s.half else 4)
    optimizer_bytes = 2 if "8bit" in str(cfg.task.optimizer.get("implementation", "")) else ADAM_BYTES
    gpu = adapter_states(s, arch, total, trainable, bool(peft.get("quantization")), dtype_bytes, optimizer_bytes)
    with_ckpt, without_ckpt = (
        lora_activation_bytes(
            arch,
            s,
            sequences,
            int(cfg.data.max_length),
            int(peft.r),
            peft.target_modules,
            float(peft.lora_dropout),
            c,
            mask_bytes=(2 if s.half else 4) if device == "cpu" else 1,
            loss_chunk=loss_chunk,
        )
        for c in (True, False)
    )
    return TrainingMemory(gpu | {"total": sum(gpu.values())}, cpu_per_node, with_ckpt, without_ckpt, trainable)


def _with_frozen_copy(memory: TrainingMemory, total: int, s: Setup, quantized: bool = False) -> TrainingMemory:
    """Plus a frozen copy of the model beside the one that trains, in the weights' dtype (a QLoRA reference is the
    4-bit base like the policy's: half a byte a weight), sharded like them under ZeRO-3 and FSDP."""
    shards = s.world if (s.strategy == "deepspeed" and s.zero_stage == 3) or s.strategy == "fsdp" else 1
    copy = total * (0.5 if quantized else 2 if s.half else 4) / shards
    gpu = memory.gpu | {"parameters": memory.gpu["parameters"] + copy, "total": memory.gpu["total"] + copy}
    return replace(memory, gpu=gpu)


def _overhead_bytes(cfg: DictConfig) -> float:
    """CUDA context, NCCL and fragmentation: on GPUs only."""
    return cfg.plan.overhead_gib * GIB if str(cfg.trainer.accelerator) != "cpu" else 0.0


def _rollout_bytes(cfg: DictConfig, arch: Arch, s: Setup) -> tuple[float, float]:
    """Online RL's own memory: the KV cache of the sequences the engine decodes at once (at most
    task.generation_rows of a step's prompts x num_generations, each up to model.max_length tokens, in the training
    dtype; not sharded, whatever the strategy), and the weights of a reward model export (`reward=model`: its weight
    files' size; 0 where reward.path is not a local directory). 0, 0 for the other tasks."""
    from hydra.utils import get_object

    task = get_object(str(cfg.task._target_))
    if getattr(task, "trains_on", None) != "prompts":
        return 0.0, 0.0
    rows = min(int(cfg.task.generation_rows), int(cfg.data.batch_size) * task.sequences_for(cfg.task))
    head_dim = arch.hidden_size // arch.num_attention_heads
    per_token = 2 * arch.num_hidden_layers * arch.num_key_value_heads * head_dim * (2 if s.half else 4)
    kv = rows * int(cfg.data.max_length) * per_token
    reward = cfg.get("reward") or {}
    path = Path(str(reward.get("path") or "")) if reward.get("kind") == "model" else None
    weights = 0.0
    if path is not None and path.is_dir():
        weights = float(sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".safetensors", ".bin")))
    return float(kv), weights


def _gpu_bytes(
    memory: TrainingMemory,
    checkpointing: bool,
    buffers: float,
    overhead: float,
    rollout_kv_cache: float = 0.0,
    reward_model: float = 0.0,
) -> GpuBytes:
    used = memory.with_checkpointing if checkpointing else memory.without_checkpointing
    return GpuBytes(
        parameters=memory.gpu["parameters"],
        gradients=memory.gpu["gradients"],
        optimizer=memory.gpu["optimizer"],
        model_states=memory.gpu["total"],
        activations_with_checkpointing=memory.with_checkpointing,
        activations_without_checkpointing=memory.without_checkpointing,
        buffers=buffers,
        overhead=overhead,
        total=memory.gpu["total"] + used + buffers + overhead + rollout_kv_cache + reward_model,
        rollout_kv_cache=rollout_kv_cache,
        reward_model=reward_model,
    )


def _total_without_checkpointing(g: GpuBytes, checkpointing: bool) -> float:
    used = g.activations_with_checkpointing if checkpointing else g.activations_without_checkpointing
    return g.total - used + g.activations_without_checkpointing


def _within(used: float, capacity_gib: float | None) -> bool | None:
    """Whether `used` bytes fit in `capacity_gib`; None when the capacity is not known."""
    return None if not capacity_gib else used <= capacity_gib * GIB


def _batch(cfg: DictConfig, micro: int, world: int) -> tuple[int | None, int, list[str]]:
    """Gradient accumulation and the global batch, derived as train derives them, and what stops that: with
    global_batch_size set, an accumulation of None and the problem."""
    accumulation = int(cfg.trainer.get("accumulate_grad_batches") or 1)
    if not cfg.get("global_batch_size"):
        return accumulation, micro * world * accumulation, []
    global_batch = int(cfg.global_batch_size)
    try:
        return derive_accumulation(global_batch, micro, world), global_batch, []
    except ConfigError as err:
        return None, global_batch, [str(err)]


def _optimizer_steps(
    cfg: DictConfig, examples: int | None, world: int, micro: int, accumulation: int | None
) -> int | None:
    """The run's optimizer steps as the LR schedule counts them; None when the data or the batch does not say."""
    from gpt4llm.data.base_datamodule import batches_per_epoch
    from gpt4llm.models.base_module import optimizer_steps

    max_steps = int(cfg.trainer.get("max_steps", -1))
    if not (accumulation and (examples or max_steps > 0)):
        return None
    batches = batches_per_epoch(examples, world, micro) if examples else 0
    epochs = cfg.trainer.get("max_epochs") if examples else None
    return optimizer_steps(batches, accumulation, epochs, max_steps) or None


def _flops_per_token(arch: Arch, counts: dict[str, int], tokens_per_example: int) -> float:
    # Useful training FLOPs (gpt4llm.training.flops, the formula `train/mfu` measures with): recomputation under
    # gradient checkpointing is not counted, it is part of what keeps utilisation below 1.
    matmul_params = counts["total"] - (0 if arch.tie_word_embeddings else counts["embedding"])
    return (
        training_flops(matmul_params, arch.num_hidden_layers, arch.hidden_size, [tokens_per_example])
        / tokens_per_example
    )


def _reference_pass_hours(cfg, arch, counts, examples, tokens_per_example, peak, world) -> float | None:
    """A forward pass (a third of a training step's FLOPs) over every held-out and training example, where the task
    precomputes a reference (DPO's default): the minutes a user waits before step 1, spent once per cache."""
    from hydra.utils import get_object

    task = get_object(str(cfg.task._target_))
    if not (examples and task.precomputes_reference(cfg.task)):
        return None
    from gpt4llm.data.base_datamodule import held_out

    held = held_out(cfg.data.get("val_size") or 0, examples)
    tokens = (examples + held) * task.sequences_for(cfg.task) * tokens_per_example
    return _hours(_flops_per_token(arch, counts, tokens_per_example) / 3 * tokens, peak, cfg.plan.utilization, world)


def _hours(flops: float | None, peak_tflops: float | None, utilization: float, world: int) -> float | None:
    seconds = flops / (utilization * peak_tflops * 1e12 * world) if (flops and peak_tflops) else None
    return seconds / 3600 if seconds else None


def _optimizer_name(cfg: DictConfig, s: Setup) -> str:
    """What HFBackboneModule.configure_optimizers will build for this strategy (plans are for GPUs)."""
    from gpt4llm.models.optim import CHOICES, optimizer_choice

    offloaded = s.strategy == "deepspeed" and s.offload_optimizer
    return CHOICES[optimizer_choice(offloaded, "gpu", cfg.task.optimizer.get("implementation", "auto"))]


def offload_traffic(
    s: Setup, parameters: int, accumulation: int | None, checkpointing: bool, steps: int | None, link_gb_s: float | None
) -> OffloadTraffic | None:
    """Offloaded parameters travel host->device for every forward and backward pass (and the recomputed forward),
    gradients device->host every micro-batch."""
    if not (s.strategy == "deepspeed" and (s.offload_optimizer or s.offload_parameters) and accumulation):
        return None
    p = 2 if s.half else 4
    passes = 3 if checkpointing else 2
    per_micro = (passes * p if s.offload_parameters else 0) + (p if s.offload_optimizer else 0)
    per_step = accumulation * per_micro * parameters / s.world
    if s.offload_optimizer and not s.offload_parameters:
        per_step += p * parameters / s.world  # updated parameters back to the GPU
    seconds = per_step / (link_gb_s * 1e9) if link_gb_s else None
    return OffloadTraffic(per_step, seconds, seconds * steps if seconds and steps else None)


def _trainer_choice_device(plan_cfg) -> str:
    from hydra.core.hydra_config import HydraConfig

    choice = HydraConfig.get().runtime.choices.get("trainer") if HydraConfig.initialized() else None
    if choice not in plan_cfg.trainer_device:
        raise ConfigError(f"trainer={choice}: say which device with plan.device=<one of {', '.join(plan_cfg.devices)}>")
    return plan_cfg.trainer_device[choice]


def format_plan(plan: Plan) -> str:
    lines = [*_summary_lines(plan), "", *_memory_lines(plan), *_compute_lines(plan), *_offload_lines(plan)]
    return "\n".join(lines + [f"  PROBLEM: {p}" for p in plan.problems])


VERDICT = {True: "fits", False: "DOES NOT FIT", None: "not checked"}


def _summary_lines(plan: Plan) -> list[str]:
    s, n = plan.setup, plan.parameters
    return [
        f"Plan for {plan.model} on {s.nodes} node(s) x {s.gpus_per_node} {plan.device} "
        f"({s.label}, precision {s.precision})",
        f"  parameters {n['total']:,} (per decoder layer {n['per_layer']:,}, "
        f"embedding {n['embedding']:,}, vocabulary rows {plan.arch.vocab_size:,}); "
        f"{n['trainable']:,} train ({100 * n['trainable'] / n['total']:.2f}%)",
        f"  batch: {plan.micro_batch} per device x {s.world} devices x accumulation {plan.accumulation} = "
        f"{plan.global_batch} sequences of up to {plan.max_length} tokens",
        f"  optimizer: {plan.optimizer}",
    ]


def _memory_lines(plan: Plan) -> list[str]:
    def gib(b):
        return f"{b / GIB:8.2f}"

    g, ckpt = plan.gpu_bytes, plan.gradient_checkpointing
    return [
        "  memory per device                                GiB",
        f"    parameters                               {gib(g.parameters)}",
        f"    gradients                                {gib(g.gradients)}",
        f"    optimizer states                         {gib(g.optimizer)}",
        f"    model states                             {gib(g.model_states)}",
        f"    activations, gradient checkpointing      {gib(g.activations_with_checkpointing)}"
        + ("  <- configured" if ckpt else ""),
        f"    activations, no checkpointing            {gib(g.activations_without_checkpointing)}"
        + ("" if ckpt else "  <- configured"),
        *(
            [
                f"    rollouts' KV cache (online RL)           {gib(g.rollout_kv_cache)}",
                f"    reward model (online RL)                 {gib(g.reward_model)}",
            ]
            if g.rollout_kv_cache
            else []
        ),
        f"    communication buckets                    {gib(g.buffers)}",
        f"    CUDA context, NCCL, fragmentation        {gib(g.overhead)}",
        f"    total                                    {gib(g.total)}  "
        f"of {plan.device_memory_gib or '-'}: {VERDICT[plan.fits]}"
        + ("" if plan.fits is None else f" (without checkpointing: {VERDICT[plan.fits_without_checkpointing]})"),
        f"  CPU memory per node (offloaded states, or the models processes load): "
        f"{plan.cpu_bytes_per_node / GIB:.1f} GiB of {plan.node_memory_gib or '-'}: {VERDICT[plan.cpu_fits]}",
    ]


def _compute_lines(plan: Plan) -> list[str]:
    if not plan.training_flops:
        return []
    bound = "at most " if plan.tokens_per_example_is_upper_bound else ""
    lines = [
        "",
        f"  compute: {plan.optimizer_steps:,} optimizer steps x {plan.global_batch} sequences x {bound}"
        f"{plan.tokens_per_example} tokens = {plan.training_tokens / 1e6:,.1f}M tokens, "
        f"{plan.training_flops:.3g} FLOPs",
    ]
    if plan.hours:
        lines.append(
            f"  time: {plan.hours:.1f} h at {plan.utilization:.0%} of {plan.peak_tflops_per_device} TFLOPS "
            f"x {plan.setup.world} GPUs"
        )
    if plan.reference_pass_hours:
        lines.append(
            f"  before step 1: {plan.reference_pass_hours * 60:.0f} min for the reference's log-probabilities "
            f"(one forward pass over the pairs; cached, so once for these weights and data)"
        )
    return lines


def _offload_lines(plan: Plan) -> list[str]:
    traffic = plan.offload_traffic
    if not (traffic and traffic.seconds_per_step):
        return []
    total = f", >= {traffic.seconds_total / 3600:.1f} h in all" if traffic.seconds_total else ""
    return [
        f"  offload traffic: {traffic.bytes_per_gpu_per_step / 1e9:.1f} GB per GPU per optimizer step over PCIe: "
        f">= {traffic.seconds_per_step:.2f} s/step{total} (plus the optimizer step on the CPU)"
    ]
