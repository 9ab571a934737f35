"""Our full SFT against stanford_alpaca's own train.py and TRL's SFTTrainer, the whole process each way (what a user
waits for), in one command. Issue 36's goal: at least 2x stanford_alpaca's speed, and ahead of TRL's.

    git clone https://github.com/tatsu-lab/stanford_alpaca <dir>
    python -m venv --system-site-packages <venv>
    <venv>/bin/pip install "transformers==4.46.3" "openai==0.28.1" "datasets==3.6.0"
    python bench/sft_whole_process.py --stanford-dir <dir> --stanford-python <venv>/bin/python --pretrained <model dir>

stanford_alpaca's train.py runs unmodified, as its README runs it (without FSDP: one CPU process): its Trainer gets
`tokenizer=`, which transformers 5 no longer takes, and its utils.py imports openai 0.x's `openai_object`, so it runs
in its own Python with transformers 4.46, openai 0.28 and a datasets release of their time (`--stanford-python`).
It loads the tokenizer with `use_fast=False`: the model directory is copied for it with the tokenizer saved as
transformers 4.46's slow GPT-2 tokenizer (vocab.json, merges.txt) and `rope_theta` written where transformers 5
writes `rope_parameters`.

The same examples (the 1k GPT-4 sample in ../shared/data, else the demo records), one epoch, batch 4, max length 512,
lr 2e-5, cosine with 3% warm-up, no weight decay, fp32 on the CPU, no gradient checkpointing (stanford's default),
every process writing its final model (stanford and TRL: `trainer.save_model`; ours: the verified export). Each way
runs in its own process, rotating which goes first, median of --repeats. Printed: the whole process's seconds (launch to
exit), its peak resident memory (the kernel's count for the process: wait4's ru_maxrss), and the ratios.

    stanford   <stanford python> train.py --model_name_or_path ... --per_device_train_batch_size 4 --use_cpu ...
    TRL        trl.SFTTrainer(SFTConfig(...)): the Alpaca prompt and the answer as prompt-completion pairs, the loss on
               the answer, padded batches (its default), this Python
    ours       python -m gpt4llm.train model=hf data=local ... (its defaults: packed rows, chunked loss)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lora_speed import records  # noqa: E402  (the same examples as the other SFT benchmarks)

# Run by the stanford Python: the model directory as transformers 4.46 reads it with use_fast=False
PEER_COPY = """
import json, sys
from pathlib import Path
from transformers import GPT2TokenizerFast
source, target = Path(sys.argv[1]), Path(sys.argv[2])
special = json.loads((source / "tokenizer_config.json").read_text())
keys = ("bos_token", "eos_token", "unk_token", "pad_token")
fast = GPT2TokenizerFast(tokenizer_file=str(source / "tokenizer.json"), **{k: special[k] for k in keys if k in special})
fast.save_pretrained(target)
config = json.loads((source / "config.json").read_text())
config.update(config.pop("rope_parameters", None) or {})
config["torch_dtype"] = config.pop("dtype", "float32")
(target / "config.json").write_text(json.dumps(config, indent=1))
tokenizer_config = json.loads((target / "tokenizer_config.json").read_text())
tokenizer_config["tokenizer_class"] = "GPT2Tokenizer"
(target / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=1))
"""


# Run by this Python: TRL's SFTTrainer on the same records and settings, as its documentation runs it
TRL_RUN = """
import json, sys
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer
from gpt4llm.data.prompts import format_prompt
model, data, out, batch, lr, max_length = sys.argv[1:7]
rows = json.loads(open(data).read())
dataset = Dataset.from_list(
    [{"prompt": format_prompt(r["instruction"], r["input"]), "completion": r["output"]} for r in rows]
)
config = SFTConfig(
    output_dir=out, per_device_train_batch_size=int(batch), num_train_epochs=1, learning_rate=float(lr),
    lr_scheduler_type="cosine", warmup_steps=0.03, weight_decay=0.0, max_length=int(max_length), report_to="none",
    save_strategy="no", logging_steps=1, use_cpu=True, completion_only_loss=True, gradient_checkpointing=False,
    dataloader_num_workers=0, seed=42,
)
trainer = SFTTrainer(
    model=AutoModelForCausalLM.from_pretrained(model), args=config, train_dataset=dataset,
    processing_class=AutoTokenizer.from_pretrained(model),
)
trainer.train()
trainer.save_model(out)
"""


def timed(command: list[str], cwd: Path, env: dict[str, str], log: Path) -> dict:
    """The command's wall seconds and its peak resident memory, as the kernel counted it for the process (its
    `ru_maxrss` from wait4: exact, and nothing sampling the process while it runs). Every way here runs its data
    loading in its own process (no loader workers), so that process is all of it."""
    started = time.perf_counter()
    with log.open("w") as sink:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=sink, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    process.returncode = code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{command[:3]} failed (exit {code}); its output: {log}")
    return {"seconds": seconds, "peak_mib": usage.ru_maxrss / 1024}


def stanford_command(args, model: Path, data: Path, out: Path) -> list[str]:
    return [
        args.stanford_python,
        str(Path(args.stanford_dir) / "train.py"),
        f"--model_name_or_path={model}",
        f"--data_path={data}",
        f"--output_dir={out}",
        "--num_train_epochs=1",
        f"--per_device_train_batch_size={args.batch_size}",
        f"--learning_rate={args.lr}",
        "--weight_decay=0.0",
        "--warmup_ratio=0.03",
        "--lr_scheduler_type=cosine",
        "--logging_steps=1",
        "--save_strategy=no",
        "--report_to=none",
        "--use_cpu",
        f"--model_max_length={args.max_length}",
        "--dataloader_num_workers=0",
    ]


def our_command(args, model: Path, data: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "gpt4llm.train",
        "model=hf",
        f"model.path={model}",
        f"model.max_length={args.max_length}",
        "model.gradient_checkpointing=false",
        "model.attn_implementation=sdpa_varlen",  # packs (a LLaMA-architecture model)
        "data=local",
        f"data.path={data}",
        "data.template=alpaca",  # the paper's prompt, as stanford and TRL have it here (auto: the chat template)
        "data.val_size=0",
        f"data.batch_size={args.batch_size}",
        "trainer.max_epochs=1",
        f"task.optimizer.lr={args.lr}",
        "validate_first=false",
        f"hydra.run.dir={out}",
        f"paths.data_dir={out / 'data'}",  # its own: no repeat reads a tokenized cache the peers do not have
        "data.num_workers=0",  # as the peers' loaders here
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stanford-dir", required=True, help="a clone of github.com/tatsu-lab/stanford_alpaca")
    parser.add_argument("--stanford-python", required=True, help="a Python with transformers 4.46 and openai 0.28")
    parser.add_argument("--pretrained", required=True, help="a local causal LM directory (bench/smollm2.py makes one)")
    parser.add_argument("--examples", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="stanford-bench-"))
    data = work / "data.json"
    data.write_text(json.dumps(records(args.examples), ensure_ascii=False))
    peer_model = work / "model-for-stanford"
    shutil.copytree(args.pretrained, peer_model)
    subprocess.run([args.stanford_python, "-c", PEER_COPY, args.pretrained, str(peer_model)], check=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", WANDB_DISABLED="true")
    stanford_env = dict(env, PYTHONPATH=str(Path(args.stanford_dir)))

    ways = ("stanford", "trl", "ours")
    results: dict[str, list[dict]] = {way: [] for way in ways}
    for repeat in range(args.repeats):
        order = ways[repeat % 3 :] + ways[: repeat % 3]  # each way first once in three repeats
        for way in order:
            out = work / f"{way}-{repeat}"
            if way == "stanford":
                command, run_env = stanford_command(args, peer_model, data, out), stanford_env
            elif way == "trl":
                trl_args = [
                    args.pretrained,
                    str(data),
                    str(out),
                    str(args.batch_size),
                    str(args.lr),
                    str(args.max_length),
                ]
                command, run_env = [sys.executable, "-c", TRL_RUN, *trl_args], env
            else:
                command, run_env = our_command(args, Path(args.pretrained), data, out), env
            result = timed(command, work, run_env, work / f"{way}-{repeat}.log")
            results[way].append(result)
            print(f"repeat {repeat} {way:8s} {result['seconds']:7.1f} s  peak {result['peak_mib']:6.0f} MiB (RSS)")

    seconds = {w: statistics.median(r["seconds"] for r in rs) for w, rs in results.items()}
    peaks = {w: statistics.median(r["peak_mib"] for r in rs) for w, rs in results.items()}
    print(
        f"\n{args.examples} examples, batch {args.batch_size}, max length {args.max_length}, one epoch, fp32 CPU, "
        f"median of {args.repeats} (rotating order); model {args.pretrained}"
    )
    print("| whole process | seconds | peak RSS |")
    print("|---|---:|---:|")
    for way in ways:
        print(f"| {way} | {seconds[way]:.1f} | {peaks[way]:.0f} MiB |")
    for peer, name in (("stanford", "stanford_alpaca's"), ("trl", "TRL's")):
        print(
            f"ours: {seconds[peer] / seconds['ours']:.2f}x {name} speed (whole process), "
            f"{peaks['ours'] / peaks[peer]:.2f}x its peak memory"
        )
    print(f"Logs: {work}")


if __name__ == "__main__":
    main()
