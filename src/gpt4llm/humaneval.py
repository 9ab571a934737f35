"""Human evaluation: `python -m gpt4llm.humaneval responses=[A.jsonl,B.jsonl]` runs a blind pairwise rating study
in the browser (the paper's Figure 3); `study=<dir> report=true` un-blinds its votes into fractions with confidence
intervals, agreement, and the pies. The study lives in logs/humaneval/<name>/: study.json (items, models, criteria),
votes.sqlite (raters, what each was shown, every vote), humaneval_report.json and the figures. How items are dealt and
shown: gpt4llm.rating.web; how votes become numbers: gpt4llm.rating.humaneval_report."""

from __future__ import annotations

import json
import logging

import hydra
from omegaconf import DictConfig, OmegaConf

from gpt4llm.app.cli import CONFIG_PATH, reports_user_errors

log = logging.getLogger(__name__)


def humaneval(cfg: DictConfig) -> dict | None:
    from gpt4llm.rating.store import VoteStore
    from gpt4llm.rating.study import load_study, open_or_create

    responses = [str(p) for p in cfg.responses]
    if cfg.report:
        study = load_study(cfg.study)
        store = VoteStore(study.votes_path)
        try:
            return write_report(study, store, cfg)
        finally:
            store.close()
    names = list(cfg.names) if cfg.names else None
    study = open_or_create(cfg.study, responses, OmegaConf.to_container(cfg.criteria), names)
    store = VoteStore(study.votes_path)
    serve(study, store, cfg)
    return None


def serve(study, store, cfg: DictConfig) -> None:
    from gpt4llm.rating.web import Rating, RatingServer

    server = RatingServer(Rating(study, store, cfg.votes_per_item), host=cfg.host, port=cfg.port)
    if cfg.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(f"Listening on {cfg.host}: anyone who can reach this machine can open the study and vote")
    print(
        f"Study {study.directory}: {len(study.items)} items, {len(study.tasks)} comparisons of "
        f"{', '.join(study.models)}; {store.count_votes()} votes so far",
        flush=True,
    )
    print(f"Raters start at {server.url}/", flush=True)
    for name in cfg.raters:
        print(f"  {name}: {server.url}/rate/{store.rater_token(str(name))}", flush=True)
    print(
        f"Stop with Ctrl-C; go on later with: python -m gpt4llm.humaneval study={study.directory}\n"
        f"Results: python -m gpt4llm.humaneval study={study.directory} report=true",
        flush=True,
    )
    try:
        server.serve_until_stopped()
    finally:
        store.close()


def write_report(study, store, cfg: DictConfig) -> dict:
    from gpt4llm.evaluation import paper_figures as F
    from gpt4llm.io.atomic import write_jsonl, write_text
    from gpt4llm.rating.humaneval_report import REPORT_FILE, build_report, unblind
    from gpt4llm.rating.web import count

    report = build_report(study, store, confidence=cfg.confidence, resamples=cfg.resamples, seed=cfg.seed)
    write_jsonl(study.directory / "votes_unblinded.jsonl", unblind(study, store.latest_votes()))
    path = write_text(study.directory / REPORT_FILE, json.dumps(report, indent=1))
    print(f"{report['items']} items; report: {path}")
    for comparison in report["comparisons"]:
        print(f"\n{comparison['model']} vs {comparison['opponent']} ({count(len(comparison['raters']), 'rater')})")
        for criterion, row in comparison["criteria"].items():
            if not row["votes"]:
                print(f"  {criterion}: no votes yet")
                continue
            shares = "  ".join(
                f"{o} {100 * row['fractions'][o]:.1f}%{_interval(row['ci'][o])}" for o in ("win", "lose", "tie")
            )
            kappa = row["agreement"]["fleiss"]
            agreement = (
                f", Fleiss' kappa {kappa['kappa']:.2f} on {kappa['tasks']} shared items"
                if kappa and kappa["kappa"] is not None
                else ""
            )
            print(f"  {criterion}: {shares} ({count(row['votes'], 'vote')}{agreement})")
        if any(row["votes"] for row in comparison["criteria"].values()):
            for fig, name in F.draw_hhh(comparison):
                F.save(fig, study.directory, name, tuple(cfg.formats))
    print(f"\nFigures in {study.directory} (python -m gpt4llm.plots results={study.directory} draws them too)")
    return report


def _interval(ci) -> str:
    return f" [{100 * ci[0]:.0f}-{100 * ci[1]:.0f}]" if ci else ""


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="humaneval")
@reports_user_errors
def main(cfg: DictConfig) -> None:
    humaneval(cfg)


if __name__ == "__main__":
    main()
