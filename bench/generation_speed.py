"""Generation speed: our engine (gpt4llm.models.engine, behind generate, evaluate, bestofn and serve) against
transformers' ways to generate many answers, on the same model, prompts and lengths, greedy and sampled.

    python bench/generation_speed.py                                  # the tiny demo model, built locally
    python bench/generation_speed.py --model data/bench/smollm2-135m  # a real chat model (bench/smollm2.py makes it)
    python bench/generation_speed.py --before-src /path/to/old/src    # also today's serve and generate from an older
                                                                      # checkout, for the serve and whole-process rows

Contestants, each in a process of its own (peak memory is the process's):
- `engine`: gpt4llm.models.decoding.generate_completions (continuous batching, per-request seeds);
- `static`: `model.generate` on left-padded batches, longest prompts first (what gpt4llm did before the engine);
- `pipeline`: transformers' `pipeline("text-generation", batch_size=...)`;
- `continuous`: transformers' own continuous batching, `model.generate_batch` (paged cache).
Printed per contestant and mode: generated tokens (up to EOS), seconds of the generation call, generated tokens per
second, the ratio to the pipeline's, peak resident memory and its growth during generation, and for greedy decoding how
many answers equal `static`'s token for token. Then serve's time to first token for 16 concurrent streams (the
engine's server, and with --before-src the older one), and `python -m gpt4llm.generate` as a whole process.
Take the figures with nothing else running; the table printed is what README's "Generation speed" shows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
SAMPLED = {"do_sample": True, "temperature": 0.7, "top_p": 0.9}


# --- the workload ----------------------------------------------------------------------------------------------------
def prompts_for(model_dir: str, count: int) -> tuple[list[str], bool]:
    """`count` demo instructions rendered as the model is prompted (its own chat template, or Alpaca's), and whether
    the tokenizer adds its special tokens to them."""
    from gpt4llm.data.demo import make_demo_records
    from gpt4llm.data.tokenizer import load_tokenizer
    from gpt4llm.models import model_card
    from gpt4llm.models.hf import load_causal_lm

    records = make_demo_records(count, seed=3)
    tokenizer = load_tokenizer(model_dir, padding_side="left")
    fmt = model_card.prompt_format_of(load_causal_lm(model_dir, tokenizer), tokenizer).format
    return fmt.record_prompts(tokenizer, records), fmt.add_special_tokens


def memory() -> tuple[float, float]:
    """(resident, peak resident) MiB of this process."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


# --- one contestant, in its own process -----------------------------------------------------------------------------
def child(args) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    prompts, add_special = prompts_for(args.model, args.prompts)
    tokenizer = AutoTokenizer.from_pretrained(args.model, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    from gpt4llm.models.decoding import stop_ids

    stops = stop_ids(model, tokenizer)
    ids = [tokenizer(p, add_special_tokens=add_special)["input_ids"] for p in prompts]
    sampling = SAMPLED if args.mode == "sampled" else {"do_sample": False}
    run = {"engine": run_engine, "static": run_static, "pipeline": run_pipeline, "continuous": run_continuous}
    work = run[args.contestant]
    work(model, tokenizer, prompts[:2], ids[:2], stops, sampling, args, add_special)  # warm-up, not timed
    rss, _ = memory()
    torch.manual_seed(0)
    started = time.perf_counter()
    answers = work(model, tokenizer, prompts, ids, stops, sampling, args, add_special)
    seconds = time.perf_counter() - started
    _, peak = memory()
    print(json.dumps({"seconds": seconds, "answers": answers, "rss_before": rss, "peak": peak}))


def cut(tokens: list[int], stops: list[int]) -> list[int]:
    return next((tokens[:k] for k, t in enumerate(tokens) if t in stops), tokens)


def run_engine(model, tokenizer, prompts, ids, stops, sampling, args, add_special) -> list[list[int]]:
    from gpt4llm.models.decoding import generate_completions

    answers: list[list[int]] = [[] for _ in prompts]
    for [i], [[c]] in generate_completions(
        model, tokenizer, prompts, args.max_new_tokens, args.batch_size, add_special_tokens=add_special, **sampling
    ):
        answers[i] = list(c.token_ids)
    return answers


def run_static(model, tokenizer, prompts, ids, stops, sampling, args, add_special) -> list[list[int]]:
    import torch

    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    answers: list[list[int]] = [[] for _ in ids]
    for start in range(0, len(order), args.batch_size):
        rows = order[start : start + args.batch_size]
        batch = tokenizer.pad({"input_ids": [ids[i] for i in rows]}, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(
                **batch,
                max_new_tokens=args.max_new_tokens,
                eos_token_id=stops,
                pad_token_id=tokenizer.pad_token_id,
                **sampling,
            )
        for j, i in enumerate(rows):
            answers[i] = cut(out[j, batch["input_ids"].shape[1] :].tolist(), stops)
    return answers


def run_pipeline(model, tokenizer, prompts, ids, stops, sampling, args, add_special) -> list[list[int]]:
    from transformers import pipeline

    generator = pipeline("text-generation", model=model, tokenizer=tokenizer, device=model.device)
    outputs = generator(
        prompts,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        return_tensors=True,
        add_special_tokens=add_special,
        eos_token_id=stops,
        pad_token_id=tokenizer.pad_token_id,
        **sampling,
    )
    answers = []
    for out, prompt in zip(outputs, ids):
        sequence = out[0]["generated_token_ids"]
        start = next(k for k in range(len(sequence)) if sequence[k : k + len(prompt)] == prompt)  # after left pads
        answers.append(cut(sequence[start + len(prompt) :], stops))
    return answers


def run_continuous(model, tokenizer, prompts, ids, stops, sampling, args, add_special) -> list[list[int]]:
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        eos_token_id=stops,
        pad_token_id=tokenizer.pad_token_id,
        **sampling,
    )
    outputs = model.generate_batch(inputs=ids, generation_config=config, progress_bar=False)
    by_id = {out.request_id: out for out in outputs.values()}
    return [cut(list(by_id[f"req_{k}"].generated_tokens), stops) for k in range(len(ids))]


# --- serve: time to first token under concurrent streams --------------------------------------------------------------
def serve_child(args) -> None:
    """Starts gpt4llm's server on the model in this process (whichever gpt4llm is importable) and times the first
    streamed content of `args.streams` concurrent requests."""
    import openai
    import torch

    from gpt4llm.inference.server import load_server

    torch.set_num_threads(args.threads)
    server = load_server(args.model, name="bench").start()
    prompts = [f"Write a short story about the number {i}." for i in range(args.streams)]
    first: list[float] = [0.0] * len(prompts)
    total: list[float] = [0.0] * len(prompts)

    def ask(i: int) -> None:
        client = openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=600)
        started = time.perf_counter()
        stream = client.chat.completions.create(
            model="bench",
            messages=[{"role": "user", "content": prompts[i]}],
            max_tokens=args.max_new_tokens,
            temperature=0,
            stream=True,
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content and not first[i]:
                first[i] = time.perf_counter() - started
        total[i] = time.perf_counter() - started

    ask(0)  # warm-up
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    server.close()
    print(json.dumps({"ttft_median": statistics.median(first), "ttft_max": max(first), "total_max": max(total)}))


# --- the parent ------------------------------------------------------------------------------------------------------
def spawn(args, *extra: str, src: str | None = None) -> dict:
    env = dict(ENV, PYTHONPATH=src) if src else ENV
    command = [sys.executable, __file__, "--model", args.model, "--prompts", str(args.prompts)]
    command += ["--max-new-tokens", str(args.max_new_tokens), "--batch-size", str(args.batch_size)]
    command += ["--threads", str(args.threads), "--streams", str(args.streams), *extra]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def whole_generate(args, src: str | None) -> float:
    """Seconds of `python -m gpt4llm.generate` (load, generate, write) on the same prompts, as an eval file."""
    from gpt4llm.data.demo import make_demo_records

    with tempfile.TemporaryDirectory() as tmp:
        records = [
            {"instruction": r["instruction"], "input": r["input"], "output": r["output"]}
            for r in make_demo_records(args.prompts, seed=3)
        ]
        (Path(tmp) / "eval.json").write_text(json.dumps(records))
        env = dict(ENV, PYTHONPATH=src) if src else ENV
        command = [
            sys.executable,
            "-m",
            "gpt4llm.generate",
            f"model.path={args.model}",
            "eval=local",
            f"eval.path={tmp}/eval.json",
            f"decoding.max_new_tokens={args.max_new_tokens}",
            f"batch_size={args.batch_size}",
            f"hydra.run.dir={tmp}/run",
        ]
        started = time.perf_counter()
        done = subprocess.run(
            command, env=env | {"OMP_NUM_THREADS": str(args.threads)}, capture_output=True, text=True, cwd=tmp
        )
        if done.returncode != 0:
            raise SystemExit(f"gpt4llm.generate failed: {done.stderr[-2000:]}")
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a Hugging Face causal LM directory (default: the tiny demo model)")
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--streams", type=int, default=16, help="concurrent streams for serve's time to first token")
    parser.add_argument("--contestants", default="engine,static,pipeline,continuous")
    parser.add_argument("--modes", default="greedy,sampled")
    parser.add_argument("--before-src", help="an older checkout's src/ for serve's and generate's 'before' rows")
    parser.add_argument("--child", choices=["engine", "static", "pipeline", "continuous"], dest="contestant")
    parser.add_argument("--mode", default="greedy")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve_child(args)
    if args.contestant:
        return child(args)
    if args.model is None:
        from gpt4llm.models.tiny import build_tiny_model

        args.model = str(Path(tempfile.mkdtemp()) / "tiny")
        build_tiny_model(args.model)
    print(
        f"model {args.model}; {args.prompts} prompts, max_new_tokens {args.max_new_tokens}, batch {args.batch_size}, "
        f"{args.threads} threads"
    )
    print("| mode | contestant | tokens | seconds | tokens/s | vs pipeline | peak MiB (+ during) | greedy = static |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for mode in args.modes.split(","):
        results = {c: spawn(args, "--child", c, "--mode", mode) for c in args.contestants.split(",")}
        base = results.get("pipeline", {})
        base_rate = sum(map(len, base["answers"])) / base["seconds"] if "answers" in base else None
        for name, r in results.items():
            if "error" in r:
                print(f"| {mode} | {name} | failed: {r['error']} | | | | | |")
                continue
            tokens = sum(map(len, r["answers"]))
            rate = tokens / r["seconds"]
            ratio = f"{rate / base_rate:.2f}x" if base_rate else ""
            same = ""
            if mode == "greedy" and "answers" in results.get("static", {}):
                same = f"{sum(a == b for a, b in zip(r['answers'], results['static']['answers']))}/{args.prompts}"
            print(
                f"| {mode} | {name} | {tokens} | {r['seconds']:.2f} | {rate:.1f} | {ratio} | "
                f"{r['peak']:.0f} (+{r['peak'] - r['rss_before']:.0f}) | {same} |"
            )
    print(f"\nserve, {args.streams} concurrent streams, greedy, max_tokens {args.max_new_tokens}:")
    for label, src in [("engine (this checkout)", None), ("before (--before-src)", args.before_src)]:
        if label.startswith("before") and not src:
            continue
        r = spawn(args, "--serve", src=src)
        if "error" in r:
            print(f"  {label}: failed: {r['error']}")
        else:
            print(
                f"  {label}: time to first token median {r['ttft_median']:.2f} s, max {r['ttft_max']:.2f} s; "
                f"last stream done {r['total_max']:.2f} s"
            )
    print("\npython -m gpt4llm.generate, whole process:")
    print(f"  this checkout: {whole_generate(args, None):.1f} s")
    if args.before_src:
        print(f"  before (--before-src): {whole_generate(args, args.before_src):.1f} s")


if __name__ == "__main__":
    main()
