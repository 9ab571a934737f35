"""Every conf/strategy/deepspeed_*.yaml trains for real: `python -m gpt4llm.train` through Lightning's DeepSpeed code
path on DeepSpeed's CPU accelerator (tests/cpu_deepspeed.py lifts Lightning's CUDA-only checks and nothing else).

What a GPU run does is done here: the model built under deepspeed.zero.Init with the config registered with
transformers, the optimizer the strategy needs (DeepSpeed's CPU Adam under offload), deepspeed.initialize,
optimizer steps with the loss falling, DeepSpeed's checkpoint directory, and our export gathered from the ZeRO
partitions. The export is checked against an independent oracle: DeepSpeed's own consolidation of the checkpoint's
fp32 master weights. bf16 stands in for the paper's fp16 (DeepSpeed's CPU accelerator has no fp16 training).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers.configs import CONF, ROOT, demo_overrides, rm_overrides
from helpers.runs import run_cli, scalars

pytestmark = pytest.mark.slow

STRATEGIES = sorted(p.stem for p in (CONF / "strategy").glob("deepspeed_*.yaml"))
# The optimizer follows the strategy: DeepSpeed's CPU Adam where the optimizer is offloaded, else (on the CPU) torch's
OPTIMIZER_LOG = {"deepspeed_zero3_offload": "DeepSpeed's CPU Adam"}
DECAY = 0.1  # on, so that the runs show it reaches the right parameters under ZeRO-3 too
LOSS_TOLERANCE = {"sft": 0.01, "rm": 0.03}
FALL = {"sft": 0.3, "rm": 0.01}  # over 8 steps of the demos (measured: 0.47 and 0.02)


def deepspeed_run(tmp: Path, task: str, strategy: str | None, *extra: str) -> Path:
    """8 steps of the task's demo in bf16 under a DeepSpeed strategy config (None: no strategy, the reference)."""
    overrides = rm_overrides(tmp) if task == "rm" else demo_overrides(tmp, "callbacks.exact_match=null")
    if strategy:
        overrides += [f"strategy={strategy}", "strategy._target_=helpers.cpu_deepspeed.CPUDeepSpeedStrategy"]
    tmp.mkdir(parents=True, exist_ok=True)
    run_cli(
        "gpt4llm.train",
        [
            *overrides,
            "trainer.precision=bf16-mixed",
            "trainer.max_steps=8",
            "validate_first=false",
            f"task.optimizer.weight_decay={DECAY}",
            *extra,
        ],
        cwd=tmp,
        DS_ACCELERATOR="cpu",
        PYTHONPATH=str(ROOT / "tests"),
    )
    return tmp / "run"


@pytest.fixture(scope="module")
def reference_losses(tmp_path_factory) -> dict[str, list[float]]:
    """The same runs without DeepSpeed: the same init, data order and recipe."""
    return {
        task: scalars(deepspeed_run(tmp_path_factory.mktemp(task), task, None))["train/loss"] for task in ("sft", "rm")
    }


def decayed_tensors(task: str, model_dir: Path) -> str:
    """'N of M parameter tensors' as the whole (unsharded) tiny model of the task has them."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from gpt4llm.models.optim import decay_parameter_names

    auto = AutoModelForSequenceClassification if task == "rm" else AutoModelForCausalLM
    model = auto.from_pretrained(model_dir, num_labels=1) if task == "rm" else auto.from_pretrained(model_dir)
    return f"{len(decay_parameter_names(model))} of {len(list(model.parameters()))} parameter tensors"


def deepspeed_fp32_weights(checkpoint: Path, tmp: Path) -> dict[str, torch.Tensor]:
    """DeepSpeed's consolidation of a ZeRO checkpoint's fp32 master weights, keys as in the Hugging Face model."""
    from lightning.pytorch.utilities.deepspeed import (
        convert_zero_checkpoint_to_fp32_state_dict,
    )

    convert_zero_checkpoint_to_fp32_state_dict(str(checkpoint), str(tmp / "fp32.pt"))
    state = torch.load(tmp / "fp32.pt", weights_only=False)["state_dict"]
    return {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}


@pytest.mark.parametrize("task", ["sft", "rm"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_deepspeed_strategy_trains_checkpoints_and_exports_on_cpu(strategy, task, tmp_path, reference_losses):
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    run = deepspeed_run(tmp_path, task, strategy)
    log = (run / "train.log").read_text()
    assert "Optimizer: " + OPTIMIZER_LOG.get(strategy, "torch's AdamW") in log
    # decided by name and module type, as without DeepSpeed: under ZeRO-3 every parameter is a 1-D placeholder then
    assert f"weight decay {DECAY:g} on {decayed_tensors(task, tmp_path / 'data' / 'models' / 'tiny-llama')}" in log

    # Real optimizer steps, the same as without DeepSpeed: each step's loss as the reference run's (measured: within
    # 0.0013 for SFT, 0.012 for the reward model, whose bf16 head DeepSpeed keeps in bf16), and falling.
    losses, reference = scalars(run)["train/loss"], reference_losses[task]
    assert len(losses) == len(reference) == 8
    deviation = max(abs(a - b) for a, b in zip(losses, reference))
    assert deviation < LOSS_TOLERANCE[task], (losses, reference)
    assert losses[-1] < losses[0] - FALL[task], losses

    checkpoint = run / "checkpoints" / "last.ckpt"
    assert checkpoint.is_dir(), "DeepSpeed writes its checkpoint as a directory of shards"
    auto = AutoModelForSequenceClassification if task == "rm" else AutoModelForCausalLM
    exported = auto.from_pretrained(run / "export", dtype=torch.float32).eval()
    oracle = auto.from_pretrained(run / "export", dtype=torch.float32).eval()
    oracle.load_state_dict(deepspeed_fp32_weights(checkpoint, tmp_path), strict=True)

    tokenizer = AutoTokenizer.from_pretrained(run / "export")
    batch = tokenizer(["Sort these numbers: 3 1 2", "Count the words."], padding=True, return_tensors="pt")
    with torch.no_grad():
        got, want = exported(**batch).logits, oracle(**batch).logits
    # The export holds the 16-bit weights DeepSpeed trains with; the oracle the fp32 master weights of the same step.
    error = float((got - want).norm() / want.norm())
    assert error < 3e-2, f"the export's logits differ from DeepSpeed's own weights by {error:.3g}"


def test_zero3_offload_resumes_from_its_checkpoint_directory(tmp_path):
    """A DeepSpeed checkpoint directory resumes at its step with its optimizer state: the same weights as a run
    that was never stopped."""
    from safetensors.torch import load_file

    every_4 = ["callbacks.checkpoint.every_n_train_steps=4", "callbacks.checkpoint.save_top_k=-1"]
    straight = deepspeed_run(tmp_path / "straight", "sft", "deepspeed_zero3_offload", *every_4)
    middle = straight / "checkpoints" / "step4.ckpt"
    assert middle.is_dir(), sorted(p.name for p in (straight / "checkpoints").iterdir())
    resumed = deepspeed_run(tmp_path / "resumed", "sft", "deepspeed_zero3_offload", *every_4, f"ckpt_path={middle}")
    assert [round(x, 4) for x in scalars(resumed)["train/loss"]] == [
        round(x, 4) for x in scalars(straight)["train/loss"][4:]
    ]
    want, got = (
        load_file(straight / "export" / "model.safetensors"),
        load_file(resumed / "export" / "model.safetensors"),
    )
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=0, msg=f"{name} differs after resume")
