"""GPU check of engine=vllm against the HF engine: `python -m gpt4llm.generate` on the Vicuna questions both ways, the
same model and greedy settings, each a process of its own; printed: how many answers are equal (text, and the number
of tokens), the first answers that differ, and generated tokens per second of each whole process (loading included:
vLLM's start-up, its CUDA graphs, counts against it).

    pip install 'gpt4llm[vllm]'      # vLLM's CUDA wheel (in an environment of its own if its pins clash with ours)
    python bench/vllm_check.py --model <export or HF model dir> [--questions FILE] [--dtype bfloat16]

NOT YET RUN: vLLM's wheel (239 MB, pinning its own torch) cannot reach the GPU machines this project has been lent,
and it has no CPU wheel on PyPI. In fp32 the two engines should agree on (nearly) every answer; in bf16, batch
composition changes low-order bits and so, sometimes, a token.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ROOT.parent / "shared" / "data" / "gpt4llm_plots" / "vicuna_question_80.jsonl"


def generate(engine: str, args, logs: Path) -> tuple[list[dict], float]:
    command = [
        sys.executable,
        "-m",
        "gpt4llm.generate",
        f"model.path={args.model}",
        "model.name=check",
        f"engine={engine}",
        "eval=vicuna80",
        f"eval.path={args.questions}",
        f"decoding.max_new_tokens={args.max_new_tokens}",
        f"batch_size={args.batch_size}",
        f"paths.log_dir={logs / engine}",
    ] + ([f"model.dtype={args.dtype}"] if args.dtype else [])
    start = time.perf_counter()
    subprocess.run(command, check=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    seconds = time.perf_counter() - start
    [path] = (logs / engine).rglob("responses.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()], seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--questions", default=str(QUESTIONS))
    parser.add_argument("--dtype", default=None, help="model.dtype both ways (default: as saved)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vllm-check-") as tmp:
        runs = {engine: generate(engine, args, Path(tmp)) for engine in ("hf", "vllm")}
    (hf, hf_s), (vllm, vllm_s) = runs["hf"], runs["vllm"]
    by_id = {line["id"]: line for line in vllm}
    same = [line["id"] for line in hf if by_id[line["id"]]["response"] == line["response"]]
    print(f"greedy answers equal: {len(same)} of {len(hf)}")
    for line in [line for line in hf if line["id"] not in same][:3]:
        other = by_id[line["id"]]
        print(f"  id {line['id']}: hf {line['response'][:80]!r}... vs vllm {other['response'][:80]!r}...")
    for name, lines, seconds in (("hf", hf, hf_s), ("vllm", vllm, vllm_s)):
        tokens = sum(line["num_tokens"] for line in lines)
        print(f"{name:5s} {tokens} tokens in {seconds:.1f} s (whole process): {tokens / seconds:.1f} tokens/s")


if __name__ == "__main__":
    main()
