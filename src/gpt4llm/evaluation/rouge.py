"""ROUGE-1/2/L of responses against references, by reference length, as the paper's Unnatural Instructions table.

Scores are rouge-score's (the package the paper used): `RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer)`,
the F-measure of each (reference, response) pair, averaged over the pairs of a bucket. GPT-4-LLM never released its
scoring code, so `use_stemmer` is unverified; True is what Super-NaturalInstructions' evaluation uses for English
(Unnatural Instructions reported that metric), and the config can turn it off. The length unit is words of the
reference (`len(reference.split())`): with it the paper's buckets hold 5,089 / 868 / 936 / 2,107 of 9,000.

rouge-score's default tokenizer keeps only [a-z0-9] runs, so a reference in, say, Chinese has no tokens and every
response scores 0 against it; such pairs are counted and reported, not hidden.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from gpt4llm.errors import RecordError
from gpt4llm.io import json_files

# (label in the files, smallest and largest reference length in words). The labels are those of the original files;
# its 6-10 file says "5-10" in the Length field, a typo in the original (its counts are of 6-10 words).
BUCKETS = (("0-2", 0, 2), ("3-5", 3, 5), ("6-10", 6, 10), ("10-", 11, None))
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def length_bucket(reference: str) -> str:
    n = len(reference.split())
    return next(label for label, low, high in BUCKETS if n >= low and (high is None or n <= high))


def score_pairs(pairs: list[tuple[str, str]], use_stemmer: bool = True) -> list[dict[str, float]]:
    """rouge1/2/L F-measure of each (reference, response) pair."""
    from rouge_score.rouge_scorer import RougeScorer

    scorer = RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)
    return [
        {name: s.fmeasure for name, s in scorer.score(reference, response).items()}  # score(target, prediction)
        for reference, response in pairs
    ]


def rouge_table(scored: list[dict[str, Any]], model: str) -> list[dict[str, Any]]:
    """One row per bucket and ALL, in the layout of the original eval_unnatural_instructions/*.json files.
    `scored`: dicts with `bucket` and the three ROUGE values. An empty bucket has NumInstance 0 and null scores."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for s in scored:
        groups[s["bucket"]].append(s)
        groups["ALL"].append(s)
    rows = []
    for label in [b[0] for b in BUCKETS] + ["ALL"]:
        group = groups.get(label, [])
        rows.append(
            {"Length": label, "NumInstance": len(group), "Model": model}
            | {name: (sum(s[name] for s in group) / len(group) if group else None) for name in ROUGE_TYPES}
        )
    return rows


def evaluate_rouge(
    responses: list[list[dict]], use_stemmer: bool = True
) -> tuple[dict[str, list[dict]], list[dict], dict]:
    """For each model's responses (lists from `read_responses`): the table rows by bucket label, the per-pair scores,
    and the problems found per model (counted; pairs without a reference are left out, the rest are scored)."""
    from rouge_score.tokenizers import DefaultTokenizer

    tokenizer = DefaultTokenizer()
    tables: dict[str, list[dict]] = {label: [] for label in [b[0] for b in BUCKETS] + ["ALL"]}
    per_pair, problems = [], {}
    for answers in responses:
        model = answers[0]["model"]
        issues: dict[str, list] = defaultdict(list)
        usable = []
        for a in answers:
            reference = a.get("reference")
            if not isinstance(reference, str) or not reference.strip():
                issues["missing reference (left out)"].append(a["id"])
                continue
            if not a["response"].strip():
                issues["empty response (scored 0)"].append(a["id"])
            if not tokenizer.tokenize(reference):
                issues["reference has no ROUGE tokens (scored 0)"].append(a["id"])
            usable.append(a)
        if not usable:
            raise RecordError(f"model {model}: no response has a reference to score against")
        scores = score_pairs([(a["reference"], a["response"]) for a in usable], use_stemmer)
        scored = [
            {"id": a["id"], "model": model, "bucket": length_bucket(a["reference"])} | s for a, s in zip(usable, scores)
        ]
        per_pair += scored
        for row in rouge_table(scored, model):
            tables[row["Length"]].append(row)
        problems[model] = {reason: {"count": len(ids), "first_ids": ids[:10]} for reason, ids in issues.items()}
    return tables, per_pair, problems


def write_tables(tables: dict[str, list[dict]], directory: Path, prefix: str) -> list[Path]:
    """One JSON file per bucket, `<prefix>_len<bucket>.json`, as the original `..._h9000_len0-2.json` files."""
    paths = []
    for label, rows in tables.items():
        path = directory / f"{prefix}_len{label}.json"
        json_files.write_json(path, rows, indent=2)
        paths.append(path)
    return paths


def format_table(tables: dict[str, list[dict]]) -> str:
    """The table as markdown, a line per bucket and model."""
    lines = ["| Length | Model | NumInstance | ROUGE-1 | ROUGE-2 | ROUGE-L |", "|---|---|---:|---:|---:|---:|"]
    for label, rows in tables.items():
        for r in rows:
            values = " | ".join("-" if r[k] is None else f"{r[k]:.4f}" for k in ROUGE_TYPES)
            lines.append(f"| {label} | {r['Model']} | {r['NumInstance']} | {values} |")
    return "\n".join(lines)
