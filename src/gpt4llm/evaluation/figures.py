"""The paper's figures (plots/main_plots.ipynb of GPT-4-LLM), drawn from result files instead of hard-coded numbers.

| figure                                | notebook output                    | input                                        |
| ROUGE-L by reference length (Fig. 6)  | bar_unnatural.pdf                  | *_len{0-2,3-5,6-10,10-,ALL}.json tables      |
| GPT-4 score distributions (Fig. 2)    | cmp_data_dist.png (saved blank)    | cmp_data_scores.json                         |
| relative scores (Fig. 4)              | bar_score_all/ranking_vs_*.pdf     | judge_summary*.json of gpt4llm.evaluate      |
| output lengths (Fig. 1d)              | cmp_seq_len_freq_gpt3_gpt4.pdf     | responses.jsonl, Alpaca data files           |

Each `draw_*` returns the matplotlib Figure (tests read the drawn values back from it); `save` writes PNG and PDF.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display needed, and none is touched
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from gpt4llm.data.records import RecordError, read_json_records  # noqa: E402

BUCKETS = ("0-2", "3-5", "6-10", "10-")  # the file-name labels; the x axis says ">10" for "10-"
TABLE_FILE = re.compile(r"^(?P<prefix>.*)_len(?P<bucket>0-2|3-5|6-10|10-|ALL)\.json$")
# cmp_data_scores.json's keys, named as in the paper's Figure 2.
SOURCE_NAMES = {"icm-1.3b": "OPT-IML", "text-davinci-003": "GPT-3.5", "gpt4": "GPT-4"}
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
                    raise RecordError(f"{file}: record {index}: field '{name}' is missing (expected the layout of eval_unnatural_instructions/*.json)")
                if not isinstance(row[name], kind):
                    raise RecordError(f"{file}: record {index}: field '{name}' is {type(row[name]).__name__}")
            models.setdefault(row["Model"], {})[bucket] = row
    return models


def draw_rouge_by_length(models: dict[str, dict[str, dict]], reference: str = "GPT4"):
    """Grouped bars of ROUGE-L per length bucket, one colour per model; the legend holds each model's ALL mean and
    the bars of the other models are annotated with their difference from `reference` (when it is there)."""
    names = list(models)
    fig, ax = plt.subplots(figsize=(max(6, 4 + 1.2 * len(names)), 4))
    width = 0.8 / max(1, len(names))
    x = np.arange(len(BUCKETS))
    for k, name in enumerate(names):
        values = [_value(models[name].get(b)) for b in BUCKETS]
        overall = _value(models[name].get("ALL"))
        label = f"{name} (ALL: {overall:.4f})" if not np.isnan(overall) else name
        bars = ax.bar(x + (k - (len(names) - 1) / 2) * width, values, width, label=label)
        if reference in models and name != reference:
            for bar, bucket, v in zip(bars, BUCKETS, values):
                diff = v - _value(models[reference].get(bucket))
                if not np.isnan(diff):
                    ax.annotate(f"{diff:+.4f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                                ha="center", va="bottom", fontsize=7, rotation=90, xytext=(0, 2), textcoords="offset points")
    # n under each bucket when every table has the same count (tables of different eval sets do not)
    counts = {b: {m[b]["NumInstance"] for m in models.values() if b in m} for b in BUCKETS}
    ax.set_xticks(x, [(">10" if b == "10-" else b) + (f"\n(n={counts[b].pop()})" if len(counts[b]) == 1 else "") for b in BUCKETS])
    ax.set_xlabel("Ground-truth response length (words)")
    ax.set_ylabel("ROUGE-L")
    ax.set_ylim(0, max(0.05, np.nanmax([_value(m.get(b)) for m in models.values() for b in BUCKETS] + [0]) * 1.4))
    ax.legend(fontsize=8, loc="upper center", ncol=min(3, len(names)))  # above the bars and their annotations
    return fig


def _value(row: dict | None) -> float:
    return float(row["rougeL"]) if row and row.get("rougeL") is not None else float("nan")


# --- Score distributions (Figure 2) -----------------------------------------------------------------------------
def read_score_lists(path: Path) -> dict[str, list[float]]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not data:
        raise RecordError(f"{path}: expected an object of score lists, like {{\"gpt4\": [9.0, ...], ...}}")
    for name, scores in data.items():
        if not isinstance(scores, list) or not scores:
            raise RecordError(f"{path}: field '{name}' is not a non-empty list of scores")
        bad = next((i for i, s in enumerate(scores) if not isinstance(s, (int, float)) or isinstance(s, bool)), None)
        if bad is not None:
            raise RecordError(f"{path}: field '{name}': record {bad} is {scores[bad]!r}, not a number")
    return data


def draw_score_distributions(scores: dict[str, list[float]]):
    """Density of the GPT-4 scores of each model's responses, the lists truncated to the shortest one as the
    notebook did (they are not aligned per prompt, so this only equalises the counts). Drawn as the notebook's
    seaborn KDE: a Gaussian kernel density with Scott's bandwidth."""
    n = min(len(v) for v in scores.values())
    fig, ax = plt.subplots(figsize=(6, 4))
    grid = np.linspace(0, 11, 500)
    for key, values in scores.items():
        data = np.asarray(values[:n], dtype=float)
        density = gaussian_kde(data, grid)
        ax.plot(grid, density, label=f"{SOURCE_NAMES.get(key, key)} (mean {data.mean():.2f})")
        ax.fill_between(grid, density, alpha=0.15)
    ax.set_xlabel("Score")
    ax.set_ylabel("Density")
    ax.set_title(f"GPT-4 scores of the comparison data (n={n} each)")
    ax.legend()
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
            raise RecordError(f"{path}: field '{name}' is missing (expected a judge_summary written by gpt4llm.evaluate)")
    return summary


def draw_relative_scores(bars: list[tuple[str, float, float]], opponent: str):
    """One bar per model at a/b x 100, labelled "{:.0f}%" above and "a : b" inside, as in the notebook."""
    fig, ax = plt.subplots(figsize=(max(4, 1.1 * len(bars)), 4))
    heights = [100 * a / b for _, a, b in bars]
    drawn = ax.bar(range(len(bars)), heights, color="tab:blue")
    for bar, (_, a, b), h in zip(drawn, bars, heights):
        x = bar.get_x() + bar.get_width() / 2
        ax.text(x, h + 1, f"{h:.0f}%", ha="center", va="bottom", fontsize=9)
        ax.text(x, h / 2, f"{a:g} : {b:g}", ha="center", va="center", rotation=90, fontsize=8, color="white")
    ax.set_xticks(range(len(bars)), [name for name, _, _ in bars], rotation=30, ha="right")
    ax.set_ylabel(f"Relative score vs {opponent} (%)")
    ax.set_ylim(0, max(heights + [100]) * 1.15)
    return fig


# --- Output lengths (Figure 1d) ---------------------------------------------------------------------------------
def draw_output_lengths(lengths: dict[str, list[int]]):
    """Frequency of output lengths in words, bins linspace(0, 512, 100), log y, as the notebook."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, values in lengths.items():
        ax.hist(values, bins=np.linspace(0, 512, 100), alpha=0.5, label=f"{name} (mean {np.mean(values):.0f})")
    ax.set_yscale("log")
    ax.set_xlabel("Output length (words)")
    ax.set_ylabel("Frequency")
    ax.legend()
    return fig
