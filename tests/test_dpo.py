"""Preference optimisation (task=dpo): the losses against TRL's own implementation (TRL is a test-only dependency,
the oracle), log-probabilities on packed and padded batches against each sequence alone, the step-0 identities
(policy = reference: loss ln 2, rewards 0), learning on a repeated batch, the reference three ways, the pairings of
scored lists, and the task through the CLI under every strategy."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from gpt4llm.data.collators import PairCollator
from gpt4llm.models.dpo_module import DPOModule, preference_loss
from gpt4llm.models.response_logps import response_logps
from helpers.configs import rm_overrides
from helpers.cpu_deepspeed import train_under
from helpers.runs import scalars

OPTIMIZER = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8}


def trl_loss(
    loss_type: str, beta: float, label_smoothing: float, logps: torch.Tensor, ref: torch.Tensor, tokens: torch.Tensor
) -> torch.Tensor:
    """TRL's DPOTrainer._compute_loss on a batch whose per-token log-probabilities sum to `logps` (2B: chosen, then
    rejected) over completions of `tokens` tokens, with the reference precomputed as `ref`."""
    from trl.trainer.dpo_trainer import DPOTrainer

    width = int(tokens.max()) + 2
    completion = torch.zeros(len(logps), width, dtype=torch.long)
    per_token = torch.zeros(len(logps), width - 1)
    for i, n in enumerate(tokens.tolist()):
        completion[i, 1 : 1 + n] = 1
        per_token[i, 0] = logps[i]  # the sum on the first completion token (shifted by one), zeros after
    zeros = torch.zeros_like(per_token)  # what TRL also logs of the outputs: not part of the loss
    outputs = SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())
    accelerator = SimpleNamespace(
        device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x, unwrap_model=lambda m: m
    )
    fake = SimpleNamespace(
        model=SimpleNamespace(training=False),  # "eval": the loss alone, none of the training-token counters
        accelerator=accelerator,
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        _total_train_tokens=0,
        _tp_size=1,
        label_smoothing=label_smoothing,
        use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        args=SimpleNamespace(),
    )
    chosen_ref, rejected_ref = ref.chunk(2)
    inputs = {
        "input_ids": torch.zeros_like(completion),
        "attention_mask": torch.ones_like(completion),
        "completion_mask": completion,
        "ref_chosen_logps": chosen_ref,
        "ref_rejected_logps": rejected_ref,
    }
    return DPOTrainer._compute_loss(fake, lambda **kw: outputs, inputs, return_outputs=False)


@pytest.mark.parametrize(
    "loss, label_smoothing, trl_type",
    [
        ("sigmoid", 0.0, "sigmoid"),
        ("ipo", 0.0, "ipo"),
        ("hinge", 0.0, "hinge"),
        ("sigmoid", 0.2, "aot"),  # TRL's aot is conservative DPO on sorted log-ratios: for one pair, the same
    ],
)
def test_each_loss_equals_trls(loss, label_smoothing, trl_type):
    pytest.importorskip("trl")
    torch.manual_seed(0)
    pairs = 1 if trl_type == "aot" else 6
    for beta in (0.1, 0.5):
        logps, ref = -torch.rand(2 * pairs) * 40, -torch.rand(2 * pairs) * 40
        tokens = torch.randint(3, 30, (2 * pairs,))
        ours = preference_loss(*logps.chunk(2), *ref.chunk(2), loss, beta, label_smoothing, *tokens.chunk(2)).mean()
        torch.testing.assert_close(ours, trl_loss(trl_type, beta, label_smoothing, logps, ref, tokens))


def examples(tokenizer, n: int = 3) -> list[dict]:
    rows = []
    for i in range(n):
        prompt = tokenizer(f"Sort {i}, 3, 1:")["input_ids"]
        good = tokenizer(f" 1, 3, {i}" + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        bad = tokenizer(" no" * (i + 1), add_special_tokens=False)["input_ids"]
        rows.append(
            {
                "chosen_input_ids": prompt + good,
                "rejected_input_ids": prompt + bad,
                "chosen_prompt_tokens": len(prompt),
                "rejected_prompt_tokens": len(prompt),
            }
        )
    return rows


@pytest.mark.parametrize("fused", [True, False])
def test_packed_padded_and_alone_give_the_same_log_probabilities(fused, tiny_model_dir, tokenizer, monkeypatch):
    from gpt4llm.models import response_logps as module
    from gpt4llm.models.hf import load_causal_lm

    monkeypatch.setattr(module, "TOKEN_CHUNK", 7)  # several chunks a batch, and chunks across sequences
    model = load_causal_lm(str(tiny_model_dir), tokenizer, attn_implementation="sdpa_varlen").eval()
    rows = examples(tokenizer)
    with torch.no_grad():
        by_padding, counts = response_logps(model, PairCollator(tokenizer.pad_token_id)(rows), fused)
        by_packing, _ = response_logps(model, PairCollator(tokenizer.pad_token_id, packed=True)(rows), fused)
        alone, lengths = [], []
        for side in ("chosen", "rejected"):
            for r in rows:  # the plain forward of one unpadded sequence, log-softmax over the whole vocabulary
                ids = torch.tensor([r[f"{side}_input_ids"]])
                logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
                n = r[f"{side}_prompt_tokens"]
                alone.append(sum(logps[t - 1, ids[0, t]].item() for t in range(n, ids.size(1))))
                lengths.append(ids.size(1) - n)
    torch.testing.assert_close(by_padding, torch.tensor(alone), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(by_packing, torch.tensor(alone), rtol=1e-5, atol=1e-4)
    assert counts.tolist() == lengths


def test_the_chunked_output_layer_gives_the_plain_forwards_gradients(tiny_model_dir, tokenizer, monkeypatch):
    from gpt4llm.models import response_logps as module
    from gpt4llm.models.hf import load_causal_lm

    monkeypatch.setattr(module, "TOKEN_CHUNK", 5)
    model = load_causal_lm(str(tiny_model_dir), tokenizer)
    batch = PairCollator(tokenizer.pad_token_id)(examples(tokenizer))
    grads = []
    for fused in (True, False):
        model.zero_grad()
        response_logps(model, batch, fused)[0].sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and "lm_head.weight" in grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("reference", ["live", "adapters"])
def test_at_step_0_the_loss_is_ln2_and_the_rewards_0_then_a_repeated_batch_is_learned(
    reference, tiny_model_dir, tokenizer
):
    peft = {"method": "lora", "r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"}
    module = DPOModule(
        tokenizer,
        str(tiny_model_dir),
        dict(OPTIMIZER),
        reference=reference,
        peft=peft if reference == "adapters" else None,
    )
    module.configure_model()
    batch = PairCollator(tokenizer.pad_token_id)(examples(tokenizer))
    first = module.step(batch)
    assert first["loss"].item() == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/chosen"].item() == 0 and first["rewards/rejected"].item() == 0
    optimizer = torch.optim.AdamW([p for p in module.model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(8):
        optimizer.zero_grad()
        module.step(batch)["loss"].backward()
        optimizer.step()
    last = module.step(batch)
    assert last["rewards/accuracies"].item() > 0.5 and last["rewards/margins"].item() > 0
    assert last["loss"].item() < math.log(2)


def test_the_precomputed_reference_stays_fp32_when_the_module_is_cast(tiny_model_dir, tokenizer):
    module = DPOModule(tokenizer, str(tiny_model_dir), dict(OPTIMIZER))
    module.configure_model()
    module.set_reference_logps("train", [-100.125, -2.0], [-3.0, -4.0])
    module.to(torch.bfloat16)  # as DeepSpeed's 16-bit modes cast the module's parameters and buffers
    table = module.precomputed_logps["train"]
    assert table.dtype == torch.float32 and table.tolist() == [[-100.125, -3.0], [-2.0, -4.0]]
    assert "precomputed_logps" not in str(list(module.state_dict()))  # not in the checkpoint either
    batch = {"pair_index": torch.tensor([1, 0])}
    assert module.reference_logps(batch, "train").tolist() == [-2.0, -100.125, -4.0, -3.0]  # chosen, then rejected


# --- the precomputed reference's cache ------------------------------------------------------------------------------
QLORA = {
    "method": "lora",
    "r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.1,
    "target_modules": "all-linear",
    "quantization": {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": "bfloat16",
    },
}


def pairs_data(tmp: Path, tokenizer):
    """24 demo pairs (15 train, 8 validation), the validation split in one batch as the reference pass batches it."""
    from gpt4llm.data.pair_datamodule import PairDataModule

    data = PairDataModule(
        tokenizer,
        path=str(tmp / "pairs.json"),
        demo={"num_records": 24, "seed": 0},
        max_length=128,
        val_size=8,
        batch_size=8,
        eval_batch_size=32,
        cache_dir=str(tmp / "cache"),
    )
    data.setup("fit")
    return data


def attached(tmp: Path, tokenizer, model_dir, **settings) -> DPOModule:
    """A DPO module (beta 1: a reference off by a little is off by as much in the loss) on a CPU trainer, fp32, its
    reference cache under tmp/cache."""
    import lightning as L

    module = DPOModule(tokenizer, str(model_dir), dict(OPTIMIZER), beta=1.0, cache_dir=str(tmp / "cache"), **settings)
    module.trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision="32-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return module


def step0_loss(tmp: Path, tokenizer, model_dir, **settings) -> float:
    """The loss on the validation pairs with the policy just loaded, the reference (precomputed: read from the cache,
    or computed and cached) as `settings` say: ln 2 when the reference is the policy's start."""
    data = pairs_data(tmp, tokenizer)
    module = attached(tmp, tokenizer, model_dir, **settings)
    if module.reference == "precomputed":
        module.precompute_reference(data)
    module.configure_model()
    with torch.no_grad():
        return module.step(next(iter(data.val_dataloader())), "validation")["loss"].item()


def reference_caches(tmp: Path) -> list[str]:
    return sorted(p.name for p in (tmp / "cache").glob("dpo-reference-*.json"))


def test_a_dtype_change_computes_its_own_reference(tmp_path, tiny_model_dir, tokenizer):
    assert step0_loss(tmp_path, tokenizer, tiny_model_dir) == pytest.approx(math.log(2), abs=1e-6)
    # model.dtype=bfloat16 after an fp32 run: the fp32 reference's numbers would be off by the policy's rounding
    assert step0_loss(tmp_path, tokenizer, tiny_model_dir, dtype="bfloat16") == pytest.approx(math.log(2), abs=1e-6)
    assert len(reference_caches(tmp_path)) == 2
    assert step0_loss(tmp_path, tokenizer, tiny_model_dir) == pytest.approx(math.log(2), abs=1e-6)  # reused
    assert len(reference_caches(tmp_path)) == 2


def test_a_model_swapped_with_its_size_and_mtime_kept_computes_its_own_reference(tmp_path, tiny_model_dir, tokenizer):
    import os
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from gpt4llm.models import dpo_module

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    assert step0_loss(tmp_path, tokenizer, model) == pytest.approx(math.log(2), abs=1e-6)
    weights = model / "model.safetensors"
    before = weights.stat()
    with safe_open(weights, "pt") as f:
        metadata = f.metadata()
    tensors = load_file(weights)
    tensors["lm_head.weight"] = tensors["lm_head.weight"] * 3  # another model: the same names, shapes and size
    save_file(tensors, weights, metadata=metadata)
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (weights.stat().st_size, weights.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    dpo_module._file_digests.clear()  # a new run, in a new process: nothing remembered
    assert step0_loss(tmp_path, tokenizer, model) == pytest.approx(math.log(2), abs=1e-6)
    assert len(reference_caches(tmp_path)) == 2


@pytest.mark.parametrize("reference", ["precomputed", "live"])
def test_under_qlora_the_reference_is_the_4bit_base_the_policy_trains_on(
    reference, tmp_path, tiny_model_dir, tokenizer
):
    from gpt4llm.errors import ConfigError
    from gpt4llm.models.adapters import check_4bit

    try:
        check_4bit()
    except ConfigError as err:
        pytest.skip(str(err))
    if reference == "precomputed":  # a full-precision run's cache first, in the same place: not the 4-bit one's
        assert step0_loss(tmp_path, tokenizer, tiny_model_dir) == pytest.approx(math.log(2), abs=1e-6)
    loss = step0_loss(tmp_path, tokenizer, tiny_model_dir, peft=QLORA, reference=reference)
    assert loss == pytest.approx(math.log(2), abs=1e-6)
    assert len(reference_caches(tmp_path)) == (2 if reference == "precomputed" else 0)


def _edit(content: dict) -> bytes:
    content["splits"]["train"]["chosen"][0] += 3.0  # valid JSON, the digest left as it was
    return json.dumps(content).encode()


def _resealed(change):
    """A change made and the file's digest written anew: only the checks of what it holds can tell."""

    def damage(content: dict) -> bytes:
        from gpt4llm.models.dpo_module import values_digest

        change(content["splits"])
        return json.dumps(content | {"sha256": values_digest(content["splits"])}).encode()

    return damage


DAMAGES = {
    "edited": _edit,
    "truncated": lambda content: json.dumps(content).encode()[:300],
    "empty": lambda content: b"",
    "random bytes": lambda content: bytes(range(256)) * 3,
    "short": _resealed(lambda splits: splits["train"]["rejected"].pop()),
    "missing split": _resealed(lambda splits: splits.pop("validation")),
    "not numbers": _resealed(lambda splits: splits["train"]["chosen"].__setitem__(1, "x")),
    "not a cache": lambda content: b"[1, 2, 3]",
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_reference_cache_is_one_error_naming_it_and_how_to_rebuild_it(
    damage, tmp_path, tiny_model_dir, tokenizer
):
    from gpt4llm.errors import RecordError

    module = attached(tmp_path, tokenizer, tiny_model_dir)
    data = pairs_data(tmp_path, tokenizer)
    module.precompute_reference(data)
    target = module.reference_cache(data)
    target.write_bytes(DAMAGES[damage](json.loads(target.read_text())))
    with pytest.raises(RecordError) as err:  # at start, not a JSONDecodeError or IndexError mid-training
        attached(tmp_path, tokenizer, tiny_model_dir).precompute_reference(pairs_data(tmp_path, tokenizer))
    message = str(err.value)
    assert str(target) in message and "delete it and run again to rebuild it" in message and "\n" not in message
    target.unlink()  # as the message says: rebuilt, and the run starts at ln 2
    assert step0_loss(tmp_path, tokenizer, tiny_model_dir) == pytest.approx(math.log(2), abs=1e-6)


@pytest.mark.parametrize("beta", [float("nan"), float("inf"), -float("inf"), 0, -0.1])
def test_beta_must_be_a_finite_number_above_0(beta, tiny_model_dir, tokenizer):
    from gpt4llm.errors import ConfigError

    with pytest.raises(ConfigError, match=f"^task.beta={beta}: "):
        DPOModule(tokenizer, str(tiny_model_dir), dict(OPTIMIZER), beta=beta)


def test_scored_lists_pair_all_best_vs_worst_or_best_vs_rest(tmp_path):
    from gpt4llm.data.comparisons import read_comparison_pairs

    path = tmp_path / "v2.json"
    path.write_text(
        json.dumps(
            [
                {
                    "user_input": "Q",
                    "responses_and_scores": [
                        {"response": "a", "score": 9},
                        {"response": "b", "score": 5},
                        {"response": "c", "score": 5},
                        {"response": "d", "score": 1},
                    ],
                }
            ]
        )
    )
    every, _ = read_comparison_pairs(path)
    assert len(every) == 5  # 6 candidates, b-c tied
    ends, _ = read_comparison_pairs(path, pairing="best_vs_worst")
    assert [(p["chosen"], p["rejected"]) for p in ends] == [("a", "d")]
    rest, _ = read_comparison_pairs(path, pairing="best_vs_rest")
    assert sorted((p["chosen"], p["rejected"]) for p in rest) == [("a", "b"), ("a", "c"), ("a", "d")]


# --- through the CLI ---------------------------------------------------------------------------------------------
def dpo_run(tmp: Path, strategy: str | None, *extra: str) -> Path:
    """The pairs demo, DPO from the tiny model (the reference: itself, precomputed, in the run's precision), bf16."""
    args = [
        *rm_overrides(tmp),
        "task=dpo",
        "data.demo.num_records=48",
        "data.val_size=16",
        "data.batch_size=8",
        "trainer.max_epochs=8",
        "trainer.max_steps=8",
        "trainer.precision=bf16-mixed",
        "validate_first=false",
        *extra,
    ]
    return train_under(tmp, strategy, args, run_id="dpo")


@pytest.fixture(scope="module")
def dpo_reference(tmp_path_factory) -> list[float]:
    return scalars(dpo_run(tmp_path_factory.mktemp("auto"), None))["train/loss"]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero3_offload", "ddp", "fsdp2"])
def test_every_strategy_runs_dpo_like_one_device(strategy, tmp_path, dpo_reference):
    # two CPU processes for DDP and FSDP2; FSDP2 shards a live reference as it shards the policy
    extra = {"ddp": ("trainer.devices=2",), "fsdp2": ("trainer.devices=2", "task.reference=live")}.get(strategy, ())
    run = dpo_run(tmp_path, strategy, *extra)
    logged = scalars(run)
    assert logged["train/loss"][0] == pytest.approx(math.log(2), abs=1e-3)  # policy = reference at step 0
    assert all(f"val/{k}" in logged for k in ("rewards/chosen", "rewards/accuracies", "logps/rejected"))
    if strategy not in ("ddp", "fsdp2"):
        assert max(abs(a - b) for a, b in zip(logged["train/loss"], dpo_reference)) < 0.05
    assert (run / "export" / "model.safetensors").exists()


@pytest.mark.slow
def test_dpo_resumes_exactly_and_exports_the_policy(tmp_path):
    from transformers import AutoModelForCausalLM

    every = [
        # mid-epoch (4 batches an epoch): resuming from a checkpoint taken at an epoch's last batch is not exact yet
        "callbacks.checkpoint.every_n_train_steps=3",
        "callbacks.checkpoint.save_top_k=-1",
        "trainer.precision=32-true",
    ]
    first = dpo_run(tmp_path / "a", None, *every)
    resumed = dpo_run(tmp_path / "b", None, *every, f"ckpt_path={first / 'checkpoints' / 'step3.ckpt'}")
    whole, again = scalars(first)["train/loss"], scalars(resumed)["train/loss"]
    assert again == whole[-len(again) :] and len(again) >= 3
    policy = AutoModelForCausalLM.from_pretrained(first / "export")
    assert policy.config.architectures == ["LlamaForCausalLM"]
