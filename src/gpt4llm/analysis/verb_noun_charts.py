"""Figure 1's verb–noun charts: the most frequent pairs (1c, horizontal bars, one colour per dataset) and the
sunburst of the top verbs and their top nouns (an interactive Plotly page and a static matplotlib PNG of the same
rings)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from gpt4llm.io.atomic import write_text

Pair = tuple[str, str]


def pair_counts(pairs) -> Counter:
    """Counts of the complete pairs (the notebook's dropna, then groupby(verb, noun).size)."""
    return Counter((verb, noun) for verb, noun in pairs if verb and noun)


def draw_top_pairs(counts: dict[str, Counter], top: int = 25):
    """The `top` most frequent pairs of the first dataset as horizontal bars (most frequent at the top), with every
    other dataset's count of the same pairs beside them; each legend entry says its number of unique pairs."""
    first = next(iter(counts.values()))
    pairs = [pair for pair, _ in first.most_common(top)][::-1]
    fig, ax = plt.subplots(figsize=(7, max(4, 0.28 * len(pairs) + 1)))
    y = np.arange(len(pairs))
    height = 0.8 / len(counts)
    for k, (name, c) in enumerate(counts.items()):
        ax.barh(
            y + (k - (len(counts) - 1) / 2) * height,
            [c.get(p, 0) for p in pairs],
            height,
            label=f"{name} ({len(c)} unique pair{'' if len(c) == 1 else 's'})",
        )
    ax.set_yticks(y, [f"{verb} {noun}" for verb, noun in pairs])
    ax.set_xlabel("Frequency")
    ax.legend(loc="lower right")
    return fig


def sunburst_rings(counts: Counter, verbs: int = 20, nouns: int = 4, min_count: int = 10) -> list[tuple[str, str, int]]:
    """The notebook's selection: the `verbs` most frequent verbs, each with its `nouns` most frequent nouns, keeping
    pairs seen more than `min_count` times."""
    by_verb = Counter()
    for (verb, _), n in counts.items():
        by_verb[verb] += n
    rows = []
    for verb, _ in by_verb.most_common(verbs):
        mine = Counter({noun: n for (v, noun), n in counts.items() if v == verb})
        rows += [(verb, noun, n) for noun, n in mine.most_common(nouns) if n > min_count]
    return rows


def why_no_sunburst(counts: Counter, verbs: int = 20, nouns: int = 4, min_count: int = 10) -> str:
    """Why sunburst_rings selected nothing, and what to change."""
    if not counts:
        return "no text has a verb with a direct-object noun"
    (verb, noun), top = counts.most_common(1)[0]
    return (
        f"no pair among the top {verbs} verbs' top {nouns} nouns is seen more than sunburst.min_count={min_count} "
        f"times (the most frequent, '{verb} {noun}', {top}); a lower sunburst.min_count draws it"
    )


def draw_sunburst(rows: list[tuple[str, str, int]], title: str):
    """Inner ring: verbs; outer ring: their nouns, each wedge as wide as its count."""
    fig, ax = plt.subplots(figsize=(8, 8))
    verbs = list(dict.fromkeys(v for v, _, _ in rows))
    verb_sizes = [sum(n for v, _, n in rows if v == verb) for verb in verbs]
    palette = plt.get_cmap("tab20")(np.linspace(0, 1, max(len(verbs), 1)))
    colour = dict(zip(verbs, palette))
    ax.pie(
        verb_sizes,
        radius=0.65,
        labels=verbs,
        labeldistance=0.55,
        colors=[colour[v] for v in verbs],
        wedgeprops=dict(width=0.35, edgecolor="white"),
        textprops=dict(fontsize=8),
        startangle=90,
        counterclock=False,
    )
    ax.pie(
        [n for _, _, n in rows],
        radius=1.0,
        labels=[noun for _, noun, _ in rows],
        labeldistance=0.82,
        colors=[(*colour[v][:3], 0.55) for v, _, _ in rows],
        wedgeprops=dict(width=0.35, edgecolor="white"),
        textprops=dict(fontsize=7),
        startangle=90,
        counterclock=False,
    )
    ax.set_title(title)
    return fig


def write_sunburst_html(rows: list[tuple[str, str, int]], title: str, path: Path) -> Path:
    """Plotly's sunburst as one self-contained HTML page (the library inlined: it opens offline)."""
    import plotly.express as px

    fig = px.sunburst(
        {"verb": [v for v, _, _ in rows], "noun": [n for _, n, _ in rows], "count": [c for _, _, c in rows]},
        path=["verb", "noun"],
        values="count",
        title=title,
    )
    return write_text(path, fig.to_html(include_plotlyjs=True, full_html=True))
