"""Tokenizing a 52K-record file for SFT: SentencePiece's ids (our default for LLaMA) against transformers 5's converted
`LlamaTokenizer` (what `AutoTokenizer` gives for a LLaMA directory), the same data pipeline, one run.

    python bench/tokenize_speed.py                                    # ../shared/data's LLaMA tokenizer and 1k sample
    python bench/tokenize_speed.py --tokenizer-dir /models/llama-7b --data alpaca_gpt4_data.json --records 52002

Both go through gpt4llm.data.cache.tokenize_rows (batched, every core from 20K records) with the SFT tokenize
function; the sample is repeated up to --records. Printed: seconds per backend and their ratio, median of --repeats,
and how many records got other ids than SentencePiece's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from transformers import LlamaTokenizer

from gpt4llm.data.cache import tokenize_rows
from gpt4llm.data.formats import prompt_format
from gpt4llm.data.tokenizer import PAD_TOKEN, load_tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer-dir", type=Path, default=SHARED / "llama_tokenizer")
    parser.add_argument("--data", type=Path, default=SHARED / "alpaca_gpt4_sample_1k.json")
    parser.add_argument("--records", type=int, default=52002)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    sample = [{k: r.get(k, "") for k in ("instruction", "input", "output")} for r in json.loads(args.data.read_text())]
    rows = (sample * (args.records // len(sample) + 1))[: args.records]
    converted = LlamaTokenizer.from_pretrained(str(args.tokenizer_dir), add_bos_token=True)
    converted.add_special_tokens({"pad_token": PAD_TOKEN})
    tokenizers = {"converted (tokenizers)": converted, "sentencepiece": load_tokenizer(str(args.tokenizer_dir))}
    seconds = {name: [] for name in tokenizers}
    ids = {}
    for _ in range(args.repeats):
        for name, tokenizer in tokenizers.items():
            start = time.perf_counter()
            ids[name] = tokenize_rows(rows, prompt_format().tokenize_examples, tokenizer, 512, args.data)["input_ids"]
            seconds[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(s) for name, s in seconds.items()}
    for name, median in medians.items():
        print(f"{name:24s} {median:7.1f} s  ({', '.join(f'{s:.1f}' for s in seconds[name])})")
    print(f"ratio sentencepiece / converted: {medians['sentencepiece'] / medians['converted (tokenizers)']:.2f}")
    differ = sum(a != b for a, b in zip(ids["converted (tokenizers)"], ids["sentencepiece"]))
    print(f"records whose ids differ: {differ} of {len(rows)}")


if __name__ == "__main__":
    main()
