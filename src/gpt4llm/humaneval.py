"""Human evaluation: `python -m gpt4llm.humaneval responses=[A.jsonl,B.jsonl]` runs a blind pairwise rating study
in the browser (the paper's Figure 3); `study=<dir> report=true` un-blinds its votes into fractions with confidence
intervals, agreement, and the pies. The study lives in logs/humaneval/<name>/: study.json (items, models, criteria),
votes.sqlite (raters, what each was shown, every vote), votes_held.json (how many votes the store held, so a lost
store is noticed), server.lock (the running server's pid: one server per study), humaneval_report.json and the
figures. The directory is 0700 and every file in it 0600, whatever the umask (gpt4llm.rating.private).

Rater links: a rater's link is their key, and the store keeps only its digest, so a link is printed once, when it is
made. `raters=[ann,bob]` adds those raters and prints their links; a rater who exists already is listed as such
(their link was printed when they were added). `new_links=[ann]` prints a new link for ann and ends her old one
(give it when a rater lost their link; leave it out when starting the study again, or the link is replaced again).
How items are dealt and shown, and who may rate: gpt4llm.rating.web; how votes become numbers:
gpt4llm.rating.humaneval_report."""

from __future__ import annotations

import logging
import re
import shlex
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from gpt4llm.app.cli import hydra_command, reports_user_errors
from gpt4llm.errors import ConfigError

log = logging.getLogger(__name__)


def humaneval(cfg: DictConfig) -> dict | None:
    from gpt4llm.io.study_lock import describe, study_lock
    from gpt4llm.rating.private import owner_only_tree, private_directory, private_file
    from gpt4llm.rating.store import VoteStore
    from gpt4llm.rating.study import load_study, open_or_create

    check_settings(cfg)
    responses = [str(p) for p in cfg.responses]
    if cfg.report:  # a reader: it may run while the study is being served (SQLite's WAL lets it)
        study = load_study(cfg.study)
        owner_only_tree(study.directory)  # this run's Hydra session files too
        store = VoteStore(study.votes_path)
        try:
            return write_report(study, store, cfg)
        finally:
            store.close()
    names = list(cfg.names) if cfg.names else None
    # Owner-only before anything is written: what Hydra wrote there (this session's log and config), what an older
    # version left readable by others, and the lock (study_lock would make it under the umask).
    private_directory(cfg.study)
    owner_only_tree(cfg.study)
    private_file(Path(cfg.study) / "server.lock")
    # One server per study: a second one would deal and count beside the first.
    with study_lock(cfg.study, "server.lock", action="serve this study") as stale:
        if stale:
            log.info(f"Took over the study's lock from {describe(stale)}, which no longer runs")
        study = open_or_create(
            cfg.study, responses, OmegaConf.to_container(cfg.criteria), names, open_signup=cfg.open_signup
        )
        store = VoteStore(study.votes_path)
        serve(study, store, cfg)
    return None


def check_settings(cfg: DictConfig) -> None:
    """Settings that would start a study nobody can rate, or write a report of NaNs, stop here."""
    from gpt4llm.rating.store import normal_name

    def integer(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    per_item = cfg.votes_per_item
    if per_item is not None and not (integer(per_item) and per_item >= 1):
        raise ConfigError(
            f"votes_per_item={per_item}: a whole number of votes, 1 or more (or null: every rater may rate every item)"
        )
    confidence = cfg.confidence
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
        raise ConfigError(f"confidence={confidence}: the intervals' confidence level, between 0 and 1 (e.g. 0.95)")
    if not (integer(cfg.resamples) and cfg.resamples >= 1):
        raise ConfigError(f"resamples={cfg.resamples}: a whole number of bootstrap resamples, 1 or more (e.g. 2000)")
    if cfg.open_signup is not None and not isinstance(cfg.open_signup, bool):
        raise ConfigError(f"open_signup={cfg.open_signup}: true, false, or null (as the study was made)")
    for setting in ("raters", "new_links"):
        for name in cfg.get(setting) or []:
            try:
                normal_name(str(name))
            except ValueError as err:
                raise ConfigError(f"{setting}: {name!r}: {err}") from None


def serve(study, store, cfg: DictConfig) -> None:
    from gpt4llm.rating.web import Rating, RatingServer

    server = RatingServer(Rating(study, store, cfg.votes_per_item), host=cfg.host, port=cfg.port)
    if cfg.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(f"Listening on {cfg.host}: anyone who can reach this machine can open the study's start page")
    print(
        f"Study {study.directory}: {len(study.items)} items, {len(study.tasks)} comparisons of "
        f"{', '.join(study.models)}; {store.count_votes()} votes so far",
        flush=True,
    )
    print(f"Raters start at {server.url}/", flush=True)
    if server.reachable is None:
        print(f"  (listening on every interface: replace {cfg.host} with this machine's address in the links)")
    elif server.reachable != cfg.host:
        print(f"  (listening on every interface; {server.reachable} is this machine's address on its network)")
    for line in rater_links(store, server.url, cfg.raters, cfg.get("new_links") or []):
        print(f"  {line}", flush=True)
    print(f"Sign-up: {signup(study)}", flush=True)
    print(
        f"Stop with Ctrl-C; go on later with: python -m gpt4llm.humaneval study={study.directory}\n"
        f"Results: python -m gpt4llm.humaneval study={study.directory} report=true",
        flush=True,
    )
    try:
        server.serve_until_stopped()
    finally:
        store.close()


def rater_links(store, url: str, raters, new_links) -> list[str]:
    """One line per rater named in `raters` or `new_links`: the link of a rater added now, or a new link (the old one
    ends) for those in `new_links`. The store keeps only digests, so a rater added before is listed without a link."""
    from gpt4llm.rating.store import normal_name

    renew = {normal_name(str(name)) for name in new_links}
    lines, seen = [], set()
    for name in [*map(str, raters), *map(str, new_links)]:
        name = normal_name(name)
        if name in seen:
            continue
        seen.add(name)
        if name in renew:
            existed = store.has_rater(name)
            link = f"{url}/rate/{store.new_link(name)}"
            lines.append(f"{name}: {link}" + (" (a new link: the one given before no longer works)" if existed else ""))
            continue
        token = store.add_rater(name)
        if token is not None:
            lines.append(f"{name}: {url}/rate/{token}")
        else:
            lines.append(
                f"{name}: added before; their link was printed then (only its digest is kept). If it is lost, "
                f"{new_links_override(name)} prints a new one and ends the old"
            )
    return lines


def new_links_override(name: str) -> str:
    """The command-line setting that gives rater `name` a new link, quoted for Hydra and the shell when needed."""
    if re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        return f"new_links=[{name}]"
    quoted = re.sub(r'(\\*)("|$)', lambda m: m[1] * 2 + ('\\"' if m[2] else ""), name)
    return shlex.quote(f'new_links=["{quoted}"]')


def signup(study) -> str:
    if study.open_signup:
        return (
            "open: entering a rater's name on the start page continues as that rater (anyone who knows a name can "
            "read and change that rater's votes)"
        )
    return "closed: the start page makes new raters only; a rater goes on with their own link, which is their key"


def write_report(study, store, cfg: DictConfig) -> dict:
    from gpt4llm.evaluation import paper_figures as F
    from gpt4llm.io.json_files import write_json, write_jsonl
    from gpt4llm.rating.humaneval_report import REPORT_FILE, build_report, unblind
    from gpt4llm.rating.private import owner_only
    from gpt4llm.rating.web import count

    report = build_report(study, store, confidence=cfg.confidence, resamples=cfg.resamples, seed=cfg.seed)
    report["signup"] = signup(study)
    write_jsonl(study.directory / "votes_unblinded.jsonl", unblind(study, store.latest_votes()), private=True)
    path = write_json(study.directory / REPORT_FILE, report, indent=1, private=True)
    print(f"{report['items']} items; report: {path}")
    if study.open_signup:
        print(f"Sign-up was {report['signup']}")
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
                for figure in F.save(fig, study.directory, name, tuple(cfg.formats)):
                    owner_only(figure)  # in the 0700 directory from the start; 0600 like the rest
    print(f"\nFigures in {study.directory} (python -m gpt4llm.plots results={study.directory} draws them too)")
    return report


def _interval(ci) -> str:
    return f" [{100 * ci[0]:.0f}-{100 * ci[1]:.0f}]" if ci else ""


@hydra_command("humaneval")
@reports_user_errors
def main(cfg: DictConfig) -> None:
    humaneval(cfg)


if __name__ == "__main__":
    main()
