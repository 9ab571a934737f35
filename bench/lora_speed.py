"""LoRA against full fine-tuning, and our LoRA against peft + TRL's SFTTrainer doing the same run, in one command.

    python bench/lora_speed.py                      # the 1k GPT-4 sample (../shared/data), else the demo records
    python bench/lora_speed.py --hidden-size 512 --layers 8 --examples 512

The same random-init LLaMA-architecture model (the tiny tokenizer; --hidden-size, --layers), the same examples (the
Alpaca prompt, the GPT-4 answer and EOS; loss on the answer only: TRL's prompt-completion format), LoRA r 8, alpha
16, dropout 0.05 on q_proj and v_proj, batch 4, lr 3e-4, fp32 on the CPU (--gpu: bf16 on one GPU), gradient
checkpointing on (TRL's SFTConfig default; --no-gradient-checkpointing turns it off all ways), one epoch. Each way
runs in its own process. Printed: real (non-pad) tokens per second of the training loop (first step to last, setup
excluded), the process's peak resident memory (and how much of it came during training: the peak less the memory
when the loop started, which leaves out what each library's imports and set-up take), and the ratios; median of
--repeats.

    ours, full      python -m gpt4llm.train peft=none (its default batching: packed rows)
    ours, LoRA      python -m gpt4llm.train peft=lora
    TRL, LoRA       trl.SFTTrainer(peft_config=LoraConfig(...)), padded batches (its default)

--full compares full fine-tuning instead (issue 36: SFT's peak memory against TRL's):

    ours, full                      as above (the loss on chunks of positions: task.chunked_loss=true)
    ours, full, whole logits        task.chunked_loss=false (the logits of every supervised position at once)
    TRL, full                       trl.SFTTrainer without peft (its own loss; chunked where TRL does it)
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}


def records(n: int) -> list[dict]:
    sample = SHARED / "alpaca_gpt4_sample_1k.json"
    if sample.exists():
        rows = json.loads(sample.read_text())
    else:
        from gpt4llm.data.demo import make_demo_records

        rows = make_demo_records(n)
    return [{k: r.get(k, "") for k in ("instruction", "input", "output")} for r in rows[:n]]


def build_model(directory: Path, hidden: int, layers: int) -> Path:
    from gpt4llm.models.tiny import build_tiny_model

    return build_tiny_model(
        directory,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        intermediate_size=hidden * 8 // 3 // 8 * 8,
        max_position_embeddings=1024,
    )


def run_ours(args, data: Path, model: Path, work: Path, peft: str, chunked: bool = True) -> dict:
    import lightning as L
    from hydra import compose, initialize_config_module

    from gpt4llm.app import resolvers
    from gpt4llm.train import train

    resolvers.register()
    times: dict[str, float] = {}

    class Clock(L.Callback):
        def on_train_start(self, trainer, pl_module):
            times["start"], times["rss_at_start"] = time.perf_counter(), current_rss_mib()

        def on_train_end(self, trainer, pl_module):
            times["end"] = time.perf_counter()

    overrides = [
        "data=local",
        f"data.path={data}",
        "data.template=alpaca",  # the Alpaca prompt, as TRL gets it here (auto: a chat model's own template)
        f"model.path={model}",
        "model.tiny=null",
        "model.tokenizer=tokenizers",
        f"peft={peft}",
        "data.val_size=0",
        f"data.batch_size={args.batch_size}",
        f"model.max_length={args.max_length}",
        "trainer.max_epochs=1",
        "trainer.max_steps=-1",
        f"trainer.accelerator={'gpu' if args.gpu else 'cpu'}",
        f"trainer.precision={'bf16-mixed' if args.gpu else '32-true'}",
        f"model.gradient_checkpointing={str(args.gradient_checkpointing).lower()}",
        "task.optimizer.lr=3e-4",
        "task.warmup_ratio=0",
        "export=false",
        f"paths.data_dir={work / 'data'}",
        "callbacks.exact_match=null",
        "callbacks.checkpoint=null",
        "logger.tensorboard=null",
        "validate_first=false",
        "data.num_workers=0",
        f"task.chunked_loss={str(chunked).lower()}",
    ]
    if peft == "lora":
        overrides += [f"peft.{k}={json.dumps(v)}" for k, v in LORA.items()]
    with initialize_config_module("gpt4llm.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    from omegaconf import open_dict

    with open_dict(cfg):
        cfg.paths.output_dir = str(work / "run")
        cfg.callbacks.clock = {"_target_": f"{__name__}.Clock"}
    globals()["Clock"] = Clock  # instantiated by name, from this module
    train(cfg)
    return {"seconds": times["end"] - times["start"], "rss_at_start_mib": times["rss_at_start"]}


def run_trl(args, rows: list[dict], model: Path, work: Path, lora: bool = True) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from gpt4llm.data.prompts import format_prompt
    from gpt4llm.data.tokenizer import load_tokenizer

    times: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            times["start"], times["rss_at_start"] = time.perf_counter(), current_rss_mib()

        def on_train_end(self, *a, **k):
            times["end"] = time.perf_counter()

    tokenizer = load_tokenizer(str(model), backend="tokenizers")
    dataset = Dataset.from_list(
        [{"prompt": format_prompt(r["instruction"], r["input"]), "completion": r["output"]} for r in rows]
    )
    config = SFTConfig(
        output_dir=str(work / "trl"),
        per_device_train_batch_size=args.batch_size,
        num_train_epochs=1,
        learning_rate=3e-4,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        max_length=args.max_length,
        report_to="none",
        save_strategy="no",
        logging_steps=10_000,
        use_cpu=not args.gpu,
        bf16=args.gpu,
        fp16=False,
        completion_only_loss=True,
        gradient_checkpointing=args.gradient_checkpointing,  # TRL's default is on: set both ways, explicitly
        dataloader_num_workers=0,
        seed=42,
    )
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(model),
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(task_type="CAUSAL_LM", **LORA) if lora else None,
        callbacks=[Clock()],
    )
    trainer.train()
    return {"seconds": times["end"] - times["start"], "rss_at_start_mib": times["rss_at_start"]}


def current_rss_mib() -> float:
    import os

    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def real_tokens(rows: list[dict], model: Path, max_length: int) -> int:
    """The non-pad tokens one epoch trains on (prompt, answer, EOS; cut at max_length), the same for every way."""
    from gpt4llm.data.prompts import format_prompt
    from gpt4llm.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(model), backend="tokenizers")
    texts = [format_prompt(r["instruction"], r["input"]) + r["output"] + tokenizer.eos_token for r in rows]
    return sum(min(len(ids), max_length) for ids in tokenizer(texts)["input_ids"])


def described(args) -> str:
    """The benchmarked model, as the printed summary names it."""
    return args.pretrained or f"random-init, hidden {args.hidden_size} x {args.layers} layers"


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The settings every benchmark of ours against TRL takes, and the ones a child process is started with."""
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument(
        "--pretrained", help="a local causal LM directory (a real model: bench/smollm2.py) instead of the random one"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="every way (TRL's SFTConfig and DPOConfig turn it on by default)",
    )
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)


def run_children(script: str, variants, repeats: int, work: Path, model: Path, args, *extra: str) -> dict:
    """Each variant `repeats` times, each run in a process of its own (`script --variant=...`, so its peak memory is
    its own), round-robin; the RESULT line each prints, by variant."""
    results: dict[str, list[dict]] = {v: [] for v in variants}
    for _ in range(repeats):
        for variant in variants:
            command = [sys.executable, script, f"--variant={variant}", f"--work={work}", f"--model={model}"]
            command += [f"--batch-size={args.batch_size}", f"--max-length={args.max_length}"]
            command += [f"--threads={args.threads}"]
            command += [f"--{'' if args.gradient_checkpointing else 'no-'}gradient-checkpointing"]
            proc = subprocess.run([*command, *extra], capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(f"{variant} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
            results[variant].append(json.loads(line[7:]))
    return results


def child(args) -> None:
    work = Path(args.work)
    rows = json.loads((work / "data.json").read_text())
    model = Path(args.model)
    import torch

    torch.set_num_threads(args.threads)
    if args.variant.startswith("trl_"):
        out = run_trl(args, rows, model, work, lora=args.variant == "trl_lora")
    else:
        peft = "lora" if args.variant == "ours_lora" else "none"
        out = run_ours(args, work / "data.json", model, work, peft, chunked=args.variant != "ours_full_whole_logits")
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--gpu", action="store_true", help="one GPU in bf16 (both ways) instead of the CPU in fp32")
    parser.add_argument("--full", action="store_true", help="full fine-tuning: ours (chunked loss or not) vs TRL")
    add_common_arguments(parser)
    args = parser.parse_args()
    if args.variant:
        return child(args)

    work = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    rows = records(args.examples)
    (work / "data.json").write_text(json.dumps(rows, ensure_ascii=False))
    model = Path(args.pretrained) if args.pretrained else build_model(work / "model", args.hidden_size, args.layers)
    tokens = real_tokens(rows, model, args.max_length)
    variants = (
        ("ours_full", "ours_full_whole_logits", "trl_full") if args.full else ("ours_full", "ours_lora", "trl_lora")
    )
    results = run_children(__file__, variants, args.repeats, work, model, args, *(["--gpu"] if args.gpu else []))
    print(
        f"{len(rows)} examples ({tokens} real tokens), model {described(args)}, "
        f"batch {args.batch_size}, max length {args.max_length}, gradient checkpointing "
        f"{'on' if args.gradient_checkpointing else 'off'}, {args.repeats} repeats (median), "
        f"{'bf16 GPU' if args.gpu else 'fp32 CPU'}"
    )
    rate = {v: statistics.median(tokens / r["seconds"] for r in rs) for v, rs in results.items()}
    rss = {v: statistics.median(r["peak_rss_mib"] for r in rs) for v, rs in results.items()}
    grew = {v: statistics.median(r["peak_rss_mib"] - r["rss_at_start_mib"] for r in rs) for v, rs in results.items()}
    for v in variants:
        print(
            f"{v:22s} {rate[v]:9.0f} tokens/s   peak RSS {rss[v]:7.0f} MiB   of which during training "
            f"{grew[v]:6.0f} MiB"
        )
    if args.full:
        for v in ("ours_full", "ours_full_whole_logits"):
            print(
                f"{v} / TRL full: tokens/s {rate[v] / rate['trl_full']:.2f}, peak RSS {rss[v] / rss['trl_full']:.2f}, "
                f"growth in training {grew[v] / grew['trl_full']:.2f}"
            )
        return
    print(
        f"ours LoRA / ours full: tokens/s {rate['ours_lora'] / rate['ours_full']:.2f}, "
        f"peak RSS {rss['ours_lora'] / rss['ours_full']:.2f}"
    )
    print(
        f"ours LoRA / TRL LoRA:  tokens/s {rate['ours_lora'] / rate['trl_lora']:.2f}, "
        f"peak RSS {rss['ours_lora'] / rss['trl_lora']:.2f}"
    )


if __name__ == "__main__":
    main()
