"""LoRA and QLoRA through peft: what trains (counted against peft's own count), gradient checkpointing, checkpoints
of adapters alone and exact resume, the adapter and merged exports (loaded back by peft and transformers themselves),
every strategy on CPU, and the plan's memory against the tensors of a real run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gpt4llm.models.sft_module import SFTModule
from helpers.configs import compose_train, demo_overrides, rm_overrides
from helpers.cpu_deepspeed import train_under
from helpers.runs import scalars, scalars_by_step

OPTIMIZER = {"lr": 3e-3, "betas": (0.9, 0.999), "eps": 1e-8}
LORA = {
    "method": "lora",
    "r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.05,
    "target_modules": ["q_proj", "v_proj"],
    "bias": "none",
}


def lora_module(model_dir, tokenizer, **settings) -> SFTModule:
    module = SFTModule(tokenizer, str(model_dir), dict(OPTIMIZER), peft=LORA | settings)
    module.configure_model()
    return module


@pytest.mark.parametrize(
    "settings, spelled",
    [
        ({}, {}),
        ({"target_modules": "all-linear", "r": 4, "use_rslora": True}, {"target_modules": "all"}),  # LLaMA-Factory's
        ({"target_modules": ["q_proj"]}, {"target_modules": "q_proj"}),  # a command line's single name
    ],
)
def test_only_the_adapters_train_and_the_count_is_pefts(tiny_model_dir, tokenizer, settings, spelled):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from gpt4llm.models import adapters

    module = lora_module(tiny_model_dir, tokenizer, **(settings | spelled))
    ours = adapters.parameter_counts(module.model)
    lora = {k: v for k, v in (LORA | settings).items() if k != "method"}
    oracle = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(task_type="CAUSAL_LM", **lora)
    )
    assert ours == oracle.get_nb_trainable_parameters() and 0 < ours[0] < ours[1] / 10
    assert all("lora_" in n for n, p in module.model.named_parameters() if p.requires_grad)


def test_the_reward_model_trains_its_head_too(tiny_model_dir, tokenizer):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from gpt4llm.models import adapters
    from gpt4llm.models.reward_module import RewardModule

    module = RewardModule(tokenizer, str(tiny_model_dir), dict(OPTIMIZER), peft=LORA)
    module.configure_model()
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert any("score" in n for n in trainable) and all("lora_" in n or "score" in n for n in trainable)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    lora = {k: v for k, v in LORA.items() if k != "method"}
    oracle = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", modules_to_save=["score"], **lora))
    assert adapters.parameter_counts(module.model) == oracle.get_nb_trainable_parameters()


def test_gradient_checkpointing_reaches_the_adapters(tiny_model_dir, tokenizer):
    from gpt4llm.data.collators import SFTCollator

    module = SFTModule(tokenizer, str(tiny_model_dir), dict(OPTIMIZER), gradient_checkpointing=True, peft=LORA)
    module.configure_model()
    ids = tokenizer(["Sort 3, 1, 2.", "Which is larger, 4 or 9?"])["input_ids"]
    loss, _ = module.loss(SFTCollator(tokenizer.pad_token_id)([{"input_ids": i, "labels": i} for i in ids]))
    loss.backward()
    # B starts at zero, so A's gradient does too: B's shows the gradient went through the checkpointed layers
    grads = {n: p.grad for n, p in module.model.named_parameters() if "lora_B" in n}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_adapter_and_merged_exports_load_with_peft_and_transformers(tmp_path):
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    from gpt4llm.data.tokenizer import load_tokenizer
    from gpt4llm.models.hf import load_causal_lm
    from gpt4llm.train import train

    cfg = compose_train(demo_overrides(tmp_path, "peft=lora", "trainer.max_steps=3", "data.exact_match_examples=0"))
    cfg.paths.output_dir = str(tmp_path / "run")
    train(cfg)
    export = tmp_path / "run" / "export"
    assert (export / "adapter" / "adapter_config.json").exists() and (
        export / "adapter" / "adapter_model.safetensors"
    ).exists()
    assert PeftConfig.from_pretrained(export / "adapter").base_model_name_or_path == cfg.model.path  # vLLM reads it
    tokenizer = load_tokenizer(str(export))
    base = load_causal_lm(cfg.model.path, tokenizer)
    with_adapter = PeftModel.from_pretrained(base, export / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(export).eval()
    batch = tokenizer(["Sort 3, 1, 2.", "把这些词语的顺序倒过来。"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, with_adapter(**batch).logits, rtol=0, atol=1e-5)


def test_qlora_trains_a_4bit_base_and_exports_it_dequantized(tmp_path, caplog):
    from transformers import AutoModelForCausalLM

    from gpt4llm.errors import ConfigError
    from gpt4llm.models.adapters import check_4bit
    from gpt4llm.train import train

    try:
        check_4bit()
    except ConfigError as err:
        pytest.skip(str(err))
    cfg = compose_train(
        demo_overrides(
            tmp_path,
            "peft=qlora",
            "trainer.max_steps=2",
            "data.exact_match_examples=0",
            "task.optimizer.implementation=paged_adamw_8bit",
        )
    )
    cfg.paths.output_dir = str(tmp_path / "run")
    with caplog.at_level("INFO"):
        metrics = train(cfg)  # the export is checked by logits against the 4-bit model as it trained
    assert metrics["val/loss"] > 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "export")
    assert merged.dtype == torch.float32 and not getattr(merged, "is_loaded_in_4bit", False)
    assert "bitsandbytes' paged AdamW, 8-bit states" in caplog.text and "trainable of" in caplog.text


# --- CLI runs: strategies, checkpoints, resume ---------------------------------------------------------------------
def lora_run(tmp: Path, strategy: str | None, *extra: str, task: str = "sft") -> Path:
    """6 steps of LoRA on a repeated batch of 8 demo records (every step sees the same examples), bf16 as the
    DeepSpeed runs use it (DeepSpeed's CPU accelerator has no fp16; bf16 stands in)."""
    base = rm_overrides(tmp) if task == "rm" else demo_overrides(tmp, "callbacks.exact_match=null")
    args = [
        *base,
        "peft=lora",
        "peft.target_modules=all-linear",
        "data.demo.num_records=48",
        "data.val_size=40",
        "data.batch_size=8",
        "trainer.max_epochs=6",
        "trainer.max_steps=6",
        "trainer.precision=bf16-mixed",
        "validate_first=false",
        *extra,
    ]
    if "peft=none" in extra:  # full fine-tuning, for comparison: no adapter settings
        args = [a for a in args if not a.startswith("peft.")]
    return train_under(tmp, strategy, args, run_id="lora")


TWO_PROCESSES = ("ddp", "fsdp2")  # run as two CPU processes (gloo); DeepSpeed's CPU runs are one


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[float]:
    return scalars(lora_run(tmp_path_factory.mktemp("auto"), None))["train/loss"]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero3_offload", "ddp", "fsdp2"])
def test_every_strategy_trains_lora_like_one_device(strategy, tmp_path, reference):
    extra = ("trainer.devices=2",) if strategy in TWO_PROCESSES else ()
    run = lora_run(tmp_path, strategy, *extra)
    losses = scalars(run)["train/loss"]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.05  # the repeated batch is being learned
    if strategy not in TWO_PROCESSES:  # two processes see other batches; one device and DeepSpeed see the same
        assert max(abs(a - b) for a, b in zip(losses, reference)) < 0.05, (losses, reference)  # bf16
    assert (run / "export" / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_checkpoints_hold_the_adapters_and_resume_exactly(tmp_path, reference):
    # fp32 and no LoRA dropout: with dropout, a resumed run's masks differed from the uninterrupted run's here, and
    # the losses agree to 1e-3 only (README, LoRA: what resume does not guarantee)
    every = [
        "callbacks.checkpoint.every_n_train_steps=3",
        "callbacks.checkpoint.save_top_k=-1",
        "export=false",
        "trainer.precision=32-true",
        "peft.lora_dropout=0.0",
    ]
    first = lora_run(tmp_path / "a", None, *every)
    checkpoint = sorted((first / "checkpoints").glob("step3.ckpt"))[0]
    state = torch.load(checkpoint, weights_only=False)
    assert state["state_dict"] and all("lora_" in k for k in state["state_dict"])
    full = lora_run(tmp_path / "full", None, "peft=none", *every[:-1])
    full_size = sorted((full / "checkpoints").glob("step3.ckpt"))[0].stat().st_size
    assert checkpoint.stat().st_size < full_size / 5
    resumed = lora_run(tmp_path / "b", None, *every, f"ckpt_path={checkpoint}")
    whole, again = scalars_by_step(first)["train/loss"], scalars_by_step(resumed)["train/loss"]
    assert len(again) >= 2 and min(again) == 3 and set(again) <= set(whole)
    # the same steps, the same losses to 1e-6 (full fine-tuning resumes to the bit; LoRA's last bits moved here)
    assert all(again[s] == pytest.approx(whole[s], rel=1e-6) for s in again), (again, whole)
    print(f"checkpoint at step 3: LoRA {checkpoint.stat().st_size} bytes, full fine-tuning {full_size} bytes")


# --- the plan against a real run -----------------------------------------------------------------------------------
def saved_bytes(model, ids) -> int:
    """Bytes of the distinct tensors autograd keeps for backward that are not parameters (activations)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(input_ids=ids, use_cache=False).logits
        torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))
    return sum(saved.values())


def quantized_bytes(model) -> int:
    """What the weights take in memory: each parameter's storage, and a 4-bit weight's quantization constants."""
    total = 0
    for p in model.parameters():
        total += p.untyped_storage().nbytes()
        state = getattr(p, "quant_state", None)
        if state is not None:
            total += state.absmax.untyped_storage().nbytes()
            if state.state2 is not None:
                total += state.state2.absmax.untyped_storage().nbytes()
    return total


def tiny_llama(directory: Path, layers: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def lora_run_tensors(base: Path, settings: dict, quantization: dict, ids) -> dict[str, int]:
    """The bytes of what a LoRA training step holds: weights (4-bit ones with their constants), the adapters'
    gradients and Adam states, and the activations autograd keeps."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    plain = LlamaForCausalLM.from_pretrained(base, **quantization).train()
    model = get_peft_model(plain, LoraConfig(task_type="CAUSAL_LM", **settings)).train()
    activations = saved_bytes(model, ids)
    adapters = [p for p in model.parameters() if p.requires_grad]
    model(input_ids=ids, use_cache=False).logits.float().sum().backward()
    optimizer = torch.optim.AdamW(adapters, lr=1e-3)
    optimizer.step()
    return {
        "parameters": quantized_bytes(model),
        "gradients": sum(p.grad.untyped_storage().nbytes() for p in adapters),
        "optimizer": sum(t.untyped_storage().nbytes() for s in optimizer.state.values() for t in s.values() if t.dim()),
        "activations": activations,
    }


@pytest.mark.parametrize("peft, dropout", [("lora", 0.1), ("lora", 0.0), ("qlora", 0.1)])
def test_the_plans_lora_memory_matches_the_tensors_of_a_run(peft, dropout, tmp_path):
    """The plan's model states (frozen base, adapters, their gradients and Adam states) for a LLaMA of 3 layers, and
    its activations per decoder layer (3 layers less 2, so that the first layer, which keeps less since nothing
    before it trains, and the loss cancel), against the tensors of the same models training: within 5%."""
    from hydra import compose, initialize_config_dir
    from transformers import BitsAndBytesConfig

    from gpt4llm.errors import ConfigError
    from gpt4llm.models.adapters import check_4bit
    from gpt4llm.training.memory_plan import make_plan
    from helpers.configs import CONF

    if peft == "qlora":
        try:
            check_4bit()
        except ConfigError as err:
            pytest.skip(str(err))
    batch, seq = 2, 64
    plans, measured = {}, {}
    for layers in (2, 3):
        base = tiny_llama(tmp_path / f"base{layers}", layers)
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(
                config_name="plan",
                overrides=[
                    "model=hf",
                    f"model.path={base}",
                    f"peft={peft}",
                    f"data.batch_size={batch}",
                    f"data.max_length={seq}",
                    "trainer.precision=32-true",
                    f"peft.lora_dropout={dropout}",
                ],
            )
        cfg.paths.output_dir = str(tmp_path / "plan")
        plans[layers] = make_plan(cfg, device="cpu")
        p = cfg.peft
        settings = {
            "r": p.r,
            "lora_alpha": p.lora_alpha,
            "lora_dropout": dropout,
            "target_modules": list(p.target_modules) if p.target_modules != "all-linear" else "all-linear",
        }
        quantization = {}
        if peft == "qlora":
            quantization = {
                "quantization_config": BitsAndBytesConfig(
                    load_in_4bit=True,
                    bnb_4bit_quant_type="nf4",
                    bnb_4bit_use_double_quant=True,
                    bnb_4bit_compute_dtype=torch.float32,
                ),
                "device_map": {"": "cpu"},
            }
        measured[layers] = lora_run_tensors(base, settings, quantization, torch.randint(0, 512, (batch, seq)))
    g = plans[3].gpu_bytes
    for key, planned in (("parameters", g.parameters), ("gradients", g.gradients), ("optimizer", g.optimizer)):
        assert planned == pytest.approx(measured[3][key], rel=0.05), f"{peft} {key}: {planned} vs {measured[3][key]}"
    per_layer = g.activations_without_checkpointing - plans[2].gpu_bytes.activations_without_checkpointing
    real = measured[3]["activations"] - measured[2]["activations"]
    assert per_layer == pytest.approx(real, rel=0.05), f"{peft} activations per layer: {per_layer} vs {real}"
