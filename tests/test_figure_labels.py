"""Figure labels a reader can take at face value: plain numbers on the length histogram's log axis, and the paper's
human evaluation marked as the paper's."""

from __future__ import annotations

from gpt4llm.evaluation import paper_figures as F


def visible_tick_labels(fig) -> list[str]:
    """The y tick labels drawn inside the axis range, major and minor, bottom to top."""
    fig.canvas.draw()
    ax = fig.axes[0]
    low, high = ax.get_ylim()
    ticks = [*ax.yaxis.get_major_ticks(), *ax.yaxis.get_minor_ticks()]
    shown = [(t.get_loc(), t.label1.get_text()) for t in ticks if low <= t.get_loc() <= high and t.label1.get_text()]
    return [text for _, text in sorted(shown)]


def test_the_length_histograms_log_axis_prints_plain_numbers():
    # Counts within one decade: matplotlib's default labelled these "2×10⁰" ... "6×10⁰".
    few = F.draw_output_lengths({"tiny": [10] * 6 + [50] * 2 + [100]})
    assert visible_tick_labels(few) == ["1", "2", "3", "4", "6"]
    many = F.draw_output_lengths({"big": [10] * 600 + [50] * 20 + [100]})
    assert visible_tick_labels(many) == ["1", "10", "100"]


def test_the_papers_human_evaluation_says_it_is_the_papers():
    from gpt4llm.evaluation.paper import hhh_comparisons

    published = hhh_comparisons()[0]
    ours = {key: value for key, value in published.items() if key != "source"}
    assert [fig.get_suptitle() for fig, _ in F.draw_hhh(published)] == [
        "The paper's published numbers (Figure 3), not measured here"
    ] * 2
    assert [fig.get_suptitle() for fig, _ in F.draw_hhh(ours)] == ["", ""]
