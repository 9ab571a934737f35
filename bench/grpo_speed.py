"""Our GRPO (task=grpo) against TRL's GRPOTrainer on the same model, prompts, reward function and settings.

    python bench/grpo_speed.py                                  # a random-init LLaMA-architecture model
    python bench/grpo_speed.py --pretrained data/bench/smollm2-135m   # a real pretrained chat model (bench/smollm2.py)

Prompts: the Alpaca prompts of the 1k GPT-4 sample (../shared/data), else of the demo. Both sides: `--prompts`
prompts a step, `--generations` completions each (TRL: per_device_train_batch_size = prompts x generations), at
most `--completion-length` tokens sampled at temperature 1 with no top-k or top-p (TRL's defaults), the reward
function below (the share of a completion's characters that are "e"), beta 0, loss dapo, lr 1e-6 constant, no
gradient checkpointing, fp32 on the CPU, `--steps` steps. Each run is its own process.

Printed: completion tokens per second over training (generation, scoring and the optimizer steps; model loading and
tokenization not), peak resident memory and how much of it came during training, the mean reward of the last
quarter of the steps, and the ratios against TRL; median of --repeats.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from lora_speed import build_model, current_rss_mib, records

COUNTED = {"tokens": 0}


def letter_share(prompts, completions, completion_ids=None, **_):
    """The reward both trainers call: gpt4llm's letter_share, and the completion tokens it was shown counted."""
    from gpt4llm.models.reward_functions import letter_share as share

    COUNTED["tokens"] += sum(len(ids) for ids in completion_ids)
    return share(prompts, completions)


def run_ours(args, work: Path, model: Path) -> dict:
    import lightning as L
    from hydra import compose, initialize_config_module
    from omegaconf import open_dict

    from gpt4llm.app import resolvers
    from gpt4llm.train import train

    resolvers.register()
    state: dict = {"rewards": []}

    class Clock(L.Callback):
        def on_train_start(self, trainer, pl_module):
            state["start"], state["rss"] = time.perf_counter(), current_rss_mib()

        def on_train_end(self, trainer, pl_module):
            state["end"] = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            state["rewards"].append(float(trainer.callback_metrics["train/reward"]))

    overrides = [
        "task=grpo",
        "data=local",
        f"data.path={work / 'prompts.json'}",
        f"model.path={model}",
        "model.tiny=null",
        "model.tokenizer=tokenizers",
        "model.attn_implementation=sdpa",
        "data.template=alpaca",
        "data.val_size=0",
        f"data.batch_size={args.prompts}",
        f"task.num_generations={args.generations}",
        f"task.max_completion_length={args.completion_length}",
        "task.max_prompt_length=512",
        "model.max_length=1024",
        "task.optimizer.lr=1e-6",
        "task.log_completions_every=0",
        "reward=function",
        "reward.fn=__main__:letter_share",
        f"trainer.max_steps={args.steps}",
        "trainer.precision=32-true",
        "model.gradient_checkpointing=false",
        "export=false",
        f"paths.data_dir={work / 'data'}",
        "callbacks.exact_match=null",
        "callbacks.checkpoint=null",
        "logger.tensorboard=null",
        "validate_first=false",
        "data.num_workers=0",
    ]
    with initialize_config_module("gpt4llm.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(work / f"run-{time.time_ns()}")
        cfg.callbacks.clock = {"_target_": "__main__.Clock"}
    globals()["Clock"] = Clock
    train(cfg)
    return {"seconds": state["end"] - state["start"], "rss_at_start_mib": state["rss"], "rewards": state["rewards"]}


def run_trl(args, prompts: list[str], model: Path, work: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from gpt4llm.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(model), backend="tokenizers")
    tokenizer.padding_side = "left"
    config = GRPOConfig(
        output_dir=str(work / "trl"),
        per_device_train_batch_size=args.prompts * args.generations,
        num_generations=args.generations,
        max_completion_length=args.completion_length,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=0.0,
        loss_type="dapo",
        learning_rate=1e-6,
        lr_scheduler_type="constant",
        max_steps=args.steps,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        bf16=False,
        fp16=False,
        dataloader_num_workers=0,
        seed=42,
    )
    state: dict = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            state["start"], state["rss"] = time.perf_counter(), current_rss_mib()

        def on_train_end(self, *a, **k):
            state["end"] = time.perf_counter()

    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model),
        reward_funcs=letter_share,
        args=config,
        train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
        processing_class=tokenizer,
        callbacks=[Clock()],
    )
    trainer.train()
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    return {"seconds": state["end"] - state["start"], "rss_at_start_mib": state["rss"], "rewards": rewards}


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    work, model = Path(args.work), Path(args.model)
    if args.variant == "trl":
        rows = json.loads((work / "prompts.json").read_text())
        from gpt4llm.data.prompts import format_prompt

        out = run_trl(args, [format_prompt(r["instruction"], r["input"]) for r in rows], model, work)
    else:
        out = run_ours(args, work, model)
    out["tokens"] = COUNTED["tokens"]
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out))


def main() -> None:
    import subprocess

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=4, help="prompts a step")
    parser.add_argument("--generations", type=int, default=4, help="completions a prompt")
    parser.add_argument("--completion-length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--pretrained", help="a local causal LM directory instead of the random-init model")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        return child(args)

    work = Path(tempfile.mkdtemp(prefix="grpo-bench-"))
    rows = records(max(args.prompts * args.steps, 64))
    (work / "prompts.json").write_text(json.dumps(rows, ensure_ascii=False))
    model = Path(args.pretrained) if args.pretrained else build_model(work / "model", args.hidden_size, args.layers)
    results: dict[str, list[dict]] = {"ours": [], "trl": []}
    for _ in range(args.repeats):
        for variant in results:
            command = [sys.executable, __file__, f"--variant={variant}", f"--work={work}", f"--model={model}"]
            command += [f"--prompts={args.prompts}", f"--generations={args.generations}", f"--steps={args.steps}"]
            command += [f"--completion-length={args.completion_length}", f"--threads={args.threads}"]
            proc = subprocess.run(command, capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(f"{variant} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
            results[variant].append(json.loads(line[7:]))
    what = args.pretrained or f"random-init LLaMA, hidden {args.hidden_size} x {args.layers} layers"
    print(
        f"{what}; {args.prompts} prompts x {args.generations} completions a step, at most {args.completion_length} "
        f"tokens, {args.steps} steps, {args.repeats} repeats (median), fp32 CPU, {args.threads} threads"
    )
    summary = {}
    for variant, runs in results.items():
        rate = statistics.median(r["tokens"] / r["seconds"] for r in runs)
        peak = statistics.median(r["peak_rss_mib"] for r in runs)
        grew = statistics.median(r["peak_rss_mib"] - r["rss_at_start_mib"] for r in runs)
        last = statistics.median(statistics.mean(r["rewards"][-max(1, len(r["rewards"]) // 4) :]) for r in runs)
        summary[variant] = (rate, peak, grew)
        print(
            f"{variant:5s} {rate:8.1f} completion tokens/s   peak RSS {peak:6.0f} MiB (during train {grew:5.0f})   "
            f"reward (last quarter) {last:.3f}"
        )
    ours, trl = summary["ours"], summary["trl"]
    print(
        f"ours / TRL: speed {ours[0] / trl[0]:.2f}x, peak memory {ours[1] / trl[1]:.2f}x, "
        f"growth in training {ours[2] / max(trl[2], 1e-9):.2f}x"
    )


if __name__ == "__main__":
    main()
