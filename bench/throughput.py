"""Throughput: batches as stanford_alpaca builds them against our default, same model, data and examples, one run.

    python bench/throughput.py                                                   # the demo data, model=tiny
    python bench/throughput.py --data ../shared/data/alpaca_gpt4_sample_1k.json  # realistic GPT-4 lengths
    python bench/throughput.py --model-dir /models/llama-1b --accelerator gpu --precision bf16-mixed

(a) stanford: the records in file order, batch 4 (--batch-size), each padded to its longest record (padding computed),
    logits at every position (transformers' loss with `labels=`, which stanford_alpaca's Trainer used).
(b) ours: the training batches `data=local` builds by default (conf/data/local.yaml: `batching`).
Both train the same initial model on the same examples with the same optimizer and schedule, one epoch. Repeat r
starts both ways from the same weights (with model=tiny, a fresh random init seeded r; a --model-dir's own weights)
and shuffles (b) with seed r, so the validation losses are compared over inits and orders, not one draw. Printed:
real (non-pad) tokens per second of each way, the ratio (b)/(a), the median over --repeats, each way's validation
loss after training (the same padded validation batches for both) and, where the device's peak is known (Lightning's
table of GPUs, or --peak-tflops), the model FLOPs utilisation (gpt4llm.training.flops: useful FLOPs of real tokens
only).
--order-control adds (b)'s layout in (a)'s file order, whose validation loss should equal (a)'s: what then separates
(b) from (a) is the order of the examples, not the layout.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class Clock:
    """Wall time from the first training batch to the last, and the real tokens and useful FLOPs trained on in it."""

    def __init__(self):
        import lightning as L

        from gpt4llm.training.callbacks import example_lengths
        from gpt4llm.training.flops import matmul_parameters, training_flops

        outer = self

        class _Callback(L.Callback):
            def on_train_start(self, trainer, pl_module):
                outer.start, outer.real, outer.computed, outer.flops = time.perf_counter(), 0, 0, 0.0
                config = pl_module.model.config
                self.shape = matmul_parameters(pl_module.model), config.num_hidden_layers, config.hidden_size

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                lengths = example_lengths(batch).tolist()
                outer.computed += batch["input_ids"].numel()
                outer.real += sum(lengths)
                outer.flops += training_flops(*self.shape, lengths)

            def on_train_end(self, trainer, pl_module):
                outer.seconds = time.perf_counter() - outer.start

        self.callback = _Callback()


def full_logits_loss(module, batch):
    """stanford_alpaca's loss: the output layer and softmax at every position, prompts and padding included."""
    from gpt4llm.models.sft_module import token_loss

    return token_loss(module(batch)[:, :-1], batch["labels"][:, 1:])


def train_once(cfg, tokenizer, train_loader, val_loader, args, seed: int, stanford: bool) -> dict[str, float]:
    import lightning as L
    import torch
    from hydra.utils import instantiate
    from transformers import AutoModelForCausalLM

    from gpt4llm.training.flops import available_flops

    L.seed_everything(seed, verbose=False)
    module = instantiate(cfg.task, tokenizer=tokenizer)
    module.configure_model()
    if stanford:
        module.loss = types.MethodType(full_logits_loss, module)
    if not args.model_dir:  # the tiny model is a random init anyway: a fresh one per seed
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            module.model.load_state_dict(AutoModelForCausalLM.from_config(module.model.config).state_dict())
    clock = Clock()
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=1,
        precision=args.precision,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        inference_mode=False,
        gradient_clip_val=1.0,
        callbacks=[clock.callback],
        num_sanity_val_steps=0,
    )
    trainer.fit(module, train_dataloaders=train_loader)
    val_loss = trainer.validate(module, dataloaders=val_loader, verbose=False)[0]["val/loss"]
    peak = args.peak_tflops * 1e12 if args.peak_tflops else available_flops(module.device, args.precision)
    return {
        "tokens_per_s": clock.real / clock.seconds,
        "seconds": clock.seconds,
        "pad_fraction": 1 - clock.real / clock.computed,
        "val_loss": val_loss,
        "mfu": clock.flops / clock.seconds / peak if peak else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="an Alpaca-format file (default: the generated demo)")
    parser.add_argument("--model-dir", help="a local Hugging Face causal LM (default: model=tiny)")
    parser.add_argument("--examples", type=int, default=512, help="training examples per run (both ways)")
    parser.add_argument("--val-size", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument(
        "--batch-size", type=int, default=4, help="examples per batch, both ways (stanford_alpaca's: 4)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument(
        "--peak-tflops", type=float, help="the device's peak for MFU (default: Lightning's table of GPUs)"
    )
    parser.add_argument("--batching", help="override data.batching for (b) (auto, packed, grouped, random)")
    parser.add_argument(
        "--attn-implementation", help="override model.attn_implementation (e.g. sdpa_varlen for --model-dir)"
    )
    parser.add_argument(
        "--order-control",
        action="store_true",
        help="also train (b)'s layout in (a)'s file order: its val loss should equal (a)'s, so a gap is the order's",
    )
    parser.add_argument(
        "--threads", type=int, default=2, help="torch intra-op threads (the cores you have to yourself)"
    )
    parser.add_argument("--work-dir", default=str(ROOT / "data"), help="where the tiny model, demo and caches go")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)

    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from torch.utils.data import DataLoader

    from gpt4llm.data.collators import PackedCollator, SFTCollator
    from gpt4llm.data.demo import write_demo_file
    from gpt4llm.models.hf import prepare_tokenizer

    data = args.data or str(write_demo_file(Path(args.work_dir) / "demo" / "bench_demo.json", 4000, seed=0))
    model = ["model=hf", f"model.path={args.model_dir}"] if args.model_dir else ["model=tiny"]
    overrides = [
        *model,
        "data=local",
        f"data.path={data}",
        f"paths.data_dir={args.work_dir}",
        f"data.batch_size={args.batch_size}",
        f"data.val_size={args.val_size}",
        f"model.max_length={args.max_length}",
        "data.num_workers=0",
        *([f"data.batching={args.batching}"] if args.batching else []),
        *([f"model.attn_implementation={args.attn_implementation}"] if args.attn_implementation else []),
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    if not args.model_dir:
        cfg.model.tiny.max_position_embeddings = max(args.max_length, cfg.model.tiny.max_position_embeddings)

    tokenizer, _ = prepare_tokenizer(cfg.model.path, cfg.model.tiny)
    datamodule = instantiate(cfg.data, tokenizer=tokenizer)
    datamodule.setup("fit")
    train = datamodule.splits["train"]
    if len(train) < args.examples:
        sys.exit(f"{data}: only {len(train)} training examples; ask for --examples {len(train)} or fewer")
    # The first N training records in file order: what (a) trains on, and what (b) lays out its own way.
    train = train.sort("index").select(range(args.examples))
    datamodule.splits["train"] = train
    padded = SFTCollator(tokenizer.pad_token_id)
    stanford = DataLoader(
        train.select_columns(["input_ids", "labels"]), batch_size=args.batch_size, shuffle=False, collate_fn=padded
    )
    val = DataLoader(
        datamodule.splits["validation"].select_columns(["input_ids", "labels"]), batch_size=16, collate_fn=padded
    )

    runs = {"stanford": [], "ours": []}
    if args.order_control:
        if datamodule.batching != "packed":
            sys.exit(f"--order-control compares packed batches in file order; (b) here is {datamodule.batching}")
        runs["ours_file_order"] = []
        file_order = DataLoader(
            train.select_columns(["input_ids", "labels"]), batch_size=args.batch_size, collate_fn=PackedCollator()
        )
    for repeat in range(args.repeats):
        datamodule.shuffle_seed = repeat
        loaders = {"stanford": stanford, "ours": datamodule.train_dataloader()}
        if args.order_control:
            loaders["ours_file_order"] = file_order
        # Alternating which way goes first, so neither always meets a cold or a warm process.
        for way in list(loaders) if repeat % 2 == 0 else list(reversed(loaders)):
            runs[way].append(
                train_once(cfg, tokenizer, loaders[way], val, args, seed=repeat, stanford=way == "stanford")
            )
        print(
            f"repeat {repeat + 1}: "
            + ", ".join(
                f"{k} {v[-1]['tokens_per_s']:.0f} tok/s, val loss {v[-1]['val_loss']:.4f}" for k, v in runs.items()
            ),
            flush=True,
        )

    print(
        f"\n{args.examples} examples of {data}, model {cfg.model.path}, batch {args.batch_size}, "
        f"{args.repeats} repeats (median)"
    )
    print(
        f"ours = data.batching={cfg.data.batching} ({datamodule.batching}), attention {cfg.model.attn_implementation}"
    )
    print(f"{'way':16s} {'real tok/s':>11s} {'pad frac':>9s} {'seconds':>8s} {'val loss':>9s} {'MFU':>7s}")
    median = {}
    for way, results in runs.items():
        median[way] = {k: statistics.median(r[k] for r in results) for k in results[0]}
        m = median[way]
        mfu = "n/a" if math.isnan(m["mfu"]) else f"{m['mfu']:.1%}"  # no known peak (CPUs): see --peak-tflops
        print(
            f"{way:16s} {m['tokens_per_s']:11.0f} {m['pad_fraction']:9.3f} {m['seconds']:8.1f} "
            f"{m['val_loss']:9.4f} {mfu:>7s}"
        )
    ratios = [o["tokens_per_s"] / s["tokens_per_s"] for s, o in zip(runs["stanford"], runs["ours"])]
    print(
        f"ratio ours/stanford (real tokens/s): median {statistics.median(ratios):.2f}  (each repeat: "
        + ", ".join(f"{r:.2f}" for r in ratios)
        + ")"
    )
    gaps = [o["val_loss"] - s["val_loss"] for s, o in zip(runs["stanford"], runs["ours"])]
    print(
        f"val loss ours - stanford: median {statistics.median(gaps):+.4f}  (each repeat: "
        + ", ".join(f"{g:+.4f}" for g in gaps)
        + ")"
    )
    if args.order_control:  # the same batches in the same order, laid out packed: only float rounding differs
        gaps = [o["val_loss"] - s["val_loss"] for s, o in zip(runs["stanford"], runs["ours_file_order"])]
        print(
            f"val loss ours in file order - stanford: largest |difference| {max(map(abs, gaps)):.4f}  (each repeat: "
            + ", ".join(f"{g:+.4f}" for g in gaps)
            + ")"
        )


if __name__ == "__main__":
    main()
