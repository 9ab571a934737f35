"""Tokenizing 52K records for SFT through a chat template against the paper's Alpaca path, one run, same tokenizer.

    python bench/chat_tokenize_speed.py                       # ../shared/data's 1k GPT-4 sample, repeated to 52K
    python bench/chat_tokenize_speed.py --template llama3 --tokenizer-dir /models/Meta-Llama-3-8B-Instruct

Both run gpt4llm.data.cache.tokenize_rows (batched, every core from 20K records): the Alpaca path with
the Alpaca format's tokenize_examples on Alpaca records, the chat format's (data.formats) on the same records as
conversations (user: instruction and input; assistant: output), rendered by --template. The tokenizer is
the tiny model's byte-level BPE unless --tokenizer-dir names a fast one. Printed: seconds each, median of --repeats,
and the ratio chat / Alpaca (the goal: within 2).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from gpt4llm.data.cache import tokenize_rows
from gpt4llm.data.conversations import read_conversation
from gpt4llm.data.demo import make_demo_records
from gpt4llm.data.formats import prompt_format
from gpt4llm.data.tokenizer import load_tokenizer
from gpt4llm.models.tiny import build_tiny_model

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer-dir", type=Path, default=None)
    parser.add_argument("--data", type=Path, default=SHARED / "alpaca_gpt4_sample_1k.json")
    parser.add_argument("--template", default="chatml")
    parser.add_argument("--records", type=int, default=52002)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    raw = json.loads(args.data.read_text()) if args.data.exists() else make_demo_records(1000)
    sample = [{k: r.get(k, "") for k in ("instruction", "input", "output")} for r in raw]
    alpaca = (sample * (args.records // len(sample) + 1))[: args.records]
    chats = [{"messages": read_conversation(r).messages} for r in alpaca]
    directory = args.tokenizer_dir or build_tiny_model(Path(tempfile.mkdtemp()) / "tiny")
    tokenizer = load_tokenizer(str(directory), backend="tokenizers")
    chat_tokenizer = load_tokenizer(str(directory), backend="tokenizers")
    alpaca_format, chat_format = prompt_format("alpaca"), prompt_format(args.template)
    chat_format.prepare_tokenizer(chat_tokenizer, str(directory))
    runs = {
        "alpaca": lambda: tokenize_rows(alpaca, alpaca_format.tokenize_examples, tokenizer, args.max_length, args.data),
        f"chat ({args.template})": lambda: tokenize_rows(
            chats, chat_format.tokenize_examples, chat_tokenizer, args.max_length, args.data
        ),
    }
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(s) for name, s in seconds.items()}
    print(f"{len(alpaca)} records of {args.data.name}, tokenizer {directory}, max length {args.max_length}")
    for name, median in medians.items():
        print(f"{name:20s} {median:7.1f} s  ({', '.join(f'{s:.1f}' for s in seconds[name])})")
    names = list(medians)
    print(f"ratio {names[1]} / {names[0]}: {medians[names[1]] / medians[names[0]]:.2f}")


if __name__ == "__main__":
    main()
