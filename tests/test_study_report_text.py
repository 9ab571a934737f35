"""The study report's text: figure captions say whose numbers they draw, `code` is HTML code, and a judge stage
without scores says why."""

from __future__ import annotations

import json

from omegaconf import OmegaConf

from gpt4llm.reproduction.runner import Outcome, Stage, Status
from gpt4llm.reproduction.study_report import Section, figures_section, judge_sections, to_html, to_markdown

PRESET = OmegaConf.create({"judge": {"opponents": ["GPT-4"]}})


def test_html_shows_code_spans_as_code_not_backticks():
    page = to_html(
        "T",
        "The `tiny` preset.",
        [Section("S", "Run `python -m gpt4llm.humaneval a=<b>`, then `report=true`.", ["command"], [["`x & y`"]])],
    )
    assert "<p>The <code>tiny</code> preset.</p>" in page
    assert "<p>Run <code>python -m gpt4llm.humaneval a=&lt;b&gt;</code>, then <code>report=true</code>.</p>" in page
    assert "<td><code>x &amp; y</code></td>" in page
    assert "`" not in page


def judge_rows(tmp_path, summary: dict) -> list[list[str]]:
    directory = tmp_path / "judge" / "GPT-4"
    directory.mkdir(parents=True)
    (directory / "judge_summary_LLaMA-GPT4.json").write_text(json.dumps(summary))
    outcome = Outcome(Stage("judge/GPT-4", "gpt4llm.evaluate", []), Status.RAN)
    (section,) = judge_sections(tmp_path, PRESET, {"judge/GPT-4": outcome})
    return section.rows


def summary(scored: int, totals: list[float], unparsable: int, failed: int = 0) -> dict:
    problems = {"unparsable (left out)": {"count": unparsable, "ids": []}}
    if failed:
        problems["request failed (left out)"] = {"count": failed, "ids": []}
    return {
        "model": "LLaMA-GPT4",
        "opponent": "GPT-4",
        "scored": scored,
        "totals": totals,
        "replies_unparsable": unparsable,
        "questions": 3,
        "problems": problems,
    }


def test_a_judge_stage_without_parsable_scores_says_so_instead_of_0_to_0(tmp_path):
    (row,) = judge_rows(tmp_path, summary(0, [0, 0], unparsable=3))
    assert row[2] == "the judge model produced no parsable scores (0 of 3 questions scored)"
    assert row[3] == "—"


def test_a_judge_stage_whose_requests_failed_says_so(tmp_path):
    (row,) = judge_rows(tmp_path, summary(0, [0, 0], unparsable=1, failed=2))
    assert row[2] == "no scores (0 of 3 questions scored): failed requests 2, unparsable replies 1"


def test_a_scored_judge_stage_shows_its_totals(tmp_path):
    (row,) = judge_rows(tmp_path, summary(2, [16, 20], unparsable=1))
    assert row[2] == "16 : 20 = 80% (2 scored)"


def test_every_figure_is_captioned_with_whose_numbers_it_draws(tmp_path):
    names = [
        "bar_hhh_LLaMA-GPT4_vs_GPT-4_paper",
        "bar_score_all_vs_GPT-4",
        "bar_score_ranking_vs_GPT-4",
        "bar_unnatural",
        "cmp_seq_len_freq",
        "pie_LLaMA-GPT4_vs_GPT-4_paper",
        "pie_ours_vs_alpaca_pilot",
    ]
    (tmp_path / "plots").mkdir()
    for name in names:
        (tmp_path / "plots" / f"{name}.png").write_bytes(b"png")
    section = figures_section(tmp_path, PRESET)
    assert [image.stem for image in section.images] == names
    paper = "The paper's published human evaluation (Figure 3), drawn for comparison: not measured by this study."
    assert section.captions == [
        paper,
        "This study's relative scores of its models against GPT-4 (Figure 4), measured by stage judge/GPT-4; "
        "the paper's are in the review table above.",
        "This study's relative scores of the best-of-N ranking groups (stages bestofn, evaluate/reward) against "
        "GPT-4 (Figure 4), measured by stage judge/GPT-4; the paper's are in the review table above.",
        "This study's ROUGE-L by reference length (Figure 6), measured by stage evaluate/rouge on its models' "
        "answers; the paper's values are in the ROUGE-L table above.",
        "The lengths in words of this study's generated answers (the axes of the paper's Figure 1d): every "
        "`responses.jsonl` of the generate stages and of evaluate/reward's ranking groups; not the paper's data.",
        paper,
        "Human ratings of this study's answers (Figure 3), from a `humaneval_report.json` under this study.",
    ]
    markdown = to_markdown("T", "", [section])
    assert f"![pie_LLaMA-GPT4_vs_GPT-4_paper](plots/pie_LLaMA-GPT4_vs_GPT-4_paper.png)\n\n*{paper}*\n" in markdown
    page = to_html("T", "", [section])
    assert page.count("<figcaption>") == len(names)
    escaped = (
        "The paper&#x27;s published human evaluation (Figure 3), drawn for comparison: not measured by this study."
    )
    assert f'src="data:image/png;base64,cG5n"><figcaption>{escaped}</figcaption>' in page
    assert (
        "<figcaption>The lengths in words of this study&#x27;s generated answers (the axes of the paper&#x27;s "
        "Figure 1d): every <code>responses.jsonl</code> of" in page
    )
