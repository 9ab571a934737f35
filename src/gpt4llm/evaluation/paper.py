"""The paper's published numbers (arXiv 2304.03277 and GPT-4-LLM's plots notebook), in the layouts our own result
files use, so the same code draws and compares both."""

from __future__ import annotations

from typing import Any

# Figure 3, human evaluation on User-Oriented-252: % of votes (the model wins, the opponent wins, tie). The vote
# totals are implied by the percentages (704 and 755), not published.
HHH = {
    ("LLaMA-GPT4", "Alpaca"): {
        "votes": 704,
        "helpfulness": (54.12, 19.74, 26.14),
        "honesty": (25.99, 31.39, 42.61),
        "harmlessness": (16.48, 25.43, 58.10),
    },
    ("LLaMA-GPT4", "GPT-4"): {
        "votes": 755,
        "helpfulness": (42.78, 44.11, 13.11),
        "honesty": (37.88, 37.48, 24.64),
        "harmlessness": (31.66, 35.36, 32.98),
    },
}


def hhh_comparisons() -> list[dict[str, Any]]:
    """Figure 3's two comparisons as humaneval_report.json's "comparisons" (no intervals: none were published)."""
    out = []
    for (model, opponent), published in HHH.items():
        criteria = {}
        for criterion in ("helpfulness", "honesty", "harmlessness"):
            shares = dict(zip(("win", "lose", "tie"), (p / 100 for p in published[criterion])))
            criteria[criterion] = {
                "votes": published["votes"],
                "fractions": shares,
                "ci": dict.fromkeys(shares),
                "counts": None,
            }
        out.append({"model": model, "opponent": opponent, "criteria": criteria, "source": "paper"})
    return out


# Figure 4 / Table (b): the GPT-4 review on Vicuna-80, [model total, opponent total] over the 80 questions.
RELATIVE = {
    "ChatGPT": {
        "LLaMA-13B": (502, 698.5),
        "Alpaca-13B": (585, 704.5),
        "Vicuna-13B": (649, 652.5),
        "LLaMA-GPT4 7B": (609, 666.5),
        "LLaMA-GPT4 7B (R1)": (624, 667),
        "Bard": (634, 660),
        "ChatGPT": (759, 759),
        "GPT-4": (613, 521),
    },
    "GPT-4": {
        "LLaMA-13B": (520, 731.5),
        "Alpaca-13B": (593, 745.5),
        "Vicuna-13B": (640, 715.5),
        "LLaMA-GPT4 7B": (606, 726.5),
        "LLaMA-GPT4 7B (R1)": (631, 722.5),
        "Bard": (633, 722),
        "ChatGPT": (652, 714),
        "GPT-4": (760, 760),
    },
}

# Table (e): best-of-5 with the reward model; group k = each question's k-th ranked answer, B = the single decode.
BEST_OF_N = {
    "ChatGPT": {
        "rank1": (624, 667),
        "rank2": (614, 670),
        "rank3": (623, 681.5),
        "rank4": (597, 669),
        "rank5": (605, 677.5),
        "B": (609, 666.5),
    },
    "GPT-4": {
        "rank1": (631, 722.5),
        "rank2": (614, 720.5),
        "rank3": (615, 724),
        "rank4": (602, 726),
        "rank5": (605, 726),
        "B": (606, 726.5),
    },
}

# Figure 6 / Table (d): ROUGE-L on the 9,000 Unnatural Instructions by reference length in words.
ROUGE_L = {
    "Alpaca": {"0-2": 0.4165, "3-5": 0.3442, "6-10": 0.3647, "10-": 0.3398, "ALL": 0.3860},
    "LLaMA-GPT4": {"0-2": 0.3171, "3-5": 0.2961, "6-10": 0.3903, "10-": 0.4119, "ALL": 0.3447},
    "GPT-4": {"0-2": 0.3603, "3-5": 0.3055, "6-10": 0.3770, "10-": 0.4166, "ALL": 0.3697},
}
ROUGE_BUCKET_SIZES = {"0-2": 5089, "3-5": 868, "6-10": 936, "10-": 2107, "ALL": 9000}

# Our model names -> the paper's row names in RELATIVE (the study's models are the paper's 7B ones).
RELATIVE_ROWS = {"LLaMA-GPT4": "LLaMA-GPT4 7B"}

# Table (c), everything in Chinese (questions, answers and GPT-4's review): [model total, GPT-4 total].
CHINESE = {
    "LLaMA-13B": (233, 707),
    "Alpaca-13B": (259, 724),
    "Vicuna-13B": (545, 691),
    "LLaMA-GPT4 7B": (253, 723),
    "LLaMA-GPT4-CN 7B": (445, 694),
    "GPT-4": (626.5, 680.5),
}
