"""The judge benchmarks' leaderboard across runs (`python -m gpt4llm.plots results=logs`): one table and one figure per
benchmark, a row per model from its newest summary (`evaluate metric=mt_bench|alpaca_eval|arena_hard` write them)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from gpt4llm.errors import RecordError

SUMMARY_FILE = re.compile(r"^(mt_bench|alpaca_eval|arena_hard)_summary_.+\.json$")
TITLES = {
    "mt_bench": ("MT-Bench (1-10, both turns)", "score"),
    "alpaca_eval": ("AlpacaEval 2 length-controlled win rate (%)", "length_controlled_winrate"),
    "arena_hard": ("Arena-Hard score vs gpt-4-0314 (%)", "score"),
}


def leaderboard_rows(paths: list[Path]) -> dict[str, list[dict]]:
    """benchmark -> rows {model, value, low, high, source}, best first; a model's newest summary wins."""
    newest: dict[tuple[str, str], tuple[float, dict]] = {}
    for path in paths:
        benchmark = SUMMARY_FILE.match(path.name)[1]
        s = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(s, dict) or "model" not in s:
            raise RecordError(f"{path}: not a benchmark summary (a JSON object with 'model')")
        if benchmark == "mt_bench":
            value, low, high = s.get("score"), None, None
        elif benchmark == "alpaca_eval":
            value, se = s.get("length_controlled_winrate"), s.get("lc_standard_error") or 0.0
            low, high = (None, None) if value is None else (value - 1.96 * se, value + 1.96 * se)
        else:
            row = s.get("leaderboard_row") or {}
            value, low, high = row.get("score"), row.get("lower"), row.get("upper")
        if value is None:
            continue
        key = (benchmark, s["model"])
        if key not in newest or path.stat().st_mtime >= newest[key][0]:
            row = {"model": s["model"], "value": value, "low": low, "high": high, "source": str(path)}
            newest[key] = (path.stat().st_mtime, row)
    out: dict[str, list[dict]] = {}
    for (benchmark, _), (_, row) in newest.items():
        out.setdefault(benchmark, []).append(row)
    return {b: sorted(rows, key=lambda r: -r["value"]) for b, rows in sorted(out.items())}


def leaderboard_table(benchmark: str, rows: list[dict]) -> str:
    title, _ = TITLES[benchmark]
    lines = [f"| model | {title} | 95% interval | from |", "|---|---:|---|---|"]
    for r in rows:
        interval = "-" if r["low"] is None else f"{r['low']:.1f} - {r['high']:.1f}"
        lines.append(f"| {r['model']} | {r['value']:.2f} | {interval} | {r['source']} |")
    return "\n".join(lines) + "\n"


def draw_leaderboard(benchmark: str, rows: list[dict]):
    """Horizontal bars, best on top, with the 95% interval where the benchmark has one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    title, _ = TITLES[benchmark]
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(rows) + 1.5))
    names = [r["model"] for r in rows][::-1]
    values = [r["value"] for r in rows][::-1]
    errors = [
        [r["value"] - r["low"] if r["low"] is not None else 0 for r in rows][::-1],
        [r["high"] - r["value"] if r["high"] is not None else 0 for r in rows][::-1],
    ]
    ax.barh(names, values, xerr=errors, color="#4c72b0", capsize=3)
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:.2f}", va="center", fontsize=8)
    ax.set_xlabel(title)
    ax.set_title(title)
    fig.tight_layout()
    return fig
