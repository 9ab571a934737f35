"""The paper's published numbers (arXiv 2304.03277 and GPT-4-LLM's plots notebook), in the layouts our own result
files use, so the same code draws and compares both."""

from __future__ import annotations

from typing import Any

# Figure 3, human evaluation on User-Oriented-252: % of votes (the model wins, the opponent wins, tie). The vote
# totals are implied by the percentages (704 and 755), not published.
HHH = {
    ("LLaMA-GPT4", "Alpaca"): {"votes": 704, "helpfulness": (54.12, 19.74, 26.14), "honesty": (25.99, 31.39, 42.61),
                               "harmlessness": (16.48, 25.43, 58.10)},
    ("LLaMA-GPT4", "GPT-4"): {"votes": 755, "helpfulness": (42.78, 44.11, 13.11), "honesty": (37.88, 37.48, 24.64),
                              "harmlessness": (31.66, 35.36, 32.98)},
}


def hhh_comparisons() -> list[dict[str, Any]]:
    """Figure 3's two comparisons as humaneval_report.json's "comparisons" (no intervals: none were published)."""
    out = []
    for (model, opponent), published in HHH.items():
        criteria = {}
        for criterion in ("helpfulness", "honesty", "harmlessness"):
            shares = dict(zip(("win", "lose", "tie"), (p / 100 for p in published[criterion])))
            criteria[criterion] = {"votes": published["votes"], "fractions": shares,
                                   "ci": dict.fromkeys(shares), "counts": None}
        out.append({"model": model, "opponent": opponent, "criteria": criteria, "source": "paper"})
    return out
