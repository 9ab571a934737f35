"""Plots: `python -m gpt4llm.plots results=DIR` (or results=[DIR1,DIR2]) redraws the paper's figures from the result
files it finds under DIR, and says which figures it drew and which inputs were missing.

`results=../shared/data/gpt4llm_plots` redraws Figure 6 and the score distributions from the original data; a
directory of `gpt4llm.evaluate` runs (logs/evaluate) adds your models' ROUGE tables and judge results, and one of
`gpt4llm.generate` runs (logs/generate) their output lengths. PNG and PDF go to logs/plots/runs/<time>/.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

from omegaconf import DictConfig, ListConfig

from gpt4llm.app.cli import hydra_command, reports_user_errors


def plots(cfg: DictConfig) -> dict[str, list[str]]:
    from gpt4llm.evaluation import paper_figures as F
    from gpt4llm.evaluation.responses import read_responses

    directories = [Path(d) for d in (cfg.results if isinstance(cfg.results, ListConfig) else [cfg.results])]
    from gpt4llm.evaluation.paper_figures import find_inputs

    found = find_inputs(directories)
    out, formats = Path(cfg.paths.output_dir), tuple(cfg.formats)
    drawn: dict[str, list[str]] = {}
    missing: list[str] = []

    # Figure 6: every table set found, in one figure, so your model sits beside the paper's.
    if found["rouge"]:
        sets: dict[tuple[Path, str], list[Path]] = defaultdict(list)
        for path in found["rouge"]:
            sets[(path.parent, F.TABLE_FILE.match(path.name)["prefix"])].append(path)
        models: dict[str, dict] = {}
        for (parent, prefix), files in sets.items():
            for name, rows in F.read_rouge_tables(files).items():
                models[name if name not in models else f"{name} ({parent.name}/{prefix})"] = rows
        drawn["ROUGE-L by reference length (Figure 6)"] = _save(
            F.draw_rouge_by_length(models), out, "bar_unnatural", formats
        )
    else:
        missing.append(
            "Figure 6: no *_len{0-2,3-5,6-10,10-,ALL}.json ROUGE tables (python -m gpt4llm.evaluate metric=rouge)"
        )

    if found["scores"]:
        for k, path in enumerate(found["scores"]):
            fig = F.draw_score_distributions(F.read_score_lists(path))
            drawn[f"score distributions (Figure 2) from {path}"] = _save(
                fig, out, "cmp_data_dist" + (f"_{k}" if k else ""), formats
            )
    else:
        missing.append("Figure 2: no cmp_data_scores.json")

    # Figure 4: one chart per opponent; best-of-N groups (models named rank1..rankN, B) get their own.
    bars: dict[tuple[str, str], list] = defaultdict(list)
    for path in found["judge"]:
        s = F.read_judge_summary(path)
        if s["opponent"] is None or not s.get("totals"):
            missing.append(f"{path}: no opponent, so no relative score to draw")
            continue
        if not s["totals"][1]:
            missing.append(
                f"{path}: no question got scores ({s.get('scored', 0)} scored), so no relative score to draw"
            )
            continue
        kind = "ranking" if F.RANKING_MODEL.match(s["model"]) else "all"
        bars[(kind, s["opponent"])].append((s["model"], *s["totals"]))
    for (kind, opponent), rows in sorted(bars.items()):
        if kind == "ranking":
            rows.sort(key=lambda r: (r[0].upper() == "B", int(re.sub(r"\D", "", r[0]) or 0)))
        drawn[f"relative scores ({kind}) vs {opponent} (Figure 4)"] = _save(
            F.draw_relative_scores(rows, opponent), out, f"bar_score_{kind}_vs_{F.slug(opponent)}", formats
        )
    if not found["judge"]:
        missing.append("Figure 4: no judge_summary*.json (python -m gpt4llm.evaluate metric=judge)")

    # Figure 3: each study's comparisons, and the paper's published fractions when asked for.
    comparisons = [(path.parent.name, c) for path in found["humaneval"] for c in F.read_humaneval_report(path)]
    if cfg.get("paper"):
        from gpt4llm.evaluation.paper import hhh_comparisons

        comparisons += [("paper", c) for c in hhh_comparisons()]
    for source, comparison in comparisons:
        for fig, name in F.draw_hhh(comparison):
            drawn[f"human evaluation {name} from {source} (Figure 3)"] = _save(fig, out, f"{name}_{source}", formats)
    if not comparisons:
        missing.append(
            "Figure 3: no humaneval_report.json (python -m gpt4llm.humaneval ... report=true); "
            "paper=true draws the paper's"
        )

    # The judge benchmarks: a leaderboard of the models evaluated so far, a table and a figure each.
    from gpt4llm.evaluation.benchmark_figures import draw_leaderboard, leaderboard_rows, leaderboard_table

    for benchmark, rows in leaderboard_rows(found["benchmarks"]).items():
        table = leaderboard_table(benchmark, rows)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"leaderboard_{benchmark}.md").write_text(table)
        print(f"\n{table}")
        drawn[f"{benchmark} leaderboard ({len(rows)} models; table leaderboard_{benchmark}.md)"] = _save(
            draw_leaderboard(benchmark, rows), out, f"leaderboard_{benchmark}", formats
        )
    if not found["benchmarks"]:
        missing.append("judge benchmarks: no *_summary_*.json (python -m gpt4llm.evaluate metric=mt_bench|...)")

    lengths: dict[str, list[int]] = {}
    for path in found["responses"]:
        answers = read_responses(path)
        lengths[answers[0]["model"]] = [len(a["response"].split()) for a in answers]
    for path in cfg.data_files:
        from gpt4llm.data.records import load_instruction_records

        records, _ = load_instruction_records(path, skip_invalid=True)
        lengths[Path(path).stem] = [len(r["output"].split()) for r in records]
    if lengths:
        drawn["output lengths (Figure 1d)"] = _save(F.draw_output_lengths(lengths), out, "cmp_seq_len_freq", formats)
    else:
        missing.append("Figure 1d: no responses.jsonl under results and no data_files")

    print(f"\nFigures in {out}:")
    for what, paths in drawn.items():
        print(f"  {what}: {', '.join(Path(p).name for p in paths)}")
    for what in missing:
        print(f"  not drawn: {what}")
    return {"drawn": [p for paths in drawn.values() for p in paths], "missing": missing}


def _save(fig, out: Path, name: str, formats: tuple[str, ...]) -> list[str]:
    from gpt4llm.evaluation.paper_figures import save

    return [str(p) for p in save(fig, out, name, formats)]


@hydra_command("plots")
@reports_user_errors
def main(cfg: DictConfig) -> None:
    plots(cfg)


if __name__ == "__main__":
    main()
