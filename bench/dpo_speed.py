"""Our DPO (task=dpo) against TRL's DPOTrainer on the same model, pairs and settings, in one command.

    python bench/dpo_speed.py                       # pairs made from the 1k GPT-4 sample (../shared/data), else demo
    python bench/dpo_speed.py --hidden-size 512 --layers 8 --pairs 256

Pairs: each record's GPT-4 answer chosen, another record's answer rejected, under the Alpaca prompt. The same
random-init LLaMA-architecture model (the tiny tokenizer), sigmoid loss, beta 0.1, lr 5e-5, batch 4 pairs, max length
512, gradient checkpointing on (TRL's default; --no-gradient-checkpointing turns it off both ways), fp32 on the CPU,
one epoch, the reference precomputed both ways (TRL: precompute_ref_log_probs=True; ours: the default). Ours runs
twice: padded, as TRL, and packed (data.packed=true with sdpa_varlen: no pad tokens computed; TRL's padding_free
needs flash-attention, which the CPU lacks). Each run is its own process.
Printed: real (non-pad) tokens of the pairs per second from the model's set-up to the end of
training (the reference pass included, since TRL makes it inside train(); tokenization not, since TRL's is in its
constructor), peak resident memory and how much came during that time, rewards/accuracies over the last quarter of
the steps, and the ratios; median of --repeats.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import tempfile
import time
from pathlib import Path

from lora_speed import add_common_arguments, build_model, current_rss_mib, described, records, run_children


def make_pairs(n: int) -> list[dict]:
    from gpt4llm.data.prompts import format_prompt

    rows = records(max(n, 2))
    rng = random.Random(0)
    pairs = []
    for i in range(n):
        r = rows[i % len(rows)]
        other = rows[(i + 1 + rng.randrange(len(rows) - 1)) % len(rows)]
        pairs.append(
            {"prompt": format_prompt(r["instruction"], r["input"]), "chosen": r["output"], "rejected": other["output"]}
        )
    return pairs


def run_ours(args, work: Path, model: Path) -> dict:
    import lightning as L
    from hydra import compose, initialize_config_module
    from omegaconf import open_dict

    from gpt4llm.app import resolvers
    from gpt4llm.train import train

    resolvers.register()
    state: dict = {"accuracies": []}

    class Clock(L.Callback):
        def setup(self, trainer, pl_module, stage):  # after the data module's (tokenization), before the model
            state["start"], state["rss"] = time.perf_counter(), current_rss_mib()

        def on_train_end(self, trainer, pl_module):
            state["end"] = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            state["accuracies"].append(float(trainer.callback_metrics["train/rewards/accuracies"]))

    overrides = [
        "task=dpo",
        "data=local_pairs",
        f"data.path={work / 'pairs.json'}",
        "data.template=alpaca",  # the Alpaca prompt, as TRL gets it here (auto: a chat model's own template)
        f"model.path={model}",
        "model.tiny=null",
        "model.tokenizer=tokenizers",
        "data.val_size=0",
        f"data.batch_size={args.batch_size}",
        f"model.max_length={args.max_length}",
        "trainer.max_epochs=1",
        "trainer.max_steps=-1",
        "trainer.precision=32-true",
        f"model.gradient_checkpointing={str(args.gradient_checkpointing).lower()}",
        "task.optimizer.lr=5e-5",
        "task.warmup_ratio=0",
        "task.beta=0.1",
        "export=false",
        f"paths.data_dir={work / 'data'}",
        "callbacks.exact_match=null",
        "callbacks.checkpoint=null",
        "logger.tensorboard=null",
        "validate_first=false",
        "data.num_workers=0",
    ]
    if args.variant == "ours-packed":  # one row a batch, no padding (TRL's padding_free needs flash-attn)
        overrides += ["data.packed=true", "model.attn_implementation=sdpa_varlen"]
    with initialize_config_module("gpt4llm.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(work / "run")
        cfg.callbacks.clock = {"_target_": f"{__name__}.Clock"}
    globals()["Clock"] = Clock
    train(cfg)
    return {
        "seconds": state["end"] - state["start"],
        "rss_at_start_mib": state["rss"],
        "accuracies": state["accuracies"],
    }


def run_trl(args, pairs: list[dict], model: Path, work: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from gpt4llm.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(model), backend="tokenizers")
    config = DPOConfig(
        output_dir=str(work / "trl"),
        per_device_train_batch_size=args.batch_size,
        num_train_epochs=1,
        learning_rate=5e-5,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        beta=0.1,
        loss_type=["sigmoid"],
        max_length=args.max_length,
        precompute_ref_log_probs=True,
        gradient_checkpointing=args.gradient_checkpointing,  # TRL's default is on: set both ways, explicitly
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        bf16=False,
        fp16=False,
        dataloader_num_workers=0,
        seed=42,
    )
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model),
        args=config,
        train_dataset=Dataset.from_list(pairs),
        processing_class=tokenizer,
    )
    start, rss = time.perf_counter(), current_rss_mib()
    trainer.train()
    seconds = time.perf_counter() - start
    accuracies = [h["rewards/accuracies"] for h in trainer.state.log_history if "rewards/accuracies" in h]
    return {"seconds": seconds, "rss_at_start_mib": rss, "accuracies": accuracies}


def real_tokens(pairs: list[dict], model: Path, max_length: int) -> int:
    from gpt4llm.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(model), backend="tokenizers")
    texts = [p["prompt"] + p[side] + tokenizer.eos_token for p in pairs for side in ("chosen", "rejected")]
    return sum(min(len(ids), max_length) for ids in tokenizer(texts)["input_ids"])


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    work, model = Path(args.work), Path(args.model)
    if args.variant == "trl":
        out = run_trl(args, json.loads((work / "pairs.json").read_text()), model, work)
    else:
        out = run_ours(args, work, model)
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=128)
    add_common_arguments(parser)
    args = parser.parse_args()
    if args.variant:
        return child(args)

    work = Path(tempfile.mkdtemp(prefix="dpo-bench-"))
    pairs = make_pairs(args.pairs)
    (work / "pairs.json").write_text(json.dumps(pairs, ensure_ascii=False))
    model = Path(args.pretrained) if args.pretrained else build_model(work / "model", args.hidden_size, args.layers)
    tokens = real_tokens(pairs, model, args.max_length)
    results = run_children(__file__, ("ours", "ours-packed", "trl"), args.repeats, work, model, args)
    print(
        f"{len(pairs)} pairs ({tokens} real tokens), model {described(args)}, "
        f"batch {args.batch_size} pairs, max length {args.max_length}, gradient checkpointing "
        f"{'on' if args.gradient_checkpointing else 'off'}, {args.repeats} repeats (median), fp32 CPU"
    )
    summary = {}
    for variant, runs in results.items():
        rate = statistics.median(tokens / r["seconds"] for r in runs)
        peak = statistics.median(r["peak_rss_mib"] for r in runs)
        grew = statistics.median(r["peak_rss_mib"] - r["rss_at_start_mib"] for r in runs)
        last = statistics.median(statistics.mean(r["accuracies"][-max(1, len(r["accuracies"]) // 4) :]) for r in runs)
        summary[variant] = (rate, peak, grew, last)
        print(
            f"{variant:11s} {rate:8.0f} tokens/s   peak RSS {peak:6.0f} MiB (during train {grew:5.0f})   "
            f"rewards/accuracies (last quarter) {last:.3f}"
        )
    trl = summary["trl"]
    for variant in ("ours", "ours-packed"):
        ours = summary[variant]
        print(
            f"{variant} / TRL: tokens/s {ours[0] / trl[0]:.2f}, peak RSS {ours[1] / trl[1]:.2f}, "
            f"growth {ours[2] / trl[2]:.2f}"
        )


if __name__ == "__main__":
    main()
