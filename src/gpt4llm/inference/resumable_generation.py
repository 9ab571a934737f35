"""`generate_to_file`, the form behind `python -m gpt4llm.generate`: it appends one JSON line per record as it is
answered and, run again on the same file, skips the ids already there, so a killed run loses only the answers in
progress. The decoding itself: gpt4llm.models.decoding.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from gpt4llm.data.formats import PromptFormat
from gpt4llm.errors import RecordError
from gpt4llm.io.json_files import read_json_records, write_jsonl
from gpt4llm.models import model_card
from gpt4llm.models.decoding import generate_completions
from gpt4llm.models.vllm_engine import is_vllm

log = logging.getLogger(__name__)


def generate_to_file(
    model,
    tokenizer,
    records: list[dict[str, Any]],
    path: str | Path,
    decoding: dict[str, Any],
    batch_size: int = 16,
    extra: dict[str, Any] | None = None,
    progress: str | None = "Generating",
    prompt_format: PromptFormat | None = None,
    seed: int = 0,
) -> dict[str, int]:
    """Appends a JSON line per record to `path`: the record's fields (`id`, `instruction`, `input`, and `category`,
    `reference` where it has them), `prompt`, `response` (`responses` too when decoding.num_samples > 1),
    `finish_reason`, `num_tokens`, `decoding`, and `extra` (e.g. the model's name).

    `decoding`: max_new_tokens, num_samples, do_sample, and temperature / top_p when sampling. Ids already in the
    file are skipped; a file written with other decoding settings is refused rather than mixed. Sampling is seeded
    per record (its id and `seed`), so a resumed run writes what an unbroken one would have. A prompt longer than the
    model's context gets an empty response with finish_reason `prompt_too_long`, counted.
    """
    path = Path(path)
    if is_vllm(model):  # its answers are not the HF engine's where it samples: one file holds one engine's
        decoding = decoding | {"engine": "vllm"}
    done = read_done_ids(path, decoding)
    todo = [r for r in records if str(r["id"]) not in done]
    counts = {
        "records": len(records),
        "already_done": len(records) - len(todo),
        "generated": 0,
        "empty": 0,
        "cut_by_length": 0,
        "prompt_too_long": 0,
    }
    if not todo:
        return counts
    sampling = {
        k: decoding[k] for k in ("temperature", "top_p", "top_k") if decoding.get("do_sample") and k in decoding
    }
    fmt = prompt_format or model_card.prompt_format_of(model, tokenizer).format  # the prompt it was trained with
    if all("messages" in r for r in todo):  # conversations (MT-Bench's second turn): rendered as a chat request
        prompts = [fmt.chat_prompt(tokenizer, r["messages"]) for r in todo]
    else:
        prompts = fmt.record_prompts(tokenizer, todo)
    path.parent.mkdir(parents=True, exist_ok=True)
    too_long: list[str] = []
    with open(path, "a", encoding="utf-8") as f:
        for rows, completions in generate_completions(
            model,
            tokenizer,
            prompts,
            decoding["max_new_tokens"],
            batch_size,
            decoding.get("num_samples", 1),
            progress=progress,
            add_special_tokens=fmt.add_special_tokens,
            do_sample=bool(decoding.get("do_sample")),
            seed=seed,
            keys=[str(r["id"]) for r in todo],
            **sampling,
        ):
            for i, samples in zip(rows, completions):
                first = samples[0]
                line = (
                    dict(todo[i])
                    | (extra or {})
                    | {
                        "prompt": prompts[i],
                        "response": first.text,
                        "finish_reason": first.finish_reason,
                        "num_tokens": first.num_tokens,
                        "decoding": decoding,
                    }
                )
                if len(samples) > 1:
                    line["responses"] = [s.text for s in samples]
                    line["finish_reasons"] = [s.finish_reason for s in samples]
                    line["num_tokens_all"] = [s.num_tokens for s in samples]
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
                counts["generated"] += 1
                counts["empty"] += not first.text.strip()
                counts["cut_by_length"] += first.finish_reason == "length"
                if first.finish_reason == "prompt_too_long":
                    too_long.append(str(todo[i]["id"]))
            f.flush()  # an answer on disk is one a rerun will not redo
            os.fsync(f.fileno())
    counts["prompt_too_long"] = len(too_long)
    if too_long:
        log.warning(
            f"{path}: {len(too_long)} prompts longer than the model's context, answered empty with finish_reason "
            f"prompt_too_long: ids {', '.join(too_long[:10])}{' ...' if len(too_long) > 10 else ''}"
        )
    return counts


def read_done_ids(path: Path, decoding: dict[str, Any]) -> set[str]:
    """Ids of the complete lines in `path`. A last line torn by a kill is cut off, so the next append starts clean."""
    if not path.exists():
        return set()
    done, good_bytes = set(), 0
    with open(path, "rb") as f:
        lines = f.readlines()
    for lineno, raw in enumerate(lines, start=1):
        try:
            line = json.loads(raw) if raw.endswith(b"\n") else None
        except json.JSONDecodeError:
            line = None
        if not isinstance(line, dict) or "id" not in line:
            if lineno == len(lines):
                break  # torn by a kill mid-write: dropped, and generated again
            raise RecordError(f"{path}: line {lineno} is not a JSON object with an 'id'; fix or remove it to resume")
        if line.get("decoding") != decoding:
            raise RecordError(
                f"{path}: line {lineno} was generated with decoding={line.get('decoding')}, this run asks for "
                f"{decoding}. Write to another file instead of mixing them (generate: output=...; the benchmarks of "
                "evaluate: answers_dir=... or model.name=...), or delete this one."
            )
        done.add(str(line["id"]))
        good_bytes += len(raw)
    if good_bytes < path.stat().st_size:
        with open(path, "rb+") as f:
            f.truncate(good_bytes)
    return done


def load_generator(
    path: str,
    dtype: str | None = None,
    device: str | None = None,
    tokenizer_backend: str = "auto",
    engine: str = "hf",
    seed: int = 0,
):
    """(model, tokenizer, prompt format) of an export, ready to answer: the tokenizer left-padded, the model on
    `device` (cuda when there is one), the prompt format the model card says it was trained with. engine=vllm: the
    model loaded by vLLM on the GPU instead (models.vllm_engine), which the commands' decoding then runs through."""
    import torch

    from gpt4llm.data.tokenizer import load_tokenizer
    from gpt4llm.models.hf import load_causal_lm
    from gpt4llm.models.vllm_engine import VLLMModel, check_engine

    check_engine(engine, device)
    tokenizer = load_tokenizer(path, padding_side="left", backend=tokenizer_backend)
    if engine == "vllm":
        model = VLLMModel(path, tokenizer, dtype, seed)
    else:
        model = load_causal_lm(path, tokenizer, dtype=dtype)
        model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    served = model_card.prompt_format_of(model, tokenizer)
    log.info(f"Prompt format: {served.why}")
    return model, tokenizer, served.format


def answer_turns(
    model,
    tokenizer,
    fmt: PromptFormat,
    questions: list[dict],
    out_dir: Path,
    decoding: dict,
    batch_size: int,
    seed: int,
    name: str,
    progress: str,
) -> Path:
    """Multi-turn answers (MT-Bench): turn k is asked after the questions and the model's own answers of the turns
    before it, rendered in the model's template. Each turn is its own resumable file (turn1.jsonl, ...), so a killed
    run loses only the answers in progress; the merged answers go to `out_dir`/answers.jsonl
    ({"id", "model", "category", "questions", "turns"})."""
    out_dir = Path(out_dir)
    answers: dict[str, list[str]] = {str(q["question_id"]): [] for q in questions}
    for turn in range(1, max(len(q["turns"]) for q in questions) + 1):
        records = []
        for q in questions:
            if len(q["turns"]) < turn:
                continue
            qid = str(q["question_id"])
            messages = []
            for before, answer in zip(q["turns"][: turn - 1], answers[qid]):
                messages += [{"role": "user", "content": before}, {"role": "assistant", "content": answer}]
            messages.append({"role": "user", "content": q["turns"][turn - 1]})
            records.append({"id": qid, "category": q["category"], "messages": messages})
        path = out_dir / f"turn{turn}.jsonl"
        generate_to_file(
            model,
            tokenizer,
            records,
            path,
            decoding,
            batch_size,
            extra={"model": name, "turn": turn},
            progress=f"{progress} turn {turn}",
            prompt_format=fmt,
            seed=seed,
        )
        asked = {r["id"]: r["messages"] for r in records}
        for line in read_json_records(path):
            qid = str(line["id"])
            if qid not in asked:
                continue  # a question no longer in the set
            if line.get("messages") != asked[qid]:  # another question text, or answers of an earlier turn redone
                raise RecordError(
                    f"{path}: the answer to {qid} was asked another question than this run asks (the questions "
                    f"changed?); delete {out_dir} to answer again"
                )
            answers[qid].append(line["response"])
    merged = [
        {
            "id": q["question_id"],
            "model": name,
            "category": q["category"],
            "questions": q["turns"],
            "turns": answers[str(q["question_id"])],
        }
        for q in questions
    ]
    target = out_dir / "answers.jsonl"
    write_jsonl(target, merged)
    return target
