"""Evaluate: `python -m gpt4llm.evaluate metric=rouge|judge|reward responses=<responses.jsonl or [a,b,...]>`.

- metric=rouge: ROUGE-1/2/L by reference length, written as the paper's eval_unnatural_instructions/*.json.
- metric=judge: the GPT-4 judge's relative score against metric.opponent, per category and overall.
- metric=reward: rewards of the answers from metric.model (a reward model export); for a best-of-N file
  (gpt4llm.bestofn) the ranking groups 1..N and B, each also written as a responses file for the judge.
Everything goes to the run directory (logs/evaluate/runs/<time>/).
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from gpt4llm.app.cli import hydra_command, reports_user_errors
from gpt4llm.errors import ConfigError, RecordError
from gpt4llm.evaluation.responses import slug
from gpt4llm.io import json_files

log = logging.getLogger(__name__)


def evaluate_rouge_cmd(cfg: DictConfig, answers: list[list[dict]], out: Path) -> dict:
    from gpt4llm.evaluation.rouge import evaluate_rouge, format_table, write_tables

    tables, per_pair, problems = evaluate_rouge(answers, use_stemmer=cfg.metric.use_stemmer)
    files = write_tables(tables, out, cfg.metric.prefix)
    json_files.write_jsonl(out / f"{cfg.metric.prefix}_scores.jsonl", per_pair)
    report = {"use_stemmer": cfg.metric.use_stemmer, "problems": problems, "tables": [str(p) for p in files]}
    json_files.write_json(out / f"{cfg.metric.prefix}_report.json", report, indent=2)
    print(format_table(tables))
    _print_problems(problems)
    print(
        f"\nTables: {out}/{cfg.metric.prefix}_len{{0-2,3-5,6-10,10-,ALL}}.json  "
        f"(per pair: {cfg.metric.prefix}_scores.jsonl)"
    )
    return report


def evaluate_judge_cmd(cfg: DictConfig, answers: list[list[dict]], out: Path) -> list[dict]:
    from gpt4llm.evaluation.judge import judge
    from gpt4llm.evaluation.responses import read_responses
    from gpt4llm.inference.openai_client import check_success, client_from_config

    m = cfg.metric
    questions = None
    if cfg.get("eval"):
        from gpt4llm.evaluation.eval_sets import load_eval_set

        questions = {str(r["id"]): r for r in load_eval_set(**OmegaConf.to_container(cfg.eval, resolve=True))}
    opponent = read_responses(m.opponent) if m.opponent else None
    reviewers = None
    if m.mode == "pairwise":
        from gpt4llm.data.sources import ensure_file
        from gpt4llm.evaluation.judge_prompts import (
            PROMPT_FIELDS,
            REVIEWER_FIELDS,
            FastChatReviewers,
        )

        files = {
            k: ensure_file(**m.fastchat[k], required_fields=f, setting=f"metric.fastchat.{k}.path")
            for k, f in (("prompts", PROMPT_FIELDS), ("reviewers", REVIEWER_FIELDS))
        }
        reviewers = FastChatReviewers.from_files(files["prompts"], files["reviewers"])
    client = client_from_config(m)
    summaries = []
    for mine in answers:
        name = slug(mine[0]["model"])
        reviews, summary = judge(
            client,
            mine,
            opponent,
            m.mode,
            {"temperature": m.temperature, "max_tokens": m.max_tokens},
            m.max_parse_retries,
            questions,
            reviewers,
            m.score_rule,
        )
        summary["judge"] = {"base_url": m.base_url, "model": m.model, "temperature": m.temperature}
        if reviewers is not None:
            summary["judge"]["fastchat_files"] = {
                k: OmegaConf.to_container(m.fastchat[k]) for k in ("prompts", "reviewers")
            }
        json_files.write_jsonl(out / f"judge_reviews_{name}.jsonl", reviews)
        json_files.write_json(out / f"judge_summary_{name}.json", summary, indent=2)
        summaries.append(summary)
        _print_judge(summary)
        _print_problems({name: summary["problems"]})
    print(
        f"\nRequests: {client.stats.as_dict()}\nSummaries: {out}/judge_summary_*.json  (reviews: judge_reviews_*.jsonl)"
    )
    for summary in summaries:
        check_success(
            summary["scored"],
            summary["questions"],
            m.min_success,
            f"reviews of {summary['model']}",
            "run the same command again: failed requests are asked again, answers come from the cache",
        )
    return summaries


def _print_judge(s: dict) -> None:
    def cell(block: dict) -> str:
        if s["opponent"] is None:
            return f"mean {block['mean']:.2f} ({block['scored']} scored)" if block["mean"] is not None else "-"
        a, b = block["totals"]
        rel = f"{block['relative']:.0f}%" if block["relative"] is not None else "-"
        return f"{a:g} : {b:g} = {rel} ({block['scored']} scored)"

    print(f"\n{s['model']} vs {s['opponent'] or '(no opponent)'} ({s['mode']}): {cell(s)}")
    read = ", ".join(f"{n} by {how}" for how, n in s["replies_read"].items() if n)
    print(f"  score rule {s['score_rule']}: replies read {read or 'none'}; unparsable {s['replies_unparsable']}")
    for category, block in s["per_category"].items():
        print(f"  {category:16s} {cell(block)}")


def _print_problems(problems: dict[str, dict]) -> None:
    for model, found in problems.items():
        for reason, info in found.items():
            ids = info.get("first_ids", info.get("ids", []))[:10]
            print(f"  {model}: {info['count']} x {reason}; ids {ids}")


def evaluate_reward_cmd(cfg: DictConfig, paths: list[str], out: Path) -> dict:
    from gpt4llm.evaluation.responses import read_responses
    from gpt4llm.evaluation.reward_summary import (
        is_best_of_n,
        ranking_groups,
        score_answers,
        summarize_rewards,
    )

    summary: dict[str, dict] = {}
    for path in paths:
        if is_best_of_n(path):  # rewards are in the file: summarise the ranking groups, write each for the judge
            for name, answers in ranking_groups(path).items():
                json_files.write_jsonl(out / "ranking_groups" / name / "responses.jsonl", answers)
                summary[name] = summarize_rewards(answers) | {"source": str(path)}
            continue
        if not cfg.metric.model:
            raise ConfigError(f"{path}: scoring answers needs metric.model=<reward model export>")
        answers = read_responses(path)
        for index, answer in enumerate(answers):  # the reward model reads each answer after its own prompt
            if "instruction" not in answer:
                raise RecordError(
                    f"{path}: record {index} has no field 'instruction': the reward model scores an answer with its "
                    "prompt (gpt4llm.generate writes both)"
                )
        for answer, reward in zip(answers, score_answers(cfg.metric.model, answers, cfg.metric.batch_size)):
            answer["reward"] = reward
        name = answers[0]["model"]
        json_files.write_jsonl(
            out / f"reward_scores_{slug(name)}.jsonl",
            [{k: a.get(k) for k in ("id", "model", "category", "reward")} for a in answers],
        )
        summary[name] = summarize_rewards(answers) | {"source": str(path), "reward_model": str(cfg.metric.model)}
    json_files.write_json(out / "reward_summary.json", summary, indent=2)
    print("| model / group | scored | mean reward |\n|---|---:|---:|")
    for name, s in summary.items():
        mean = "-" if s["mean_reward"] is None else f"{s['mean_reward']:.4f}"
        print(f"| {name} | {s['scored']} | {mean} |")
    if (out / "ranking_groups").exists():
        print(
            "\nRanking groups as responses files (judge them with metric=judge): "
            f"{out / 'ranking_groups'}/<group>/responses.jsonl"
        )
    print(f"Summary: {out / 'reward_summary.json'}")
    return summary


def evaluate(cfg: DictConfig):
    from gpt4llm.evaluation.responses import read_responses

    paths = list(cfg.responses) if isinstance(cfg.responses, ListConfig) else [cfg.responses]
    out = Path(cfg.paths.output_dir)
    if cfg.metric.name == "reward":
        return evaluate_reward_cmd(cfg, paths, out)
    answers = [read_responses(p) for p in paths]
    names = [a[0]["model"] for a in answers]
    if len(set(names)) != len(names):
        raise ConfigError(
            f"responses: two files have the same model name ({names}); regenerate one with model.name=..."
        )
    if cfg.metric.name == "rouge":
        return evaluate_rouge_cmd(cfg, answers, out)
    if cfg.metric.name == "judge":
        return evaluate_judge_cmd(cfg, answers, out)
    raise ConfigError(f"metric={cfg.metric.name}: expected rouge, judge or reward")


@hydra_command("evaluate")
@reports_user_errors
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
