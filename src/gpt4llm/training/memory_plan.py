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

from dataclasses import asdict, dataclass
from pathlib import Path

from omegaconf import DictConfig

from gpt4llm.errors import ConfigError
from gpt4llm.training.flops import training_flops

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
        t = model_cfg.tiny
        return Arch(
            t.hidden_size,
            t.num_hidden_layers,
            t.num_attention_heads,
            t.num_attention_heads,
            t.intermediate_size,
            t.vocab_size,
        )
    path = Path(str(model_cfg.path))
    if path.is_dir() and (path / "config.json").exists():
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
        if self.strategy == "fsdp":
            return f"FSDP {self.fsdp_sharding}" + (", CPU offload" if self.fsdp_cpu_offload else "")
        return {"ddp": "DDP", "single": "one device"}[self.strategy]


def setup_of(cfg: DictConfig, devices_per_node: int) -> Setup:
    s, t = cfg.strategy, cfg.trainer
    devices = t.devices
    if isinstance(devices, str) and devices not in ("auto", "-1"):
        devices = len([d for d in devices.split(",") if d.strip()]) if "," in devices else int(devices)
    elif devices in ("auto", "-1", -1, None):
        devices = devices_per_node
    elif not isinstance(devices, int):
        devices = len(devices)  # a list of device ids
    nodes, precision = int(t.num_nodes), str(t.precision)
    target = str(s.get("_target_", "")) if isinstance(s, DictConfig) else ""
    common = dict(gpus_per_node=int(devices), nodes=nodes, precision=precision)
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
    if target.endswith("FSDPStrategy"):
        sharding = str(s.get("sharding_strategy", "FULL_SHARD"))
        if sharding == "NO_SHARD":
            return Setup("ddp", **common)
        return Setup("fsdp", fsdp_sharding=sharding, fsdp_cpu_offload=bool(s.get("cpu_offload") or False), **common)
    if target.endswith("DDPStrategy"):
        return Setup("ddp", ddp_bucket_view=bool(s.get("gradient_as_bucket_view", False)), **common)
    return Setup("single" if devices * nodes == 1 else "ddp", **common)  # "auto": Lightning picks DDP for several


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
    P, N, n, g = total, s.world, s.nodes, s.gpus_per_node
    p = 2 if s.half else 4  # bytes of the weights computed with
    master = 4 if s.half else 0  # fp32 master copy beside 16-bit weights
    gpu = {"parameters": 0.0, "gradients": 0.0, "optimizer": 0.0}
    cpu = 0.0
    if s.strategy == "deepspeed" and s.zero_stage == 3:
        gathered = 2 * p * largest_module
        grads, optim = 4, master + ADAM_BYTES
        gpu["parameters"] = gathered + (0 if s.offload_parameters else p * P / N)
        if s.offload_optimizer:
            # zero.Init (Lightning's sharded context) builds each rank's shard only: CPU holds shards, not models
            cpu = (grads + optim + (p if s.offload_parameters else 0)) * P / n
        else:
            gpu["gradients"], gpu["optimizer"] = grads * P / N, optim * P / N
            cpu = 4 * largest_module * g  # zero.Init materialises one module at a time, in fp32
    elif s.strategy == "deepspeed":  # ZeRO-1/2
        gpu["parameters"] = p * P
        grads = (p + 4) if s.half else 4
        if s.offload_optimizer:
            cpu = max(4 * N, 16) * P  # the estimator's figure (it counts 4 bytes for every GPU of the job)
        else:
            gpu["gradients"], gpu["optimizer"] = grads * P / N, (master + ADAM_BYTES) * P / N
            cpu = 4 * P * g  # every process loads the fp32 model before DeepSpeed takes it
    elif s.strategy == "fsdp":
        shards = g if s.fsdp_sharding.startswith("HYBRID") else N
        gathered = 2 * p * largest_unit
        if s.fsdp_sharding == "SHARD_GRAD_OP":
            gathered = p * P
        if s.fsdp_cpu_offload:
            gpu["parameters"] = gathered
            cpu = 16 * P / n
        else:
            gpu["parameters"] = gathered + 4 * P / shards
            gpu["gradients"], gpu["optimizer"] = 4 * P / shards, ADAM_BYTES * P / shards
            cpu = 4 * P * g  # from_pretrained materialises the full fp32 model in every process before sharding
    else:  # ddp, single
        gpu["parameters"] = 4 * P + (2 * P if s.half and s.precision.endswith("mixed") else 0)
        gpu["gradients"] = 4 * P * (1 if s.ddp_bucket_view or s.strategy == "single" else 2)
        gpu["optimizer"] = ADAM_BYTES * P
        cpu = 4 * P * g
    gpu["total"] = gpu["parameters"] + gpu["gradients"] + gpu["optimizer"]
    return {"gpu": gpu, "cpu_per_node": cpu * cpu_factor}


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
    outside = 4 * h + (x + 8) * v
    per_token = (L * res * h + layer if checkpointing else L * layer) + outside
    return per_token * micro_batch * seq


# ----------------------------------------------------------------------------------------------- activations
def activation_bytes(
    a: Arch, s: Setup, micro_batch: int, seq: int, checkpointing: bool, attention: str = "sdpa"
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
    loss: 16-bit logits, their fp32 copy and log-softmax (x + 8 bytes per vocabulary entry; a peak, not all kept).
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
    outside = norm + (x + 8) * v
    per_token = (L * r * h + layer if checkpointing else L * layer) + outside
    return per_token * micro_batch * seq


# ----------------------------------------------------------------------------------------------- the plan
def examples_per_epoch(cfg: DictConfig) -> int | None:
    d = cfg.data
    records = cfg.plan.get("examples") or d.get("num_records") or ((d.get("demo") or {}).get("num_records"))
    if not records:
        return None
    return int(records) - (0 if cfg.plan.get("examples") else int(d.get("val_size") or 0))


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
    offload_traffic: OffloadTraffic | None
    problems: list[str]

    def as_json(self) -> dict:
        return asdict(self) | {"setup": asdict(self.setup) | {"label": self.setup.label, "world": self.setup.world}}


def make_plan(cfg: DictConfig, device: str | None = None) -> Plan:
    from gpt4llm.data.base_datamodule import batches_per_epoch
    from gpt4llm.errors import LaunchError
    from gpt4llm.models.base_module import optimizer_steps
    from gpt4llm.models.optim import CHOICES, optimizer_choice
    from gpt4llm.training.hardware import check_precision, derive_accumulation

    plan_cfg = cfg.plan
    device = device or plan_cfg.device
    if device == "auto":
        device = _trainer_choice_device(plan_cfg)
    if device not in plan_cfg.devices:
        raise ConfigError(f"plan.device={device}: not one of {', '.join(plan_cfg.devices)} (conf/plan.yaml)")
    hw = plan_cfg.devices[device]
    arch = arch_of(cfg.model)
    counts = llama_parameters(arch)
    s = setup_of(cfg, hw.devices_per_node)
    problems = []
    try:
        has_bf16 = any(str(k).startswith("bf16") for k in hw.tflops) if device != "cpu" else None
        check_precision(s.precision, str(cfg.trainer.accelerator), has_bf16, device)
    except LaunchError as err:
        problems.append(str(err))

    states = model_states(
        s, counts["total"], counts["largest_module"], counts["largest_fsdp_unit"], plan_cfg.cpu_buffer_factor
    )
    micro, seq = int(cfg.data.batch_size), int(cfg.data.max_length)
    preference = str(cfg.task.get("_target_", "")).endswith("DPOModule")
    sequences = 2 * micro if preference else micro  # a pair is two sequences in one forward: chosen and rejected
    checkpointing = bool(cfg.model.get("gradient_checkpointing", False))
    with_ckpt = activation_bytes(arch, s, sequences, seq, True, plan_cfg.attention)
    without_ckpt = activation_bytes(arch, s, sequences, seq, False, plan_cfg.attention)
    peft = cfg.get("peft") or {}
    trainable = counts["total"]
    if peft.get("method", "none") == "lora":
        trainable = lora_parameters(arch, int(peft.r), peft.target_modules)
        dtype_bytes = {"float16": 2, "bfloat16": 2}.get(str(cfg.model.get("dtype")), 2 if s.half else 4)
        optimizer_bytes = 2 if "8bit" in str(cfg.task.optimizer.get("implementation", "")) else ADAM_BYTES
        gpu = adapter_states(
            s, arch, counts["total"], trainable, bool(peft.get("quantization")), dtype_bytes, optimizer_bytes
        )
        states = {"gpu": gpu | {"total": sum(gpu.values())}, "cpu_per_node": states["cpu_per_node"]}
        with_ckpt, without_ckpt = (
            lora_activation_bytes(
                arch,
                s,
                sequences,
                seq,
                int(peft.r),
                peft.target_modules,
                float(peft.lora_dropout),
                c,
                mask_bytes=(2 if s.half else 4) if device == "cpu" else 1,
            )
            for c in (True, False)
        )
    if preference and cfg.task.get("reference") == "live":
        # the frozen reference beside the policy, in the weights' dtype (sharded like them under ZeRO-3 and FSDP);
        # precomputed keeps two floats per pair, adapters nothing but the policy
        shards = s.world if (s.strategy == "deepspeed" and s.zero_stage == 3) or s.strategy == "fsdp" else 1
        reference = counts["total"] * (2 if s.half else 4) / shards
        states["gpu"]["parameters"] += reference
        states["gpu"]["total"] += reference
    buffers = buffer_bytes(s)
    overhead = plan_cfg.overhead_gib * GIB if str(cfg.trainer.accelerator) != "cpu" else 0.0
    used = with_ckpt if checkpointing else without_ckpt
    total = states["gpu"]["total"] + used + buffers + overhead
    capacity = hw.memory_gib * GIB if hw.memory_gib else None
    node_capacity = hw.node_memory_gib * GIB if hw.node_memory_gib else None

    # batch and steps, derived as training derives them
    accumulation: int | None = int(cfg.trainer.get("accumulate_grad_batches") or 1)
    global_batch = int(cfg.get("global_batch_size") or micro * s.world * accumulation)
    if cfg.get("global_batch_size"):
        try:
            accumulation = derive_accumulation(global_batch, micro, s.world)
        except ConfigError as err:
            accumulation = None
            problems.append(str(err))
    examples = examples_per_epoch(cfg)
    max_steps = int(cfg.trainer.get("max_steps", -1))
    epochs = cfg.trainer.get("max_epochs")
    steps = None
    if accumulation and (examples or max_steps > 0):
        batches = batches_per_epoch(examples, s.world, micro) if examples else 0
        steps = optimizer_steps(batches, accumulation, None if not examples else epochs, max_steps) or None
    tokens_per_example = int(plan_cfg.tokens_per_example or seq)
    # Useful training FLOPs (gpt4llm.training.flops, the formula `train/mfu` measures with): recomputation under
    # gradient checkpointing is not counted, it is part of what keeps utilisation below 1.
    matmul_params = counts["total"] - (0 if arch.tie_word_embeddings else counts["embedding"])
    flops_per_token = (
        training_flops(matmul_params, arch.num_hidden_layers, arch.hidden_size, [tokens_per_example])
        / tokens_per_example
    )
    tokens = steps * global_batch * tokens_per_example if steps else None
    flops = flops_per_token * tokens if tokens else None
    peak = hw.tflops.get(s.precision)
    seconds = flops / (plan_cfg.utilization * peak * 1e12 * s.world) if (flops and peak) else None

    return Plan(
        model=str(cfg.model.path),
        arch=arch,
        parameters=counts | {"trainable": trainable},
        device=device,
        device_memory_gib=hw.memory_gib,
        node_memory_gib=hw.node_memory_gib,
        setup=s,
        optimizer=CHOICES[
            optimizer_choice(
                s.strategy == "deepspeed" and s.offload_optimizer,
                "gpu",
                cfg.task.optimizer.get("implementation", "auto"),
            )
        ],
        micro_batch=micro,
        max_length=seq,
        accumulation=accumulation,
        global_batch=global_batch,
        gradient_checkpointing=checkpointing,
        gpu_bytes=GpuBytes(
            parameters=states["gpu"]["parameters"],
            gradients=states["gpu"]["gradients"],
            optimizer=states["gpu"]["optimizer"],
            model_states=states["gpu"]["total"],
            activations_with_checkpointing=with_ckpt,
            activations_without_checkpointing=without_ckpt,
            buffers=buffers,
            overhead=overhead,
            total=total,
        ),
        cpu_bytes_per_node=states["cpu_per_node"],
        fits=None if capacity is None else total <= capacity,
        fits_without_checkpointing=None if capacity is None else total - used + without_ckpt <= capacity,
        cpu_fits=None if node_capacity is None else states["cpu_per_node"] <= node_capacity,
        examples_per_epoch=examples,
        tokens_per_example=tokens_per_example,
        tokens_per_example_is_upper_bound=plan_cfg.tokens_per_example is None,
        optimizer_steps=steps,
        training_tokens=tokens,
        training_flops=flops,
        peak_tflops_per_device=peak,
        utilization=plan_cfg.utilization,
        hours=seconds / 3600 if seconds else None,
        offload_traffic=offload_traffic(s, counts["total"], accumulation, checkpointing, steps, hw.host_link_gb_s),
        problems=problems,
    )


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
    def gib(b):
        return f"{b / GIB:8.2f}"

    s, g, n = plan.setup, plan.gpu_bytes, plan.parameters
    ckpt = plan.gradient_checkpointing
    verdict = {True: "fits", False: "DOES NOT FIT", None: "not checked"}
    lines = [
        f"Plan for {plan.model} on {s.nodes} node(s) x {s.gpus_per_node} {plan.device} "
        f"({s.label}, precision {s.precision})",
        f"  parameters {n['total']:,} (per decoder layer {n['per_layer']:,}, "
        f"embedding {n['embedding']:,}, vocabulary rows {plan.arch.vocab_size:,}); "
        f"{n['trainable']:,} train ({100 * n['trainable'] / n['total']:.2f}%)",
        f"  batch: {plan.micro_batch} per device x {s.world} devices x accumulation {plan.accumulation} = "
        f"{plan.global_batch} sequences of up to {plan.max_length} tokens",
        f"  optimizer: {plan.optimizer}",
        "",
        "  memory per device                                GiB",
        f"    parameters                               {gib(g.parameters)}",
        f"    gradients                                {gib(g.gradients)}",
        f"    optimizer states                         {gib(g.optimizer)}",
        f"    model states                             {gib(g.model_states)}",
        f"    activations, gradient checkpointing      {gib(g.activations_with_checkpointing)}"
        + ("  <- configured" if ckpt else ""),
        f"    activations, no checkpointing            {gib(g.activations_without_checkpointing)}"
        + ("" if ckpt else "  <- configured"),
        f"    communication buckets                    {gib(g.buffers)}",
        f"    CUDA context, NCCL, fragmentation        {gib(g.overhead)}",
        f"    total                                    {gib(g.total)}  "
        f"of {plan.device_memory_gib or '-'}: {verdict[plan.fits]}"
        + ("" if plan.fits is None else f" (without checkpointing: {verdict[plan.fits_without_checkpointing]})"),
        f"  CPU memory per node (offloaded states, or the models processes load): "
        f"{plan.cpu_bytes_per_node / GIB:.1f} GiB of {plan.node_memory_gib or '-'}: {verdict[plan.cpu_fits]}",
    ]
    if plan.training_flops:
        bound = "at most " if plan.tokens_per_example_is_upper_bound else ""
        lines += [
            "",
            f"  compute: {plan.optimizer_steps:,} optimizer steps x {plan.global_batch} sequences x {bound}"
            f"{plan.tokens_per_example} tokens = {plan.training_tokens / 1e6:,.1f}M tokens, "
            f"{plan.training_flops:.3g} FLOPs",
        ]
        if plan.hours:
            lines.append(
                f"  time: {plan.hours:.1f} h at {plan.utilization:.0%} of {plan.peak_tflops_per_device} TFLOPS "
                f"x {s.world} GPUs"
            )
    traffic = plan.offload_traffic
    if traffic and traffic.seconds_per_step:
        total = f", >= {traffic.seconds_total / 3600:.1f} h in all" if traffic.seconds_total else ""
        lines.append(
            f"  offload traffic: {traffic.bytes_per_gpu_per_step / 1e9:.1f} GB per GPU per optimizer step over PCIe: "
            f">= {traffic.seconds_per_step:.2f} s/step{total} (plus the optimizer step on the CPU)"
        )
    lines += [f"  PROBLEM: {p}" for p in plan.problems]
    return "\n".join(lines)
