"""The paper's figures (plots/main_plots.ipynb of GPT-4-LLM), drawn from result files instead of hard-coded numbers.

| figure | notebook output | input |
| ROUGE-L by reference length (Fig. 6) | bar_unnatural.pdf | *_len{0-2,3-5,6-10,10-,ALL}.json tables |
| GPT-4 score distributions (Fig. 2) | cmp_data_dist.png (saved blank) | cmp_data_scores.json |
| relative scores (Fig. 4) | bar_score_all/ranking_vs_*.pdf | judge_summary*.json of gpt4llm.evaluate |
| output lengths (Fig. 1d) | cmp_seq_len_freq_gpt3_gpt4.pdf | responses.jsonl, Alpaca data files |
| human evaluation (Fig. 3) | pie_llama_gpt4_vs_*.pdf | humaneval_report.json of gpt4llm.humaneval |

Each `draw_*` returns the matplotlib Figure (tests read the drawn values back from it); `save` writes PNG and PDF.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display needed, and none is touched
import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np

from gpt4llm.errors import MissingFileError, RecordError
from gpt4llm.evaluation.benchmark_figures import SUMMARY_FILE
from gpt4llm.evaluation.responses import slug  # noqa: F401  (file names here and in the commands)
from gpt4llm.io.json_files import read_json_records

BUCKETS = ("0-2", "3-5", "6-10", "10-")  # the file-name labels; the x axis says ">10" for "10-"
TABLE_FILE = re.compile(r"^(?P<prefix>.*)_len(?P<bucket>0-2|3-5|6-10|10-|ALL)\.json$")
# cmp_data_scores.json's keys, named as the notebook's Figure 2 columns.
SOURCE_NAMES = {"icm-1.3b": "OPT-IML", "text-davinci-003": "GPT3.5", "gpt4": "GPT4"}
# The result tables call the paper's model "Alpaca-GPT4"; the notebook's legends (and the paper) say LLaMA-GPT4.
DISPLAY_NAMES = {"Alpaca-GPT4": "LLaMA-GPT4"}
RANKING_MODEL = re.compile(r"^(rank|group)[ _-]?\d+$|^B$", re.IGNORECASE)  # best-of-N groups 1..N and baseline B


def save(fig, directory: Path, name: str, formats: tuple[str, ...] = ("png", "pdf")) -> list[Path]:
    paths = []
    for fmt in formats:
        path = directory / f"{name}.{fmt}"
        fig.savefig(path, bbox_inches="tight", dpi=150)  # the figure drawn on, not a fresh empty one
        paths.append(path)
    plt.close(fig)
    return paths


# --- ROUGE tables (Figure 6) -----------------------------------------------------------------------------------
def read_rouge_tables(files: list[Path]) -> dict[str, dict[str, dict[str, Any]]]:
    """model -> bucket -> row, from one set of per-bucket files. The bucket comes from the file name (the original
    6-10 file says "5-10" in its Length field)."""
    models: dict[str, dict[str, dict]] = {}
    for file in files:
        bucket = TABLE_FILE.match(file.name)["bucket"]
        rows = read_json_records(file)
        for index, row in enumerate(rows):
            for name, kind in (("Model", str), ("NumInstance", int), ("rougeL", (int, float, type(None)))):
                if not isinstance(row, dict) or name not in row:
                    raise RecordError(
                        f"{file}: record {index}: field '{name}' is missing "
                        "(expected the layout of eval_unnatural_instructions/*.json)"
                    )
                if not isinstance(row[name], kind):
                    raise RecordError(f"{file}: record {index}: field '{name}' is {type(row[name]).__name__}")
            models.setdefault(row["Model"], {})[bucket] = row
    return models


def notebook_difference(value: float) -> str:
    """A difference as the notebook wrote it: truncated, not rounded ('+' + str(b)[:6], '-' + str(b)[1:6])."""
    return "+" + str(value)[:6] if value > 0 else "-" + str(value)[1:6]


def draw_rouge_by_length(models: dict[str, dict[str, dict]], reference: str = "GPT4"):
    """Grouped bars of ROUGE-L per length bucket, one colour per model; the legend holds each model's ALL mean
    ("{:.2f}", as the notebook) and the bars of the other models are annotated with their difference from
    `reference` (when it is there), truncated and coloured green / red as the notebook did."""
    names = list(models)
    fig, ax = plt.subplots(figsize=(max(6, 4 + 1.2 * len(names)), 4))
    width = 0.8 / max(1, len(names))
    x = np.arange(len(BUCKETS))
    for k, name in enumerate(names):
        values = [_value(models[name].get(b)) for b in BUCKETS]
        overall = _value(models[name].get("ALL"))
        shown = DISPLAY_NAMES.get(name, name)
        label = f"{shown}: {overall:.2f}" if not np.isnan(overall) else shown
        bars = ax.bar(x + (k - (len(names) - 1) / 2) * width, values, width, label=label)
        if reference in models and name != reference:
            for bar, bucket, v in zip(bars, BUCKETS, values):
                diff = v - _value(models[reference].get(bucket))
                if not np.isnan(diff):
                    ax.annotate(
                        notebook_difference(diff),
                        (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center",
                        va="bottom",
                        fontsize=7,
                        rotation=90,
                        xytext=(0, 2),
                        textcoords="offset points",
                        color="green" if diff > 0 else "red",
                    )
    # n under each bucket when every table has the same count (tables of different eval sets do not)
    counts = {b: {m[b]["NumInstance"] for m in models.values() if b in m} for b in BUCKETS}
    ax.set_xticks(
        x, [(">10" if b == "10-" else b) + (f"\n(n={counts[b].pop()})" if len(counts[b]) == 1 else "") for b in BUCKETS]
    )
    ax.set_xlabel("Groundtruth Response Length")
    ax.set_ylabel("RougeL")
    ax.set_ylim(0, max(0.05, np.nanmax([_value(m.get(b)) for m in models.values() for b in BUCKETS] + [0]) * 1.4))
    ax.legend(fontsize=8, loc="upper center", ncol=min(3, len(names)))  # above the bars and their annotations
    return fig


def _value(row: dict | None) -> float:
    return float(row["rougeL"]) if row and row.get("rougeL") is not None else float("nan")


# --- Score distributions (Figure 2) -----------------------------------------------------------------------------
def read_score_lists(path: Path) -> dict[str, list[float]]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not data:
        raise RecordError(f'{path}: expected an object of score lists, like {{"gpt4": [9.0, ...], ...}}')
    for name, scores in data.items():
        if not isinstance(scores, list) or not scores:
            raise RecordError(f"{path}: field '{name}' is not a non-empty list of scores")
        bad = next((i for i, s in enumerate(scores) if not isinstance(s, (int, float)) or isinstance(s, bool)), None)
        if bad is not None:
            raise RecordError(f"{path}: field '{name}': record {bad} is {scores[bad]!r}, not a number")
    return data


def score_densities(scores: dict[str, list[float]], grid: np.ndarray) -> dict[str, np.ndarray]:
    """Each list's density on `grid`, the lists truncated to the shortest one as the notebook did (they are not
    aligned per prompt, so this only equalises the counts), normalised together as seaborn's `displot(kind="kde")`
    does by default (common_norm=True): each curve integrates to its share of all the scores, here 1/3."""
    n = min(len(v) for v in scores.values())
    return {
        key: gaussian_kde(np.asarray(values[:n], dtype=float), grid) / len(scores) for key, values in scores.items()
    }


def draw_score_distributions(scores: dict[str, list[float]]):
    """The notebook's Figure 2 (seaborn KDE of the three columns: Gaussian kernels, Scott's bandwidth), on its axes."""
    grid = np.linspace(0, 11, 500)
    fig, ax = plt.subplots(figsize=(6, 4))
    densities = score_densities(scores, grid)
    for key, density in densities.items():
        ax.plot(grid, density, label=SOURCE_NAMES.get(key, key))
        ax.fill_between(grid, density, alpha=0.25)
    ax.set_xlim(0, 11)
    ax.set_ylim(0, 1.5)  # the notebook's; on the paper's data GPT4's peak (2.06) runs off the top, as it did there
    ax.set_xlabel("Score", fontsize=11)
    ax.set_ylabel("Density")
    ax.legend(loc="upper left", bbox_to_anchor=(0.25, 0.95))
    return fig


def gaussian_kde(data: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """scipy.stats.gaussian_kde(data)(grid) for 1-D data (Scott's factor n^-1/5 times the sample std), summed over
    the distinct values with their counts: scores take a few dozen values, so this is fast on 51K of them."""
    bandwidth = data.std(ddof=1) * len(data) ** (-1 / 5)
    values, counts = np.unique(data, return_counts=True)
    z = (grid[:, None] - values[None, :]) / bandwidth
    return (np.exp(-0.5 * z**2) * counts).sum(axis=1) / (len(data) * bandwidth * np.sqrt(2 * np.pi))


# --- Relative scores (Figure 4) ---------------------------------------------------------------------------------
def read_judge_summary(path: Path) -> dict[str, Any]:
    summary = json.loads(path.read_text(encoding="utf-8"))
    for name in ("model", "opponent"):
        if not isinstance(summary, dict) or name not in summary:
            raise RecordError(
                f"{path}: field '{name}' is missing (expected a judge_summary written by gpt4llm.evaluate)"
            )
    return summary


def draw_relative_scores(bars: list[tuple[str, float, float]], opponent: str):
    """One horizontal bar per model at a/b x 100, labelled "{:.0f}%" after it and "a : b" ("{:.0f}", so half points
    round to even) inside its end, as the notebook's barh charts."""
    fig, ax = plt.subplots(figsize=(6, max(3, 0.5 * len(bars) + 1)))
    widths = [100 * a / b for _, a, b in bars]
    ax.barh([name for name, _, _ in bars], widths, color="tab:blue")
    for index, ((_, a, b), w) in enumerate(zip(bars, widths)):
        ax.text(w + 1, index - 0.2, f"{w:.0f}%")
        ax.text(w - 8, index - 0.2, f"{a:.0f} : {b:.0f}", ha="right", color="white")
    ax.set_xlim(0, max(widths + [100]) * 1.15)
    ax.xaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(decimals=0))
    ax.set_xlabel(f"Relative score vs {opponent}")
    return fig


# --- Output lengths (Figure 1d) ---------------------------------------------------------------------------------
def draw_output_lengths(lengths: dict[str, list[int]], xlabel: str = "Output Sequence Length"):
    """Frequency of output lengths in words, bins linspace(0, 512, 100), log y, as the notebook."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, values in lengths.items():
        ax.hist(values, bins=np.linspace(0, 512, 100), alpha=0.5, label=name)
    ax.set_xlim(-4, 512)
    ax.set_yscale("log")
    # Plain numbers ("6", "10", "100"), not matplotlib's default "6×10⁰": LogFormatter keeps its choice of which
    # minor ticks to label (only where the axis spans few decades), but prints them as numbers.
    ax.yaxis.set_major_formatter(matplotlib.ticker.LogFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.LogFormatter(labelOnlyBase=False))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("Frequency")
    ax.legend(loc="upper right")
    return fig


# --- Human evaluation (Figure 3) ------------------------------------------------------------------------------
HHH_OUTCOMES = ("win", "lose", "tie")  # wedges in the labels' order (the notebook swapped the first two in 3b)


def draw_hhh_pies(comparison: dict[str, Any]):
    """One pie per criterion: the model's wins, the opponent's, ties, labelled in that order with their %."""
    criteria = comparison["criteria"]
    fig, axes = plt.subplots(1, len(criteria), figsize=(4 * len(criteria), 4))
    labels = [comparison["model"], comparison["opponent"], "Tie"]
    for ax, (criterion, row) in zip(np.atleast_1d(axes), criteria.items()):
        sizes = [row["fractions"][o] or 0.0 for o in HHH_OUTCOMES]
        ax.pie(
            sizes,
            labels=[label if size > 0 else "" for label, size in zip(labels, sizes)],  # 0% wedges stack their labels
            autopct=lambda percent: f"{percent:.1f}%" if percent > 0 else "",
            startangle=90,
            counterclock=False,
            colors=["tab:blue", "tab:orange", "tab:gray"],
        )
        ax.set_title(f"{criterion.capitalize()} ({row['votes']} vote{'' if row['votes'] == 1 else 's'})")
    return fig


def draw_hhh_bars(comparison: dict[str, Any]):
    """The same fractions as grouped bars, with the bootstrap intervals as error bars where there are any."""
    criteria = comparison["criteria"]
    fig, ax = plt.subplots(figsize=(7, 4))
    x = np.arange(len(criteria))
    names = [comparison["model"], comparison["opponent"], "Tie"]
    for k, (outcome, name) in enumerate(zip(HHH_OUTCOMES, names)):
        values = np.array([100 * (row["fractions"][outcome] or 0.0) for row in criteria.values()])
        ci = [row["ci"][outcome] for row in criteria.values()]
        errors = np.array([[v - 100 * c[0], 100 * c[1] - v] if c else [0.0, 0.0] for v, c in zip(values, ci)]).T
        ax.bar(x + (k - 1) * 0.27, values, 0.27, yerr=errors if any(ci) else None, capsize=3, label=name)
    ax.set_xticks(x, [c.capitalize() for c in criteria])
    ax.set_ylabel("% of votes")
    ax.set_ylim(0, 100)
    ax.legend()
    ax.set_title(f"{comparison['model']} vs {comparison['opponent']}")
    return fig


def draw_hhh(comparison: dict[str, Any]):
    """Figure 3's pies and the bars, each with its file name."""
    pair = f"{slug(comparison['model'])}_vs_{slug(comparison['opponent'])}"
    figures = [(draw_hhh_pies(comparison), f"pie_{pair}"), (draw_hhh_bars(comparison), f"bar_hhh_{pair}")]
    if comparison.get("source") == "paper":  # drawn beside a study's own figures: the image itself says whose they are
        for fig, _ in figures:
            fig.suptitle("The paper's published numbers (Figure 3), not measured here", y=1.02, fontsize=10)
    return figures


def read_humaneval_report(path: Path) -> list[dict[str, Any]]:
    report = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(report, dict) or not isinstance(report.get("comparisons"), list):
        raise RecordError(f"{path}: field 'comparisons' is missing (expected gpt4llm.humaneval's report)")
    return report["comparisons"]


# --- Inputs ----------------------------------------------------------------------------------------------------
def find_inputs(directories: list[Path]) -> dict[str, list[Path]]:
    """The result files under `directories`, by the figure input they are (rouge, scores, judge, responses)."""
    found: dict[str, list[Path]] = defaultdict(list)
    for directory in directories:
        if not directory.is_dir():
            raise MissingFileError(f"results={directory}: not a directory")
        for path in sorted(directory.rglob("*")):
            if TABLE_FILE.match(path.name):
                found["rouge"].append(path)
            elif path.name == "cmp_data_scores.json":
                found["scores"].append(path)
            elif path.name.startswith("judge_summary") and path.suffix == ".json":
                found["judge"].append(path)
            elif SUMMARY_FILE.match(path.name):  # the judge benchmarks' summaries (evaluation/benchmark_figures.py)
                found["benchmarks"].append(path)
            elif path.name == "humaneval_report.json":
                found["humaneval"].append(path)
            elif path.name == "responses.jsonl":
                found["responses"].append(path)
    return found
