"""The figures draw the values of their input files: read back from the drawn matplotlib objects."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import SHARED_DATA
from gpt4llm.data.records import RecordError
from gpt4llm.evaluation import figures as F

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

    expected, legend = [], []
    for model in models:
        for bucket in F.BUCKETS:
            file = ORIGINAL / "eval_unnatural_instructions" / f"gpt4_unnatural_instruction_results_h9000_len{bucket}.json"
            expected.append(next(r["rougeL"] for r in json.loads(file.read_text()) if r["Model"] == model))
        overall = json.loads((ORIGINAL / "eval_unnatural_instructions" / "gpt4_unnatural_instruction_results_h9000_lenALL.json").read_text())
        legend.append(f"{model} (ALL: {next(r['rougeL'] for r in overall if r['Model'] == model):.4f})")
    assert bar_heights(ax) == expected
    assert [t.get_text() for t in ax.get_legend().get_texts()] == legend
    notes = [t.get_text() for t in ax.texts]
    assert "-0.0432" in notes and "+0.0563" in notes  # LLaMA-GPT4 and Alpaca against GPT-4 at 0-2 words
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0-2\n(n=5089)", "3-5\n(n=868)", "6-10\n(n=936)", ">10\n(n=2107)"]


@needs_original
def test_score_distributions_are_drawn_from_the_truncated_lists(tmp_path):
    scores = json.loads((ORIGINAL / "cmp_data_scores.json").read_text())
    n = min(len(v) for v in scores.values())
    fig = F.draw_score_distributions(F.read_score_lists(ORIGINAL / "cmp_data_scores.json"))
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    means = {k: np.mean(v[:n]) for k, v in scores.items()}
    assert labels == [f"{F.SOURCE_NAMES[k]} (mean {m:.2f})" for k, m in means.items()]
    assert f"n={n} each" in ax.get_title() and n == 51183
    for line, (key, values) in zip(ax.lines, scores.items()):  # each curve is a density of that list: area ~1
        x, y = line.get_data()
        assert np.trapezoid(y, x) == pytest.approx(1, abs=0.02)
        assert x[np.argmax(y)] == pytest.approx(np.bincount(np.asarray(values[:n], int)).argmax(), abs=0.25)

    [png, _] = F.save(fig, tmp_path, "dist")
    import matplotlib.image

    pixels = matplotlib.image.imread(png)
    assert pixels.std() > 0.05, "the PNG is blank (the original notebook's bug)"


def test_relative_score_bars_are_labelled_like_the_notebook():
    rows = [("LLaMA-GPT4", 609, 666.5), ("GPT-4", 613, 521)]
    ax = F.draw_relative_scores(rows, "ChatGPT").axes[0]
    assert bar_heights(ax) == pytest.approx([100 * 609 / 666.5, 100 * 613 / 521])
    assert [t.get_text() for t in ax.texts] == ["91%", "609 : 666.5", "118%", "613 : 521"]


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
    cfg = OmegaConf.create({"results": str(results), "data_files": [], "formats": ["png"], "paths": {"output_dir": str(out)}})
    report = plots(cfg)
    assert sorted(p.name for p in out.iterdir()) == ["bar_score_all_vs_ChatGPT.png", "bar_score_ranking_vs_ChatGPT.png", "cmp_seq_len_freq.png"]
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
