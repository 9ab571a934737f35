"""The figures draw the values of their input files: read back from the drawn matplotlib objects."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from gpt4llm.errors import RecordError
from gpt4llm.evaluation import paper_figures as F
from helpers.configs import SHARED_DATA

ORIGINAL = SHARED_DATA / "gpt4llm_plots"
needs_original = pytest.mark.skipif(not ORIGINAL.exists(), reason="../shared/data/gpt4llm_plots is not there")


def bar_heights(ax) -> list[float]:
    return [p.get_height() for p in ax.patches]


@needs_original
def test_figure_6_draws_the_original_rouge_l_values():
    files = sorted((ORIGINAL / "eval_unnatural_instructions").glob("*.json"))
    models = F.read_rouge_tables(files)
    assert list(models) == ["Alpaca-GPT4", "Alpaca", "GPT4"]
    ax = F.draw_rouge_by_length(models).axes[0]

    expected = []
    for model in models:
        for bucket in F.BUCKETS:
            file = (
                ORIGINAL / "eval_unnatural_instructions" / f"gpt4_unnatural_instruction_results_h9000_len{bucket}.json"
            )
            expected.append(next(r["rougeL"] for r in json.loads(file.read_text()) if r["Model"] == model))
    assert bar_heights(ax) == expected
    # The notebook's labels as its bar_unnatural.pdf shows them: legend means rounded to 2 places, LLaMA-GPT4 for
    # the tables' "Alpaca-GPT4", differences from GPT4 truncated (not rounded) by '+'+str(b)[:6] / '-'+str(b)[1:6].
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["LLaMA-GPT4: 0.34", "Alpaca: 0.39", "GPT4: 0.37"]
    notes = [t.get_text() for t in ax.texts]
    assert notes == ["-0.043", "-0.009", "+0.0132", "-0.004", "+0.0562", "+0.0387", "-0.012", "-0.076"]
    assert [t.get_text() for t in ax.get_xticklabels()] == [
        "0-2\n(n=5089)",
        "3-5\n(n=868)",
        "6-10\n(n=936)",
        ">10\n(n=2107)",
    ]


@needs_original
def test_score_distributions_are_drawn_from_the_truncated_lists(tmp_path):
    scores = json.loads((ORIGINAL / "cmp_data_scores.json").read_text())
    n = min(len(v) for v in scores.values())
    fig = F.draw_score_distributions(F.read_score_lists(ORIGINAL / "cmp_data_scores.json"))
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == [F.SOURCE_NAMES[k] for k in scores] and set(labels) == {"OPT-IML", "GPT3.5", "GPT4"} and n == 51183
    assert ax.get_xlim() == (0, 11) and ax.get_ylim() == (0, 1.5)  # the notebook's axes
    for line, values in zip(ax.lines, scores.values()):  # normalised together: each curve's area is 1/3
        x, y = line.get_data()
        assert np.trapezoid(y, x) == pytest.approx(1 / 3, abs=0.01)
        assert x[np.argmax(y)] == pytest.approx(np.bincount(np.asarray(values[:n], int)).argmax(), abs=0.25)

    [png, _] = F.save(fig, tmp_path, "dist")
    import matplotlib.image

    pixels = matplotlib.image.imread(png)
    assert pixels.std() > 0.05, "the PNG is blank (the original notebook's bug)"


def test_relative_score_bars_are_labelled_like_the_notebook():
    rows = [("LLaMA-GPT4", 609, 666.5), ("GPT-4", 613, 521), ("Vicuna", 640, 726.5)]
    ax = F.draw_relative_scores(rows, "ChatGPT").axes[0]
    assert [p.get_width() for p in ax.patches] == pytest.approx([100 * a / b for _, a, b in rows])
    # "{:.0f}" as the notebook: half points round to even (666.5 -> 666, 726.5 -> 726)
    assert [t.get_text() for t in ax.texts] == ["91%", "609 : 666", "118%", "613 : 521", "88%", "640 : 726"]


def test_score_densities_are_seaborns_displot_with_common_norm():
    """The oracle is seaborn itself, drawing the notebook's call on the same three columns."""
    sns = pytest.importorskip("seaborn")
    import pandas as pd

    rng = np.random.default_rng(0)
    scores = {
        "gpt4": rng.integers(6, 11, 400).tolist(),
        "text-davinci-003": rng.integers(3, 10, 450).tolist(),
        "icm-1.3b": rng.integers(1, 8, 500).tolist(),
    }
    n = min(len(v) for v in scores.values())
    grid = sns.displot(data=pd.DataFrame({k: v[:n] for k, v in scores.items()}), kind="kde", fill=True)
    drawn = [path.vertices for collection in grid.ax.collections for path in collection.get_paths()]
    assert len(drawn) == 3
    for vertices in drawn:  # a filled curve's upper edge: (x, density) points above zero
        x, y = vertices[vertices[:, 1] > 0].T
        candidates = [F.score_densities(scores, x)[k] for k in scores]
        assert min(np.max(np.abs(c - y)) for c in candidates) < 1e-6


def test_plots_command_reads_judge_summaries_and_sorts_ranking_groups(tmp_path):
    from omegaconf import OmegaConf

    from gpt4llm.plots import plots

    results = tmp_path / "results"
    results.mkdir()
    for model, totals in [("B", [609, 666.5]), ("rank2", [614, 670]), ("rank1", [624, 667]), ("ours", [500, 700])]:
        summary = {"model": model, "opponent": "ChatGPT", "totals": totals, "relative": 100 * totals[0] / totals[1]}
        (results / f"judge_summary_{model}.json").write_text(json.dumps(summary))
    (results / "responses.jsonl").write_text('{"id": 1, "model": "m", "response": "a b c"}\n')
    out = tmp_path / "out"
    out.mkdir()
    cfg = OmegaConf.create(
        {"results": str(results), "data_files": [], "formats": ["png"], "paths": {"output_dir": str(out)}}
    )
    report = plots(cfg)
    assert sorted(p.name for p in out.iterdir()) == [
        "bar_score_all_vs_ChatGPT.png",
        "bar_score_ranking_vs_ChatGPT.png",
        "cmp_seq_len_freq.png",
    ]
    assert any("Figure 6" in m for m in report["missing"]) and any("Figure 2" in m for m in report["missing"])


def test_wrong_layout_names_file_record_and_field(tmp_path):
    bad = tmp_path / "x_len0-2.json"
    bad.write_text(json.dumps([{"Length": "0-2", "NumInstance": 3, "Model": "m", "rouge": 0.3}]))
    with pytest.raises(RecordError, match=r"x_len0-2\.json: record 0: field 'rougeL' is missing"):
        F.read_rouge_tables([bad])
    scores = tmp_path / "cmp_data_scores.json"
    scores.write_text(json.dumps({"gpt4": [9.0, "N/A"]}))
    with pytest.raises(RecordError, match=r"cmp_data_scores\.json: field 'gpt4': record 1 is 'N/A', not a number"):
        F.read_score_lists(scores)


def test_kde_is_scipys_gaussian_kde():
    stats = pytest.importorskip("scipy.stats")
    data = np.random.default_rng(0).integers(0, 11, 500).astype(float)
    grid = np.linspace(0, 11, 50)
    np.testing.assert_allclose(F.gaussian_kde(data, grid), stats.gaussian_kde(data)(grid), rtol=1e-10)


def wedges(ax) -> list[tuple[str, float]]:
    """(label, fraction of the circle) for each wedge of a pie, in drawing order."""
    from matplotlib.patches import Wedge

    pies = [p for p in ax.patches if isinstance(p, Wedge)]
    labels = [t.get_text() for t in ax.texts if "%" not in t.get_text()]
    return [(label, (w.theta2 - w.theta1) / 360) for label, w in zip(labels, pies)]


def test_figure_3_from_the_papers_fractions_puts_each_wedge_under_its_label():
    from gpt4llm.evaluation.paper import HHH, hhh_comparisons

    vs_gpt4 = next(c for c in hhh_comparisons() if c["opponent"] == "GPT-4")
    fig = F.draw_hhh_pies(vs_gpt4)
    helpful = wedges(fig.axes[0])
    # 3b: the notebook drew 44.11 under "LLaMA-GPT4" and 42.78 under "GPT-4"; here each size is its label's
    assert [label for label, _ in helpful] == ["LLaMA-GPT4", "GPT-4", "Tie"]
    assert [round(100 * f, 2) for _, f in helpful] == list(HHH[("LLaMA-GPT4", "GPT-4")]["helpfulness"])
    percents = [t.get_text() for t in fig.axes[0].texts if "%" in t.get_text()]
    assert percents == ["42.8%", "44.1%", "13.1%"]
    assert [ax.get_title() for ax in fig.axes] == [
        "Helpfulness (755 votes)",
        "Honesty (755 votes)",
        "Harmlessness (755 votes)",
    ]


def test_plots_command_draws_study_reports_with_error_bars_and_the_papers_figure_3(tmp_path):
    from gpt4llm.plots import plots

    study = tmp_path / "results" / "pilot"
    study.mkdir(parents=True)
    criteria = {
        c: {
            "votes": 10,
            "fractions": {"win": 0.5, "lose": 0.3, "tie": 0.2},
            "ci": {"win": [0.2, 0.8], "lose": [0.1, 0.5], "tie": None},
        }
        for c in ("helpfulness", "honesty")
    }
    (study / "humaneval_report.json").write_text(
        json.dumps({"comparisons": [{"model": "ours", "opponent": "alpaca", "criteria": criteria}]})
    )
    cfg = OmegaConf.create(
        {
            "results": str(tmp_path / "results"),
            "paper": True,
            "data_files": [],
            "formats": ["png"],
            "paths": {"output_dir": str(tmp_path / "out")},
        }
    )
    (tmp_path / "out").mkdir()
    drawn = plots(cfg)
    names = sorted(Path(p).name for p in drawn["drawn"] if "hhh" in p or "pie" in p)
    assert names == [
        "bar_hhh_LLaMA-GPT4_vs_Alpaca_paper.png",
        "bar_hhh_LLaMA-GPT4_vs_GPT-4_paper.png",
        "bar_hhh_ours_vs_alpaca_pilot.png",
        "pie_LLaMA-GPT4_vs_Alpaca_paper.png",
        "pie_LLaMA-GPT4_vs_GPT-4_paper.png",
        "pie_ours_vs_alpaca_pilot.png",
    ]
    bars = F.draw_hhh_bars({"model": "ours", "opponent": "alpaca", "criteria": criteria})
    ax = bars.axes[0]
    from matplotlib.container import BarContainer

    groups = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert [[b.get_height() for b in c] for c in groups] == [[50.0, 50.0], [30.0, 30.0], [20.0, 20.0]]
    win_errors = groups[0].errorbar.lines[2][0].get_segments()
    assert [tuple(np.round(s[:, 1], 6)) for s in win_errors] == [(20.0, 80.0), (20.0, 80.0)]


def test_pies_leave_empty_wedges_unlabelled_and_say_1_vote():
    from gpt4llm.evaluation import paper_figures as F

    row = {"votes": 1, "fractions": {"win": 1.0, "lose": 0.0, "tie": 0.0}}
    fig = F.draw_hhh_pies({"model": "ours", "opponent": "alpaca", "criteria": {"helpfulness": row}})
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.texts if t.get_text()] == ["ours", "100.0%"]
    assert ax.get_title() == "Helpfulness (1 vote)"


def test_plots_command_draws_a_leaderboard_per_judge_benchmark(tmp_path):
    import os

    from gpt4llm.plots import plots

    results = tmp_path / "results"
    for run, files in {
        "old": {"mt_bench_summary_ours.json": {"model": "ours", "score": 3.0}},
        "new": {
            "mt_bench_summary_ours.json": {"model": "ours", "score": 5.25},  # newer than old/: this one is shown
            "mt_bench_summary_base.json": {"model": "base", "score": 6.5},
            "alpaca_eval_summary_ours.json": {"model": "ours", "length_controlled_winrate": 12.0,
                                              "lc_standard_error": 1.0},
            "arena_hard_summary_ours.json": {"model": "ours", "leaderboard_row": {"score": 30.0, "lower": 25.5,
                                                                                   "upper": 35.0}},
        },
    }.items():  # fmt: skip
        (results / run).mkdir(parents=True)
        for name, summary in files.items():
            (results / run / name).write_text(json.dumps(summary))
    os.utime(results / "old" / "mt_bench_summary_ours.json", (1, 1))
    out = tmp_path / "out"
    cfg = OmegaConf.create(
        {"results": str(results), "data_files": [], "formats": ["png"], "paths": {"output_dir": str(out)}}
    )
    report = plots(cfg)
    assert {p.name for p in out.iterdir()} >= {"leaderboard_mt_bench.png", "leaderboard_mt_bench.md"}
    mt = (out / "leaderboard_mt_bench.md").read_text().splitlines()
    assert mt[2].startswith("| base | 6.50 | - |") and mt[3].startswith("| ours | 5.25 | - |") and len(mt) == 4
    assert "| ours | 12.00 | 10.0 - 14.0 |" in (out / "leaderboard_alpaca_eval.md").read_text()
    assert "| ours | 30.00 | 25.5 - 35.0 |" in (out / "leaderboard_arena_hard.md").read_text()
    assert not any("judge benchmarks" in m for m in report["missing"])
    from gpt4llm.evaluation.benchmark_figures import draw_leaderboard, leaderboard_rows

    rows = leaderboard_rows(sorted(results.rglob("arena_hard_summary_*.json")))["arena_hard"]
    ax = draw_leaderboard("arena_hard", rows).axes[0]
    assert [p.get_width() for p in ax.patches] == [30.0]
