"""The memory and compute plan: exact parameter counts, DeepSpeed's estimators, measured activations, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from gpt4llm.training.memory_plan import (
    GIB,
    Arch,
    Setup,
    activation_bytes,
    arch_of,
    format_plan,
    llama_parameters,
    make_plan,
    model_states,
)
from helpers.configs import CONF, demo_overrides

LLAMA7B = Arch(4096, 32, 32, 32, 11008, 32001)
LLAMA13B = Arch(5120, 40, 40, 40, 13824, 32001)


def compose_plan(overrides=()):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="plan", overrides=list(overrides))
    cfg.paths.output_dir = "/tmp/plan"
    return cfg


def meta_llama(a: Arch, attention: str = "sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        attn_implementation=attention,
        hidden_size=a.hidden_size,
        num_hidden_layers=a.num_hidden_layers,
        num_attention_heads=a.num_attention_heads,
        num_key_value_heads=a.num_key_value_heads,
        intermediate_size=a.intermediate_size,
        vocab_size=a.vocab_size,
        tie_word_embeddings=a.tie_word_embeddings,
    )
    with torch.device("meta"):  # shapes only: LLaMA-13B costs no memory here
        return LlamaForCausalLM(config)


@pytest.mark.parametrize("arch", [LLAMA7B, LLAMA13B, Arch(64, 2, 2, 2, 128, 512), Arch(256, 2, 8, 2, 688, 1000, True)])
def test_parameter_count_is_exact(arch):
    model = meta_llama(arch)
    counts = llama_parameters(arch)
    assert counts["total"] == sum(p.numel() for p in model.parameters())  # tied weights are counted once
    assert counts["per_layer"] == sum(p.numel() for p in model.model.layers[0].parameters())
    # DeepSpeed's largest layer: the most parameters any one module holds itself (deepspeed ... model_to_params)
    assert counts["largest_module"] == max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())


def test_llama7b_with_the_pad_row_is_the_papers_model():
    cfg = compose_plan(["experiment=paper_sft_llama7b_gpt4"])
    arch = arch_of(cfg.model)
    assert arch == LLAMA7B  # 32000 + [PAD]
    assert llama_parameters(arch)["total"] == 6_738_415_616 + 2 * 4096  # LLaMA-7B plus one embedding and lm_head row
    assert llama_parameters(arch_of(compose_plan(["model=llama13b"]).model))["total"] == 13_015_864_320 + 2 * 5120


GRID = [
    (P, L, g, n)
    for P, L in ((6_738_423_808, 131_076_096), (13_015_874_560, 163_845_120), (2_000_000, 65_536))
    for g, n in ((1, 1), (8, 1), (8, 2), (4, 4))
]


@pytest.mark.parametrize("total, largest, gpus, nodes", GRID)
def test_model_states_agree_with_deepspeeds_estimators(total, largest, gpus, nodes):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import (
        estimate_zero2_model_states_mem_needs,
    )

    def ours(stage, offload_optimizer, offload_parameters=False):
        s = Setup(
            "deepspeed",
            gpus,
            nodes,
            "16-mixed",
            zero_stage=stage,
            offload_optimizer=offload_optimizer,
            offload_parameters=offload_parameters,
        )
        states = model_states(s, total, largest, largest)
        return states["cpu_per_node"], states["gpu"]["total"]

    cases = []
    for offload in (True, False):
        cpu, gpu = estimate_zero2_model_states_mem_needs(total, gpus, nodes, cpu_offload=offload)
        cases.append((f"zero2 offload={offload}", (cpu, gpu), ours(2, offload)))
    for offload_optimizer, offload_parameters in ((True, True), (True, False), (False, False)):
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            total,
            largest,
            gpus,
            nodes,
            cpu_offload=offload_optimizer,
            cpu_offload_params=offload_parameters,
            zero_init=True,
        )
        name = f"zero3 offload {offload_optimizer}/{offload_parameters}"
        cases.append((name, (cpu, gpu), ours(3, offload_optimizer, offload_parameters)))
    for name, (ds_cpu, ds_gpu), (our_cpu, our_gpu) in cases:
        assert our_gpu == pytest.approx(ds_gpu, rel=0.05), (
            f"{name}: GPU {our_gpu / GIB:.2f} vs DeepSpeed {ds_gpu / GIB:.2f} GiB"
        )
        assert our_cpu == pytest.approx(ds_cpu, rel=0.05), (
            f"{name}: CPU {our_cpu / GIB:.2f} vs DeepSpeed {ds_cpu / GIB:.2f} GiB"
        )


def saved_activation_bytes(
    arch: Arch, batch: int, seq: int, dtype, attention: str, checkpointing: bool, autocast=None
) -> int:
    """What a real LlamaForCausalLM keeps for backward: the bytes of every distinct tensor autograd saves."""
    model = meta_llama(arch, attention).to_empty(device="cpu").to(dtype).train()
    if checkpointing:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def autocast_weight_copy(t) -> bool:  # counted with the parameters (model states), not as activations
        fn = t.grad_fn
        while fn is not None and fn.name() == "TBackward0":  # linear keeps the copy transposed
            fn = fn.next_functions[0][0]
        return (
            fn is not None
            and fn.name() == "ToCopyBackward0"
            and type(fn.next_functions[0][0]).__name__ == "AccumulateGrad"
        )

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights and not autocast_weight_copy(t):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, arch.vocab_size, (batch, seq))
    amp = torch.autocast("cpu", dtype=autocast or torch.float32, enabled=autocast is not None)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), amp:
        logits = model(input_ids=ids, use_cache=False).logits
        F.cross_entropy(logits[:, :-1].float().reshape(-1, arch.vocab_size), ids[:, 1:].reshape(-1))
    return sum(saved.values())


@pytest.mark.parametrize(
    "precision, strategy, dtype, autocast",
    [
        ("32-true", "single", torch.float32, None),
        ("bf16-true", "deepspeed", torch.bfloat16, None),
        ("bf16-mixed", "ddp", torch.float32, torch.bfloat16),
    ],
)
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_activation_formula_matches_what_llama_saves_per_layer(precision, strategy, dtype, autocast, attention):
    """Per decoder layer (the difference between 3 and 2 layers), with and without gradient checkpointing."""
    torch.manual_seed(0)
    batch, seq = 2, 128
    small, large = Arch(128, 2, 4, 4, 344, 500), Arch(128, 3, 4, 4, 344, 500)
    s = Setup(strategy, 1, 1, precision)
    for checkpointing in (False, True):
        measured = saved_activation_bytes(
            large, batch, seq, dtype, attention, checkpointing, autocast
        ) - saved_activation_bytes(small, batch, seq, dtype, attention, checkpointing, autocast)
        estimate = activation_bytes(large, s, batch, seq, checkpointing, attention) - activation_bytes(
            small, s, batch, seq, checkpointing, attention
        )
        assert estimate == pytest.approx(measured, rel=0.03), f"checkpointing={checkpointing}: {estimate} vs {measured}"


def test_paper_run_on_16_v100s_fits_with_zero3_offload_and_ddp_does_not():
    common = ["experiment=paper_sft_llama7b_gpt4", "trainer=v100x16"]
    zero3 = make_plan(compose_plan(common + ["strategy=deepspeed_zero3_offload"]), device="V100-32GB")
    assert zero3.fits and zero3.cpu_fits and not zero3.problems
    assert zero3.global_batch == 64 and zero3.accumulation == 4
    assert zero3.optimizer_steps == 3 * 813  # ceil(ceil(52002 / 16) / 4) per epoch, as Lightning counts
    assert zero3.gpu_bytes.model_states == pytest.approx(4 * 131_076_096)  # only the gathered embedding
    assert zero3.offload_traffic.seconds_per_step > 0
    ddp = make_plan(compose_plan(common + ["strategy=ddp"]), device="V100-32GB")
    assert ddp.fits is False and ddp.gpu_bytes.model_states > 100 * GIB
    zero2_13b = make_plan(compose_plan(common + ["strategy=deepspeed_zero2", "model=llama13b"]), device="V100-32GB")
    assert zero2_13b.fits is False  # 2 bytes of every parameter on every GPU: 24 GiB before anything else


def test_bf16_on_v100_is_a_problem_in_the_plan():
    plan = make_plan(
        compose_plan(["model=llama7b", "trainer=v100x16", "trainer.precision=bf16-mixed"]), device="V100-32GB"
    )
    assert any("use trainer.precision=16-mixed on V100" in p for p in plan.problems)


@pytest.mark.slow  # a command run as a subprocess (README, the test tiers)
def test_plan_cli_writes_plan_json(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    args = [
        "experiment=paper_sft_llama7b_gpt4",
        "trainer=v100x16",
        "strategy=deepspeed_zero3_offload",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "gpt4llm.plan", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DeepSpeed ZeRO-3, offload optimizer + parameters to CPU" in proc.stdout and ": fits" in proc.stdout
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert plan["device"] == "V100-32GB" and plan["setup"]["world"] == 16 and plan["hours"] > 0


def test_plan_for_the_tiny_demo_needs_no_download(tmp_path):
    plan = make_plan(compose_plan(demo_overrides(tmp_path)), device="cpu")
    assert plan.parameters["total"] > 0 and plan.fits is None and plan.optimizer_steps == 6


@pytest.mark.parametrize(
    "strategy, optimizer",
    [
        ("deepspeed_zero3_offload", "DeepSpeed's CPU Adam"),
        ("deepspeed_zero3", "torch's fused AdamW"),
        ("ddp", "torch's fused AdamW"),
    ],
)
def test_the_plan_names_the_optimizer_the_strategy_gets(strategy, optimizer):
    plan = make_plan(
        compose_plan(["experiment=paper_sft_llama7b_gpt4", "trainer=v100x16", f"strategy={strategy}"]), "V100-32GB"
    )
    assert plan.optimizer.startswith(optimizer)


def test_dpo_plans_two_sequences_a_pair_and_a_live_reference_beside_the_policy():
    common = ["experiment=dpo_llama7b_gpt4", "model.path=x", "trainer=v100x16", "strategy=deepspeed_zero3"]
    cached = make_plan(compose_plan(common), device="V100-32GB")
    live = make_plan(compose_plan(common + ["task.reference=live"]), device="V100-32GB")
    sft = make_plan(
        compose_plan(
            ["experiment=paper_sft_llama7b_gpt4", "trainer=v100x16", "strategy=deepspeed_zero3", "data.batch_size=4"]
        ),
        device="V100-32GB",
    )
    assert cached.accumulation == 1 and cached.global_batch == 32  # 32 pairs: 2 per device x 16
    # chosen and rejected: the activations of 4 sequences of a batch of 2 pairs, SFT's at 4 sequences (both losses
    # chunked: one chunk's logits at a time)
    assert cached.gpu_bytes.activations_with_checkpointing == pytest.approx(
        sft.gpu_bytes.activations_with_checkpointing
    )
    reference = live.gpu_bytes.parameters - cached.gpu_bytes.parameters  # the frozen copy's 16-bit shard
    assert reference == pytest.approx(2 * cached.parameters["total"] / 16)


def test_grpo_plans_its_groups_rollout_kv_cache_and_reward_model(tmp_path):
    """A GRPO step forwards each prompt's group, decodes up to generation_rows sequences at once (their KV cache), and
    holds the reward model: LLaMA-7B's cache is 2 (K, V) x 32 layers x 4096 x 2 bytes a token in 16 bits."""
    rm = tmp_path / "rm"
    rm.mkdir()
    (rm / "model.safetensors").write_bytes(b"\0" * 12345)
    common = ["experiment=grpo_llama7b_gpt4_rm", "model.path=x", "trainer=v100x16", "strategy=deepspeed_zero2"]
    grpo = make_plan(compose_plan([*common, f"reward.path={rm}"]), device="V100-32GB")
    sft = make_plan(
        compose_plan(
            ["experiment=paper_sft_llama7b_gpt4", "trainer=v100x16", "strategy=deepspeed_zero2", "data.batch_size=32"]
        ),
        device="V100-32GB",
    )
    # 4 prompts x 8 completions: the activations of 32 sequences, as SFT's batch of 32
    assert grpo.gpu_bytes.activations_with_checkpointing == pytest.approx(sft.gpu_bytes.activations_with_checkpointing)
    assert grpo.gpu_bytes.rollout_kv_cache == 32 * 512 * (2 * 32 * 4096 * 2)  # 32 rows of 512 tokens
    assert grpo.gpu_bytes.reward_model == 12345
    assert "rollouts' KV cache (online RL)" in format_plan(grpo) and "rollouts'" not in format_plan(sft)


def test_the_plan_counts_the_dpo_reference_pass_before_step_1(tmp_path):
    """A DPO run once spent 18 minutes on its reference pass before step 1 with nothing said; the plan gives it."""
    from gpt4llm.training.memory_plan import format_plan

    common = ["task=dpo", "data=demo_pairs", "model=llama7b", "trainer=gpu", "plan.device=A100-80GB"]
    common.append(f"paths.data_dir={tmp_path}")
    precomputed = make_plan(compose_plan(common))
    assert precomputed.reference_pass_hours and 0 < precomputed.reference_pass_hours < precomputed.hours
    assert "before step 1:" in format_plan(precomputed)
    assert make_plan(compose_plan([*common, "task.reference=live"])).reference_pass_hours is None
    assert (
        make_plan(compose_plan(["model=llama7b", "trainer=gpu", "plan.device=A100-80GB"])).reference_pass_hours is None
    )


def test_a_chunked_loss_plans_one_chunk_of_logits_not_the_batchs():
    """LLaMA-7B (32001 entries with the paper's added pad token), 4 sequences of 512 tokens: the whole logits are
    2048 x 32001 x (2 + 8) bytes; chunked, 1024 positions' at a time plus the final hidden state of every token
    (2048 x 4096 x 2) that the chunks are recomputed from."""
    common = ["experiment=paper_sft_llama7b_gpt4", "trainer=v100x16", "strategy=deepspeed_zero3", "data.batch_size=4"]
    chunked = make_plan(compose_plan(common), device="V100-32GB").gpu_bytes.activations_with_checkpointing
    whole = make_plan(compose_plan([*common, "task.chunked_loss=false"]), device="V100-32GB")
    saved = whole.gpu_bytes.activations_with_checkpointing - chunked
    assert saved == (2 + 8) * 32001 * (2048 - 1024) - 2 * 4096 * 2048
    fsdp = make_plan(compose_plan([*common[:-2], "strategy=fsdp", "data.batch_size=4"]), device="V100-32GB")
    assert fsdp.gpu_bytes.activations_with_checkpointing > chunked  # FSDP takes the model's whole logits


def test_fsdp2_plans_fsdps_sharded_states_with_the_chunked_loss_beside_zero3():
    """strategy=fsdp2 shards what FSDP (FULL_SHARD) shards; it runs the chunked loss inside the model's forward, so
    its activations are ZeRO-3's, below FSDP's whole logits. reshard_after_forward=false keeps the gathered 16-bit
    weights from forward to backward, as SHARD_GRAD_OP does."""
    common = ["experiment=paper_sft_llama7b_gpt4", "trainer=gpu", "trainer.devices=8", "trainer.precision=bf16-mixed"]
    common.append("data.batch_size=4")
    plans = {
        s: make_plan(compose_plan([*common, f"strategy={s}"]), device="A100-80GB")
        for s in ("fsdp2", "fsdp", "deepspeed_zero3")
    }
    fsdp2, fsdp, zero3 = plans["fsdp2"], plans["fsdp"], plans["deepspeed_zero3"]
    assert fsdp2.setup.label == "FSDP2 (reshard after forward)"
    states = ("parameters", "gradients", "optimizer", "model_states")
    assert [getattr(fsdp2.gpu_bytes, k) for k in states] == [getattr(fsdp.gpu_bytes, k) for k in states]
    activations = fsdp2.gpu_bytes.activations_with_checkpointing
    assert activations == zero3.gpu_bytes.activations_with_checkpointing < fsdp.gpu_bytes.activations_with_checkpointing
    kept = make_plan(compose_plan([*common, "strategy=fsdp2", "strategy.reshard_after_forward=false"]), "A100-80GB")
    grad_op = make_plan(
        compose_plan([*common, "strategy=fsdp", "strategy.sharding_strategy=SHARD_GRAD_OP"]), "A100-80GB"
    )
    assert kept.setup.label == "FSDP2 (gathered until backward)"
    assert kept.gpu_bytes.parameters == grad_op.gpu_bytes.parameters > fsdp2.gpu_bytes.parameters
    assert "FSDP2 (reshard after forward)" in format_plan(fsdp2)
