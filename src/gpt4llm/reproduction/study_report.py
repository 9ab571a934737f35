"""The study's report: for each of the paper's tables and figures, the paper's value, ours and the difference, each
of ours with the file it was read from; which stages ran, were reused or skipped, and why; and the provenance (the
command, the config, package versions, data digests, hardware, wall times). Written as Markdown (report.md) and as
one self-contained HTML page (report.html, the figures inlined).
"""

from __future__ import annotations

import base64
import html
import json
import os
import platform
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from gpt4llm.data.sources import file_digest
from gpt4llm.evaluation import paper
from gpt4llm.evaluation import paper_figures as F
from gpt4llm.io.atomic import write_text
from gpt4llm.reproduction.runner import Outcome, Status
from gpt4llm.reproduction.study import beyond_method, tuned_models

PACKAGES = (
    "gpt4llm",
    "torch",
    "transformers",
    "lightning",
    "deepspeed",
    "datasets",
    "hydra-core",
    "rouge-score",
    "openai",
    "spacy",
)


@dataclass
class Section:
    title: str
    note: str = ""
    header: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    images: list[Path] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)  # one per image: whose numbers it draws


def _relative(totals) -> float | None:
    return 100 * totals[0] / totals[1] if totals and totals[1] else None


def _score(totals) -> str:
    if not totals:
        return "—"
    value = _relative(totals)
    return f"{totals[0]:g} : {totals[1]:g} = " + ("no relative score" if value is None else f"{value:.0f}%")


def _judged(summary: dict[str, Any]) -> str:
    """Our totals and how many questions were scored, or why none was: "0 : 0" would read as a score."""
    ours = summary.get("totals")
    scored = summary.get("scored", summary.get("n_scored"))
    if ours and scored == 0:
        questions = summary.get("questions", "?")
        unparsable = summary.get("replies_unparsable", 0)
        failed = (summary.get("problems") or {}).get("request failed (left out)", {}).get("count", 0)
        if unparsable and not failed:
            return f"the judge model produced no parsable scores (0 of {questions} questions scored)"
        return (
            f"no scores (0 of {questions} questions scored): failed requests {failed}, unparsable replies {unparsable}"
        )
    return _score(ours) + (f" ({scored} scored)" if scored is not None else "")


def _difference(ours: float | None, theirs: float | None, digits: int, scale: float = 1.0) -> str:
    if ours is None or theirs is None:
        return "—"
    return f"{scale * (ours - theirs):+.{digits}f}"


def _points(difference: str) -> str:
    return difference if difference == "—" else f"{difference} points"


def _where(path: Path, root: Path) -> str:
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def stage_section(outcomes: list[Outcome]) -> Section:
    rows = [
        [
            str(k),
            o.stage.name,
            o.status,
            o.reason or "",
            "" if o.seconds is None else f"{o.seconds:.0f}",
            f"`{o.command}`" if o.command else "",
        ]
        for k, o in enumerate(outcomes, 1)
    ]
    counts = {s: sum(o.status == s for o in outcomes) for s in Status}
    note = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    return Section("Stages", note, ["#", "stage", "status", "why", "seconds", "command"], rows)


def judge_sections(root: Path, preset: DictConfig, outcomes: dict[str, Outcome]) -> list[Section]:
    sections = []
    for opponent in preset.judge.opponents:
        outcome = outcomes.get(f"judge/{opponent}")
        directory = root / "judge" / opponent
        title = f"GPT-4 review on Vicuna-80 against {opponent} (Table b, Figure 4; best-of-N: Table e)"
        done = outcome is not None and (
            outcome.status in (Status.RAN, Status.REUSED)
            or outcome.status == Status.NOT_SELECTED
            and outcome.fingerprint
        )
        if not done:
            why = outcome.reason if outcome else "not in this study"
            rows = [[name, _score(t), "not run", "—", ""] for name, t in paper.RELATIVE.get(opponent, {}).items()]
            sections.append(
                Section(
                    title,
                    f"Not run: {why}. The paper's values:",
                    ["model", "paper", "ours", "difference", "source"],
                    rows,
                )
            )
            continue
        rows = []

        def order(path: Path):  # the study's models first, then the ranking groups 1..N and B
            name = path.stem.removeprefix("judge_summary_")
            return (bool(F.RANKING_MODEL.match(name)), name == "B", int(name[4:]) if name[4:].isdigit() else 0, name)

        for path in sorted(directory.glob("judge_summary_*.json"), key=order):
            summary = F.read_judge_summary(path)
            name = summary["model"]
            published = paper.BEST_OF_N.get(opponent, {}).get(name) or paper.RELATIVE.get(opponent, {}).get(
                paper.RELATIVE_ROWS.get(name, "")
            )
            ours = summary.get("totals")
            label = f"{name} (best-of-N group)" if F.RANKING_MODEL.match(name) else name
            if beyond_method(preset, name):
                label = f"{name} (not in the paper: + {beyond_method(preset, name)})"
            rows.append(
                [
                    label,
                    _score(published) if published else "—",
                    _judged(summary),
                    _points(_difference(_relative(ours), _relative(published), 0)),
                    _where(path, root),
                ]
            )
        note = (
            f"Relative score = Σ model / Σ {opponent} × 100 over the questions both got scores for. "
            f"Judge: {_judge_name(directory)}."
        )
        sections.append(Section(title, note, ["model", "paper", "ours", "difference", "source"], rows))
    return sections


def _judge_name(directory: Path) -> str:
    summaries = sorted(directory.glob("judge_summary_*.json"))
    if not summaries:
        return "—"
    summary = json.loads(summaries[0].read_text())
    judge = summary.get("judge", {})
    how = {"pairwise": "FastChat's pairwise review", "single": "the paper's single-answer prompt"}.get(
        summary.get("mode"), summary.get("mode")
    )
    return (
        f"{judge.get('model')} at {judge.get('base_url')}, {how}, scores read by the {summary.get('score_rule')} rule"
    )


def rouge_section(root: Path, preset: DictConfig) -> Section:
    files = sorted((root / "evaluate" / "rouge").glob("rouge_len*.json"))
    title = "ROUGE-L on Unnatural Instructions by reference length (Table d, Figure 6)"
    if not files:
        return Section(title, "Not run (no rouge_len*.json).")
    ours = F.read_rouge_tables(files)
    rows = []
    for bucket in ("0-2", "3-5", "6-10", "10-", "ALL"):
        extra = tuned_models(preset)
        for model in [*preset.rouge.models, *extra]:
            row = ours.get(model, {}).get(bucket)
            value = row.get("rougeL") if row else None
            theirs = paper.ROUGE_L.get(model, {}).get(bucket)
            rows.append(
                [
                    bucket.replace("10-", ">10"),
                    model,
                    f"{theirs:.4f} (n={paper.ROUGE_BUCKET_SIZES[bucket]})"
                    if theirs is not None
                    else f"not in the paper (+ {beyond_method(preset, model).split()[0]})"
                    if model in extra
                    else "—",
                    f"{value:.4f} (n={row['NumInstance']})" if value is not None else "—",
                    _difference(value, theirs, 4),
                    f"evaluate/rouge/rouge_len{bucket}.json",
                ]
            )
    return Section(title, "", ["length", "model", "paper", "ours", "difference", "source"], rows)


def reward_section(root: Path, preset: DictConfig) -> Section:
    rows = []
    metrics_path = root / "train" / "reward_model" / "metrics.json"
    if metrics_path.exists():
        metrics = json.loads(metrics_path.read_text())
        for key in ("val/rm_acc", "val/loss", "train/loss"):
            if key in metrics:
                rows.append(
                    [f"reward model {key}", "not reported", f"{metrics[key]:.4f}", "train/reward_model/metrics.json"]
                )
    summary_path = root / "evaluate" / "reward" / "reward_summary.json"
    if summary_path.exists():
        for name, s in json.loads(summary_path.read_text()).items():
            mean = s.get("mean_reward")
            method = beyond_method(preset, name)
            rows.append(
                [
                    f"mean reward of {name}'s answers (not in the paper: + {method})"
                    if method
                    else f"mean reward of group {name}",
                    "not reported",
                    "—" if mean is None else f"{mean:.4f}",
                    "evaluate/reward/reward_summary.json",
                ]
            )
    note = "The paper reports no reward-model accuracy (its reward model was never released)."
    return Section("Reward model and best-of-N ranking", note, ["what", "paper", "ours", "source"], rows)


BENCHMARK_TITLES = {"mt_bench": "MT-Bench", "alpaca_eval": "AlpacaEval 2 (LC win rate)", "arena_hard": "Arena-Hard"}


def _benchmark_value(metric: str, s: dict[str, Any]) -> str:
    """One model's result on one benchmark as the report shows it, with what it rests on."""
    if metric == "mt_bench":
        if s.get("score") is None:
            return f"no parsable ratings ({s['rated']} of {s['judgments']} rated)"
        turns = ", ".join(f"turn {t} " + ("-" if s[f"turn_{t}"] is None else f"{s[f'turn_{t}']:.2f}") for t in (1, 2))
        return f"{s['score']:.2f} ({turns}; {s['rated']} of {s['judgments']} rated)"
    if metric == "alpaca_eval":
        if s.get("length_controlled_winrate") is None:
            return f"not computed: {s.get('lc_not_computed', 'no preferences')}"
        lc, wr = s["length_controlled_winrate"], s["win_rate"]
        return f"{lc:.2f} ± {s['lc_standard_error']:.2f} (win rate {wr:.2f}; {s['n_total']} preferences)"
    row = s.get("leaderboard_row")
    if not row:
        return f"no ratings ({s['verdicts']} of {s['games']} games with a verdict)"
    low, high = row["interval"]
    return f"{row['score']:.2f} ({low:+.1f}, {high:+.1f}; {s['verdicts']} of {s['games']} games with a verdict)"


def benchmark_section(root: Path, preset: DictConfig, outcomes: dict[str, Outcome]) -> Section:
    """Beyond the paper: each model's result on today's judge benchmarks, beside their published rows."""
    b = preset.get("benchmarks") or {}
    title = "Beyond the paper: MT-Bench, AlpacaEval 2, Arena-Hard"
    header = ["benchmark", "model", "ours", "published", "source"]
    if not b.get("enabled"):
        return Section(title, "Not run: preset.benchmarks.enabled is false.", header, [])
    rows = []
    for metric in b.metrics:
        name = BENCHMARK_TITLES.get(metric, metric)
        for model in [*b.models, *tuned_models(preset)]:
            stage = f"benchmark/{metric}/{model}"
            path = root / stage / f"{metric}_summary_{model}.json"
            label = f"{model} (+ {beyond_method(preset, model)})" if beyond_method(preset, model) else model
            if path.exists():
                ours = _benchmark_value(metric, json.loads(path.read_text()))
                rows.append([name, label, ours, "—", _where(path, root)])
            else:
                outcome = outcomes.get(stage)
                rows.append([name, label, f"not run: {outcome.reason if outcome else 'not in this study'}", "—", ""])
        for model, value in (b.get("published") or {}).get(metric, {}).items():
            rows.append([name, model, "—", f"{value:g}", "the benchmark's published leaderboard"])
    note = (
        "Not in the paper. Each model answers the benchmark's questions in its own template and is judged by the "
        f"study's judge ({'the served ' + str(preset.judge.serve) if preset.judge.serve else 'by key'}). MT-Bench: "
        "mean rating 1-10; AlpacaEval 2: length-controlled win rate against GPT-4 Turbo (%), ± its standard error; "
        "Arena-Hard: win rate against gpt-4-0314 (%) from Bradley-Terry ratings, with its 95% bootstrap interval."
        + (" The benchmarks' files here are demo stand-ins: the numbers mean nothing." if b.get("demo_files") else "")
    )
    return Section(title, note, header, rows)


def training_section(root: Path, preset: DictConfig, peft: str = "none") -> Section:
    rows = []
    for model in [*preset.sft, "reward_model"]:
        path = root / "train" / model / "metrics.json"
        if path.exists():
            m = json.loads(path.read_text())
            # the final metrics, not where the process's time went (time/*: a machine's, not the model's)
            shown = ", ".join(
                f"{k}={v:.4g}" for k, v in sorted(m.items()) if k != "global_step" and not k.startswith("time/")
            )
            rows.append([model, str(m.get("global_step")), shown, f"train/{model}/metrics.json"])
    how = (
        f"Fine-tuned with adapters (peft={peft}: {'LoRA' if peft == 'lora' else 'QLoRA, a 4-bit base'}), not every "
        "weight as in the paper: the SFT models' numbers are not the paper's setting. "
        if peft != "none"
        else ""
    )
    return Section(
        "Training runs",
        how + "The paper reports no training curves or final losses.",
        ["run", "steps", "final metrics", "source"],
        rows,
    )


def human_section(root: Path, preset: DictConfig) -> Section:
    rows = []
    for (model, opponent), published in paper.HHH.items():
        for criterion in ("helpfulness", "honesty", "harmlessness"):
            win, lose, tie = published[criterion]
            rows.append([f"{model} vs {opponent}", criterion, f"{win:.2f} / {lose:.2f} / {tie:.2f}", "not run"])
    files = [root / "generate" / m / "user_oriented252" / "responses.jsonl" for m in ("LLaMA-GPT4", "Alpaca")]
    note = (
        "Human raters are not part of an automatic study. Run the blind study on this study's answers with "
        f"`python -m gpt4llm.humaneval responses=[{','.join(map(str, files))}]`, then `report=true`."
    )
    return Section(
        "Human evaluation on User-Oriented-252 (Figure 3): % model / opponent / tie",
        note,
        ["comparison", "criterion", "paper", "ours"],
        rows,
    )


def chinese_section() -> Section:
    rows = [[name, _score(totals), "not run"] for name, totals in paper.CHINESE.items()]
    note = (
        "Not part of this study: the Chinese review needs the Vicuna questions translated by GPT-4 (`python -m "
        "gpt4llm.synthesize job=translate`) and a judge. LLaMA-GPT4-CN's answers to the other sets are in "
        "generate/LLaMA-GPT4-CN/."
    )
    return Section(
        "Chinese evaluation, everything in Chinese, against GPT-4 (Table c)", note, ["model", "paper", "ours"], rows
    )


def provenance_section(root: Path, cfg: DictConfig, command: str, outcomes: list[Outcome], wall: float) -> Section:
    import torch

    rows = [
        ["command", f"`{command}`"],
        ["output directory", str(root)],
        ["written", datetime.now(timezone.utc).isoformat(timespec="seconds")],
        ["wall time of this invocation", f"{wall:.0f} s"],
        ["stage time, all stages (reused ones as first run)", f"{sum(o.seconds or 0 for o in outcomes):.0f} s"],
    ]
    for package in PACKAGES:
        try:
            rows.append([f"package {package}", version(package)])
        except PackageNotFoundError:
            pass
    gpus = [torch.cuda.get_device_name(k) for k in range(torch.cuda.device_count())]
    rows += [
        ["python", platform.python_version()],
        ["machine", f"{platform.platform()}, {os.cpu_count()} CPUs"],
        ["GPUs", ", ".join(gpus) or "none"],
    ]
    for name, path in data_files(root, outcomes).items():
        rows.append([f"data {name}", f"{path} sha256:{file_digest(path, 'sha256')[:16]}…"])
    rows.append(["config", "config.yaml beside this report (the preset, resolved)"])
    return Section("Provenance", "", ["what", "value"], rows)


def data_files(root: Path, outcomes: list[Outcome]) -> dict[str, Path]:
    """The data and eval files the stages read, from each stage's saved Hydra config."""
    found = {}
    for o in outcomes:
        saved = root / o.stage.name / ".hydra" / "config.yaml"
        if not saved.exists():
            continue
        conf = OmegaConf.load(saved)
        for key in ("data.path", "eval.path"):
            try:
                value = OmegaConf.select(conf, key)
            except Exception:  # an interpolation only Hydra's runtime resolves: nothing to read
                continue
            if value and Path(str(value)).is_file():
                found[f"{o.stage.name} {key.split('.')[0]}"] = Path(str(value))
    return found


def figures_section(root: Path, preset: DictConfig) -> Section:
    images = sorted((root / "plots").glob("*.png"))
    opponents = [str(o) for o in preset.judge.opponents]
    return Section(
        "Figures",
        f"{len(images)} figures from `plots/` (PNG and PDF there), each captioned with whose numbers it draws.",
        images=images,
        captions=[figure_caption(image.stem, opponents) for image in images],
    )


def figure_caption(name: str, opponents: list[str]) -> str:
    """Whose numbers a figure draws, from its file name (gpt4llm.plots names them): the paper's published numbers
    are drawn beside this study's measured ones, and a reader must not take one for the other."""
    if name.startswith(("pie_", "bar_hhh_")):
        if name.endswith("_paper"):
            return (
                "The paper's published human evaluation (Figure 3), drawn for comparison: not measured by this study."
            )
        return "Human ratings of this study's answers (Figure 3), from a `humaneval_report.json` under this study."
    if name == "bar_unnatural":
        return (
            "This study's ROUGE-L by reference length (Figure 6), measured by stage evaluate/rouge on its models' "
            "answers; the paper's values are in the ROUGE-L table above."
        )
    if match := re.fullmatch(r"bar_score_(all|ranking)_vs_(.+)", name):
        opponent = next((o for o in opponents if F.slug(o) == match[2]), match[2])
        whose = (
            "the best-of-N ranking groups (stages bestofn, evaluate/reward)" if match[1] == "ranking" else "its models"
        )
        return (
            f"This study's relative scores of {whose} against {opponent} (Figure 4), measured by stage "
            f"judge/{opponent}; the paper's are in the review table above."
        )
    if name.startswith("cmp_data_dist"):
        return "GPT-4 score distributions (Figure 2) from a `cmp_data_scores.json` in this study's directory."
    if name == "cmp_seq_len_freq":
        return (
            "The lengths in words of this study's generated answers (the axes of the paper's Figure 1d): every "
            "`responses.jsonl` of the generate stages and of evaluate/reward's ranking groups; not the paper's data."
        )
    return "Drawn by stage plots from the result files in this study's directory."


def build(root: Path, cfg: DictConfig, outcomes: list[Outcome], command: str, wall: float) -> list[Section]:
    by_name = {o.stage.name: o for o in outcomes}
    p = cfg.preset
    return [
        *judge_sections(root, p, by_name),
        rouge_section(root, p),
        reward_section(root, p),
        benchmark_section(root, p, by_name),
        training_section(root, p, cfg.peft.name if cfg.get("peft") else "none"),
        human_section(root, p),
        chinese_section(),
        figures_section(root, p),
        stage_section(outcomes),
        provenance_section(root, cfg, command, outcomes, wall),
    ]


def to_markdown(title: str, intro: str, sections: list[Section]) -> str:
    lines = [f"# {title}", "", intro, ""]
    for s in sections:
        lines += [f"## {s.title}", ""]
        if s.note:
            lines += [s.note, ""]
        if s.header:
            lines += ["| " + " | ".join(s.header) + " |", "|" + "---|" * len(s.header)]
            lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in s.rows]
            lines.append("")
        for image, caption in zip(s.images, s.captions or [""] * len(s.images)):
            lines += [f"![{image.stem}](plots/{image.name})", ""] + ([f"*{caption}*", ""] if caption else [])
    return "\n".join(lines)


def to_html(title: str, intro: str, sections: list[Section]) -> str:
    def cell(text: str) -> str:  # Markdown's `code` spans as <code>, everything escaped
        return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))

    parts = [
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>",
        "<style>body{font:14px/1.45 system-ui,sans-serif;max-width:80rem;margin:2rem auto;padding:0 1rem}"
        "table{border-collapse:collapse;margin:.5rem 0 1.5rem}td,th{border:1px solid #ccc;padding:.25rem .5rem;"
        "vertical-align:top;text-align:left}code{font-size:12px;word-break:break-all}"
        "figure{display:inline-block;width:48%;margin:.5rem 1% .5rem 0;vertical-align:top}"
        "figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:12px}</style></head><body>",
        f"<h1>{html.escape(title)}</h1><p>{cell(intro)}</p>",
    ]
    for s in sections:
        parts.append(f"<h2>{html.escape(s.title)}</h2>")
        if s.note:
            parts.append(f"<p>{cell(s.note)}</p>")
        if s.header:
            parts.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in s.header) + "</tr>")
            parts += ["<tr>" + "".join(f"<td>{cell(c)}</td>" for c in row) + "</tr>" for row in s.rows]
            parts.append("</table>")
        for image, caption in zip(s.images, s.captions or [""] * len(s.images)):
            data = base64.b64encode(image.read_bytes()).decode()  # inlined: the page is one file that opens anywhere
            parts.append(
                f'<figure><img alt="{html.escape(image.stem)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{cell(caption)}</figcaption></figure>"
            )
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(root: Path, cfg: DictConfig, outcomes: list[Outcome], command: str, wall: float) -> dict[str, Any]:
    sections = build(root, cfg, outcomes, command, wall)
    title = f"Instruction Tuning with GPT-4, reproduced: preset {cfg.preset.name}"
    intro = " ".join(str(cfg.preset.about).split())
    write_text(root / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    md = write_text(root / "report.md", to_markdown(title, intro, sections))
    page = write_text(root / "report.html", to_html(title, intro, sections))
    return {"markdown": md, "html": page, "sections": [s.title for s in sections]}
