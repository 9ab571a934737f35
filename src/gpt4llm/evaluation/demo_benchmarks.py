"""Stand-ins for the judge benchmarks' files, made from the demo tasks, for the tiny study (`reproduce preset=tiny`):
each in its benchmark's layout (FastChat's question, judge-prompt and reference files; AlpacaEval's prompt template,
baseline outputs and df_gamed.csv; Arena-Hard's questions, baseline answers and judge config), with our own short
texts, so that the benchmarks' stages run offline end to end. Their numbers mean nothing; the real files are
downloads (conf/metric/*.yaml).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import yaml

from gpt4llm.evaluation.eval_sets import demo_eval_records

SINGLE = "Rate the answer from 1 to 10, written as [[rating]]."
MT_BENCH_PROMPTS = [  # FastChat's four single-answer prompts: the names and placeholders its code asks for
    ("single-v1", "[Question]\n{question}\n\n[Answer]\n{answer}\n\n" + SINGLE),
    ("single-math-v1", "[Question]\n{question}\n\n[Reference]\n{ref_answer_1}\n\n[Answer]\n{answer}\n\n" + SINGLE),
    ("single-v1-multi-turn", "{question_1}\n{answer_1}\n{question_2}\n[Answer]\n{answer_2}\n\n" + SINGLE),
    (
        "single-math-v1-multi-turn",
        "{question_1}\n{answer_1}\n{question_2}\n[Answer]\n{answer_2}\n[Reference]\n{ref_answer_1}\n{ref_answer_2}\n\n"
        + SINGLE,
    ),
]
ALPACA_EVAL_PROMPT = (
    "<|im_start|>system\nPick the better output: answer m or M.\n<|im_end|>\n<|im_start|>user\n"
    '{instruction}\n\nm: """{output_1}"""\n\nM: """{output_2}"""\n<|im_end|>'
)
ARENA_SYSTEM = "Compare assistant A and B. End with one verdict: [[A>>B]], [[A>B]], [[A=B]], [[B>A]] or [[B>>A]]."
ARENA_TEMPLATE = "<|User Prompt|>\n{question_1}\n\n<|A|>\n{answer_1}\n\n<|B|>\n{answer_2}"
SECOND_TURN = "Say it again, more briefly."


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def write_demo_benchmark_files(directory: Path, num_questions: int = 8, after: int = 4400) -> dict[str, list[str]]:
    """Writes the stand-ins under `directory` (the same bytes every time) and returns, per metric, the overrides that
    point `evaluate` at them."""
    directory.mkdir(parents=True, exist_ok=True)
    records = demo_eval_records(num_records=num_questions, after=after)
    out: dict[str, list[str]] = {}

    mt = directory / "mt_bench"
    mt.mkdir(exist_ok=True)
    questions = [
        {"question_id": 81 + i, "category": "math" if i % 2 else "writing", "turns": [r["instruction"], SECOND_TURN]}
        for i, r in enumerate(records)
    ]
    prompts = [
        {"name": name, "type": "single", "system_prompt": "You are a helpful assistant.", "prompt_template": text}
        | {"description": "demo stand-in", "category": "math" if "math" in name else "general"}
        | {"output_format": "[[rating]]"}
        for name, text in MT_BENCH_PROMPTS
    ]
    references = [
        {"question_id": q["question_id"], "model_id": "gpt-4", "choices": [{"index": 0, "turns": [r["reference"]] * 2}]}
        for q, r in zip(questions, records)
        if q["category"] == "math"
    ]
    out["mt_bench"] = [
        f"metric.files.questions.path={_jsonl(mt / 'question.jsonl', questions)}",
        f"metric.files.judge_prompts.path={_jsonl(mt / 'judge_prompts.jsonl', prompts)}",
        f"metric.files.reference_answers.path={_jsonl(mt / 'gpt-4.jsonl', references)}",
    ]

    ae = directory / "alpaca_eval"
    ae.mkdir(exist_ok=True)
    (ae / "prompt.txt").write_text(ALPACA_EVAL_PROMPT, encoding="utf-8")
    baseline = [
        {"dataset": "demo", "instruction": r["instruction"], "output": r["reference"], "generator": "demo_reference"}
        for r in records
    ]
    (ae / "baseline_outputs.json").write_text(json.dumps(baseline, ensure_ascii=False, indent=1), encoding="utf-8")
    rng = random.Random(0)  # df_gamed.csv's columns: two gamed baselines' preferences on every instruction
    lines = ["model,preference,index,instruction_difficulty,not_gamed_baseline,std_delta_len"]
    difficulty = [round(rng.gauss(0, 1), 6) for _ in records]
    for model, sign in (("demo_gamed_concise", 1), ("demo_gamed_verbose", -1)):
        for i in range(len(records)):
            preference, delta = round(rng.uniform(0.1, 0.9), 6), round(sign * abs(rng.gauss(1, 0.5)), 6)
            lines.append(f"{model},{preference},{i},{difficulty[i]},False,{delta}")
    (ae / "df_gamed.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out["alpaca_eval"] = [
        f"metric.files.prompt.path={ae / 'prompt.txt'}",
        f"metric.files.baseline_outputs.path={ae / 'baseline_outputs.json'}",
        f"metric.files.gamed.path={ae / 'df_gamed.csv'}",
    ]

    ah = directory / "arena_hard"
    ah.mkdir(exist_ok=True)
    ids = [f"demo{i}" for i in range(len(records))]
    config = {"judge_model": "demo", "temperature": 0, "max_tokens": 64, "regex_pattern": r"\[\[([AB<>=]+)\]\]"}
    config |= {"number_of_judgment_attempts": 2, "system_prompt": ARENA_SYSTEM, "prompt_template": [ARENA_TEMPLATE]}
    (ah / "judge_config.yaml").write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    answers = [
        {
            "question_id": q,
            "model_id": "demo_reference",
            "choices": [{"index": 0, "turns": [{"content": r["reference"]}]}],
        }
        for q, r in zip(ids, records)
    ]
    questions = [
        {"question_id": q, "category": "demo", "cluster": r["category"], "turns": [{"content": r["instruction"]}]}
        for q, r in zip(ids, records)
    ]
    out["arena_hard"] = [
        f"metric.files.questions.path={_jsonl(ah / 'question.jsonl', questions)}",
        f"metric.files.baseline_answers.path={_jsonl(ah / 'baseline.jsonl', answers)}",
        f"metric.files.judge_config.path={ah / 'judge_config.yaml'}",
        "metric.baseline=demo_reference",
    ]
    return out
