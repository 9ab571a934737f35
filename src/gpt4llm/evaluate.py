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


BENCHMARKS = ("mt_bench", "alpaca_eval", "arena_hard")


def benchmark_answer_files(cfg: DictConfig, write) -> list[str]:
    """The answers files a judge benchmark scores: `responses`, or, with model.path, the model's answers written by
    `write(model, tokenizer, prompt format, directory)` under logs/generate/<benchmark>/<model name>/ (resumable)."""
    if cfg.responses and cfg.model.path:
        raise ConfigError("give responses=<answers file> or model.path=<export>, not both")
    if cfg.responses:
        return list(cfg.responses) if isinstance(cfg.responses, ListConfig) else [cfg.responses]
    if not cfg.model.path:
        raise ConfigError(
            f"metric={cfg.metric.name} needs the answers: model.path=<export> to write them, or responses=<file>"
        )
    from gpt4llm.inference.resumable_generation import load_generator

    directory = Path(cfg.answers_dir)
    claimed_by(directory, str(Path(cfg.model.path).resolve()))
    model, tokenizer, fmt = load_generator(
        cfg.model.path, cfg.model.dtype, cfg.model.device, cfg.model.tokenizer, cfg.engine
    )
    return [str(write(model, tokenizer, fmt, directory))]


def distinct_models(names: list[str], paths: list) -> None:
    """Several answer files are several models: two with one name would be merged into one model's results."""
    seen: dict[str, str] = {}
    for name, path in zip(names, paths):
        if name in seen:
            raise ConfigError(
                f"{path} and {seen[name]} are both answers of model {name!r}: give one another name (the 'model' of "
                "its lines, or model.name= when it was generated)"
            )
        seen[name] = str(path)


def claimed_by(directory: Path, model_path: str) -> None:
    """Answers continue only the run of the same model: the directory records which export wrote its answers, and
    another export of the same name (retrained, say) is refused rather than mixed in."""
    marker = directory / "model.json"
    if marker.exists():
        owner = json_files.read_json_records(marker)[0].get("model_path")
        if owner != model_path:
            raise ConfigError(
                f"{directory} holds the answers of {owner}, not {model_path}: set model.name=<another name> (or "
                "answers_dir=...), or delete that directory to answer again"
            )
        return
    directory.mkdir(parents=True, exist_ok=True)
    json_files.write_json(marker, {"model_path": model_path})


def evaluate_mt_bench_cmd(cfg: DictConfig, out: Path) -> list[dict]:
    from gpt4llm.evaluation import mt_bench as MT
    from gpt4llm.evaluation.judge_runs import ask_judge, confirm_cost, estimate_cost, say_failures, write_scalars
    from gpt4llm.inference.openai_client import ChatError, check_success, client_from_config
    from gpt4llm.inference.resumable_generation import answer_turns

    m = cfg.metric
    files = _judge_files(m)
    questions = MT.load_questions(files["questions"])
    prompts = MT.load_judge_prompts(files["judge_prompts"])
    references = MT.load_reference_answers(files["reference_answers"])

    def write(model, tokenizer, fmt, directory):
        a = m.answers
        decoding = {"max_new_tokens": int(a.max_new_tokens), "do_sample": False, "num_samples": 1}
        return answer_turns(
            model, tokenizer, fmt, questions, directory, decoding, a.batch_size, a.seed, cfg.model.name, "MT-Bench"
        )

    paths = benchmark_answer_files(cfg, write)
    models = [MT.read_answers(p, questions) for p in paths]
    distinct_models([name for name, _ in models], paths)
    client = client_from_config(m)
    params = {"temperature": m.temperature, "max_tokens": m.max_tokens}
    requests = {name: MT.judge_requests(questions, answers, prompts, references) for name, answers in models}
    everything = [r for rs in requests.values() for r in rs]
    confirm_cost(estimate_cost(client, everything, params, m.judgment_tokens), m.max_cost, "MT-Bench")
    answered = ask_judge(client, everything, params, "MT-Bench judge")
    say_failures(answered, "MT-Bench judge")
    replies = iter(answered)
    summaries = []
    for name, model_requests in requests.items():
        judgments = []
        for r in model_requests:
            reply = next(replies)
            failed = isinstance(reply, ChatError)
            score = None if failed else MT.parse_rating(reply.text)
            user = r["messages"][1]["content"]
            judgments.append(  # FastChat's judgment layout (show_result.py reads it; -1: no rating)
                {"question_id": r["question_id"], "model": name, "judge": [m.model, r["prompt"]], "user_prompt": user}
                | {"judgment": "" if failed else reply.text, "score": -1 if score is None else score, "turn": r["turn"]}
                | {"category": r["category"]}
                | ({"error": str(reply)} if failed else {})
            )
        json_files.write_jsonl(out / f"mt_bench_judgments_{slug(name)}.jsonl", judgments)
        summary = MT.summarize([j | {"score": None if j["score"] == -1 else j["score"]} for j in judgments], name)
        summary["judge"] = {"base_url": m.base_url, "model": m.model, "files": OmegaConf.to_container(m.files)}
        json_files.write_json(out / f"mt_bench_summary_{slug(name)}.json", summary, indent=2)
        summaries.append(summary)
    write_scalars(out, {f"mt_bench/{s['model']}/{k}": s[k] for s in summaries for k in ("score", "turn_1", "turn_2")})
    figure = MT.radar_plot(summaries, out / "mt_bench_radar.png")
    _print_mt_bench(summaries)
    print(f"\nRequests: {client.stats.as_dict()}\nSummaries: {out}/mt_bench_summary_*.json  (radar: {figure})")
    for s in summaries:
        check_success(
            s["rated"],
            s["judgments"],
            m.min_success,
            f"MT-Bench ratings of {s['model']}",
            "run the same command again: failed requests are asked again, answers come from the cache",
        )
    return summaries


def _print_mt_bench(summaries: list[dict]) -> None:
    def cell(x):
        return "-" if x is None else f"{x:.2f}"

    categories = sorted({c for s in summaries for c in s["per_category"]})
    print("\n| model | MT-Bench | turn 1 | turn 2 |" + "".join(f" {c} |" for c in categories))
    print("|---" * (4 + len(categories)) + "|")
    for s in sorted(summaries, key=lambda s: -(s["score"] or 0)):
        per = "".join(f" {cell(s['per_category'].get(c, {}).get('score'))} |" for c in categories)
        print(f"| {s['model']} | {cell(s['score'])} | {cell(s['turn_1'])} | {cell(s['turn_2'])} |{per}")
    for s in summaries:
        if s["unparsable"] or s["failed"]:
            print(
                f"  {s['model']}: {len(s['unparsable'])} unparsable judgments {s['unparsable'][:10]}, "
                f"{len(s['failed'])} failed requests {s['failed'][:10]}"
            )


def _single_turn_writer(cfg: DictConfig, records: list[dict], title: str):
    """`write` for benchmark_answer_files: greedy answers to `records` through the engine, resumable."""
    from gpt4llm.inference.resumable_generation import generate_to_file

    def write(model, tokenizer, fmt, directory):
        a = cfg.metric.answers
        decoding = {"max_new_tokens": int(a.max_new_tokens), "do_sample": False, "num_samples": 1}
        path = directory / "responses.jsonl"
        counts = generate_to_file(
            model,
            tokenizer,
            records,
            path,
            decoding,
            a.batch_size,
            extra={"model": cfg.model.name},
            progress=f"{title} / {cfg.model.name}",
            prompt_format=fmt,
            seed=a.seed,
        )
        log.info(f"{title} answers: {counts}")
        return path

    return write


def _judge_files(m: DictConfig) -> dict[str, Path]:
    from gpt4llm.data.sources import ensure_file

    return {k: ensure_file(**m.files[k], setting=f"metric.files.{k}.path") for k in m.files}


def evaluate_arena_hard_cmd(cfg: DictConfig, out: Path) -> list[dict]:
    import yaml

    from gpt4llm.evaluation import arena_hard as AH
    from gpt4llm.evaluation.judge_runs import (
        ask_judge,
        confirm_cost,
        estimate_cost,
        read_benchmark_answers,
        say_failures,
        write_scalars,
    )
    from gpt4llm.inference.openai_client import ChatError, check_success, client_from_config

    m = cfg.metric
    files = _judge_files(m)
    questions = {}
    for index, q in enumerate(json_files.read_json_records(files["questions"])):
        try:
            questions[str(q["question_id"])] = (q["turns"][0]["content"], q.get("cluster", q.get("category")))
        except (KeyError, IndexError, TypeError):
            raise RecordError(
                f"{files['questions']}: line {index + 1}: expected question_id, turns[0].content"
            ) from None
    ids = list(questions)
    judge_cfg = yaml.safe_load(files["judge_config"].read_text())
    try:
        system, template = judge_cfg["system_prompt"], judge_cfg["prompt_template"]
        pattern, attempts = judge_cfg["regex_pattern"], int(judge_cfg.get("number_of_judgment_attempts", 1))
        params = {"temperature": judge_cfg["temperature"], "max_tokens": judge_cfg["max_tokens"]}
    except (KeyError, TypeError) as err:
        raise RecordError(f"{files['judge_config']}: key {err} is missing (Arena-Hard's judge_config has it)") from None
    template = template[0] if isinstance(template, list) else template  # the v0.1 file holds a one-item list
    _, baseline = read_benchmark_answers(files["baseline_answers"], ids, "Arena-Hard")
    records = [{"id": qid, "instruction": text, "input": "", "category": c} for qid, (text, c) in questions.items()]
    paths = benchmark_answer_files(cfg, _single_turn_writer(cfg, records, "Arena-Hard"))
    models = [read_benchmark_answers(p, ids, "Arena-Hard") for p in paths]
    distinct_models([name for name, _ in models], paths)
    games = [
        {"model": name, "question_id": qid, "messages": messages}
        for name, answers in models
        for qid in ids
        for messages in AH.pairwise_messages(system, template, questions[qid][0], baseline[qid], answers[qid])
    ]
    client = client_from_config(m)
    confirm_cost(estimate_cost(client, games, params, m.judgment_tokens), m.max_cost, "Arena-Hard")
    replies: list[list[str]] = [[] for _ in games]
    errors: dict[int, str] = {}
    todo = list(range(len(games)))
    for attempt in range(attempts):  # v0.1: a judgment without a verdict is continued, the reply kept as its turn
        asked = [{"messages": games[i]["messages"] + _continued(replies[i], AH.RETRY_PROMPT)} for i in todo]
        label = "Arena-Hard judge" + (f" (continuing {len(todo)} without a verdict)" if attempt else "")
        answered = ask_judge(client, asked, params, label)
        say_failures(answered, label)
        for i, reply in zip(todo, answered):
            if isinstance(reply, ChatError):
                errors[i] = str(reply)
            else:
                replies[i].append(reply.text)
        todo = [i for i in todo if i not in errors and AH.needs_retry("\n" + "\n".join(replies[i]), pattern)]
        if not todo:
            break
    judgments: dict[tuple[str, str], dict] = {}
    for i, game in enumerate(games):
        text = "".join("\n" + r for r in replies[i])
        record = judgments.setdefault(
            (game["model"], game["question_id"]),
            {"question_id": game["question_id"], "model": game["model"], "judge": m.model, "games": []},
        )
        record["games"].append(
            {"user_prompt": game["messages"][-1]["content"], "judgment": text}
            | {"score": None if i in errors else AH.parse_verdict(text, pattern)}
            | ({"error": errors[i]} if i in errors else {})
        )
    try:
        battles = AH.battles(list(judgments.values()), baseline=m.baseline, weight=m.weight)
        table = AH.leaderboard(battles, m.baseline, m.rounds, m.seed)
    except RecordError as why:  # no verdict to rate (a judge that gives none), or ratings that cannot be fit
        print(f"\nArena-Hard: no ratings: {why}")
        table = []
    styled = None
    if m.style_control and table:
        styled = _arena_style_board(AH, m, list(judgments.values()), baseline, models, ids)
        json_files.write_json(out / "arena_hard_style_leaderboard.json", styled, indent=2)
    summaries = []
    for name, _ in models:
        mine = [j for (model, _), j in judgments.items() if model == name]
        json_files.write_jsonl(out / f"arena_hard_judgments_{slug(name)}.jsonl", mine)
        row = next((r for r in table if r["model"] == name), None)
        unread = [
            f"{j['question_id']}/game {g + 1}" for j in mine for g, x in enumerate(j["games"]) if x["score"] is None
        ]
        summary = {
            "model": name,
            "baseline": m.baseline,
            "games": 2 * len(mine),
            "verdicts": 2 * len(mine) - len(unread),
        }
        summary |= {"no_verdict": unread, "leaderboard_row": row, "judge": {"base_url": m.base_url, "model": m.model}}
        if styled:
            summary["style_control"] = {"control": styled["control"], "coefficients": styled["displayed"]}
            summary["style_control"]["row"] = next((r for r in styled["rows"] if r["model"] == name), None)
        json_files.write_json(out / f"arena_hard_summary_{slug(name)}.json", summary, indent=2)
        summaries.append(summary)
    json_files.write_json(out / "arena_hard_leaderboard.json", table, indent=2)
    write_scalars(out, {f"arena_hard/{r['model']}/score": r["score"] for r in table if r["model"] != m.baseline})
    print(f"\n| model | Arena-Hard score (vs {m.baseline}) | 95% CI | rating | battles |\n|---|---:|---|---:|---:|")
    for r in table:
        rating = "-" if r["rating"] is None else f"{r['rating']:.0f}"
        print(
            f"| {r['model']} | {r['score']:.1f} | ({r['interval'][0]:+.1f}, {r['interval'][1]:+.1f}) | "
            f"{rating} | {r['battles']} |"
        )
    if styled:
        print(f"\nWith {styled['control']} control (coefficients {styled['displayed']}):")
        for r in styled["rows"]:
            print(f"| {r['model']} | {r['score']:.1f} | ({r['interval'][0]:+.1f}, {r['interval'][1]:+.1f}) |")
    if table and table[0].get("skipped_rounds"):
        print(f"  {table[0]['skipped_rounds']} of {m.rounds} bootstrap resamples had one outcome and were skipped")
    for r in table:
        if r.get("one_outcome"):
            print(f"  {r['model']}: {r['one_outcome']}")
    for s in summaries:
        if s["no_verdict"]:
            print(f"  {s['model']}: {len(s['no_verdict'])} games without a verdict, not scored: {s['no_verdict'][:10]}")
    print(f"\nRequests: {client.stats.as_dict()}\nLeaderboard: {out}/arena_hard_leaderboard.json")
    for s in summaries:
        check_success(
            s["verdicts"],
            s["games"],
            m.min_success,
            f"Arena-Hard verdicts of {s['model']}",
            "run the same command again: failed requests are asked again, answers come from the cache",
        )
    return table


def _arena_style_board(AH, m: DictConfig, judgments: list[dict], baseline: dict, models: list, ids: list) -> dict:
    """show_result's --style-control (or --length-control-only, --markdown-control-only): the answers' lengths in
    tokens (tiktoken's, as Arena-Hard counts them) and markdown counts, the baseline's and each model's."""
    from gpt4llm.evaluation.answer_style import style_features, tiktoken_counter

    count = tiktoken_counter()
    features = {m.baseline: {qid: style_features(baseline[qid], count) for qid in ids}}
    features |= {name: {qid: style_features(answers[qid], count) for qid in ids} for name, answers in models}
    battles = AH.battles(judgments, baseline=m.baseline, weight=m.weight, features=features)
    return AH.style_leaderboard(battles, m.baseline, control=m.style_control, rounds=m.rounds, seed=m.seed)


def _continued(replies: list[str], prompt: str) -> list[dict]:
    """The judge's earlier replies to a game, each followed by the request to finish with a verdict."""
    return [
        turn for r in replies for turn in ({"role": "assistant", "content": r}, {"role": "user", "content": prompt})
    ]


def evaluate_alpaca_eval_cmd(cfg: DictConfig, out: Path) -> list[dict]:
    import math

    import pandas as pd

    from gpt4llm.evaluation import alpaca_eval as AE
    from gpt4llm.evaluation.judge_runs import (
        ask_judge,
        confirm_cost,
        estimate_cost,
        read_benchmark_answers,
        say_failures,
        write_scalars,
    )
    from gpt4llm.inference.openai_client import ChatError, check_success, client_from_config

    m = cfg.metric
    files = _judge_files(m)
    template = files["prompt"].read_text(encoding="utf-8")
    baseline = json_files.read_json_records(files["baseline_outputs"])
    for index, b in enumerate(baseline):
        if not isinstance(b, dict) or not all(isinstance(b.get(k), str) for k in ("instruction", "output")):
            raise RecordError(f"{files['baseline_outputs']}: record {index}: expected 'instruction' and 'output'")
    ids = [str(i) for i in range(len(baseline))]
    records = [{"id": i, "instruction": b["instruction"], "input": ""} for i, b in enumerate(baseline)]
    paths = benchmark_answer_files(cfg, _single_turn_writer(cfg, records, "AlpacaEval"))
    by_instruction = {b["instruction"]: str(i) for i, b in enumerate(baseline)}
    models = []
    for path in paths:
        rows = json_files.read_json_records(path)
        if rows and isinstance(rows[0], dict) and "output" in rows[0] and "instruction" in rows[0]:
            models.append(_alpaca_eval_outputs(path, rows, by_instruction))  # alpaca_eval's model_outputs.json
        else:
            models.append(read_benchmark_answers(path, ids, "AlpacaEval"))
    distinct_models([name for name, _ in models], paths)
    params = dict(OmegaConf.to_container(m.params))
    examples = []
    for name, answers in models:
        for i, b in enumerate(baseline):
            switched = AE.is_switched(b["instruction"])
            shown = (answers[str(i)], b["output"]) if switched else (b["output"], answers[str(i)])
            example = {"model": name, "index": i, "switched": switched, "output_2": answers[str(i)]}
            if b["output"] != answers[str(i)]:  # alpaca_eval never asks about identical outputs: a draw
                example["messages"] = AE.judge_messages(template, b["instruction"], *shown)
            examples.append(example)
    asked = [e for e in examples if "messages" in e]
    client = client_from_config(m)
    confirm_cost(estimate_cost(client, asked, params, m.judgment_tokens), m.max_cost, "AlpacaEval")
    replies = ask_judge(client, asked, params, "AlpacaEval judge")
    refused = [i for i, r in enumerate(replies) if isinstance(r, ChatError) and "logprobs" in str(r)]
    if refused and params.get("logprobs"):  # a judge without them (gpt4llm.serve, most local servers): the letter
        plain = {k: v for k, v in params.items() if k not in ("logprobs", "top_logprobs")}
        print(f"The judge refuses log-probabilities ({str(replies[refused[0]])[:120]}): asking for the letter alone")
        for i, reply in zip(refused, ask_judge(client, [asked[i] for i in refused], plain, "AlpacaEval judge")):
            replies[i] = reply
    say_failures(replies, "AlpacaEval judge")
    for example, reply in zip(asked, replies):
        if isinstance(reply, ChatError):
            example |= {"error": str(reply), "preference": math.nan}
            continue
        content = (reply.logprobs or {}).get("content") or []
        if content and content[0].get("top_logprobs"):
            example |= {"read_by": "logprobs", "preference": AE.preference_from_logprobs(content[0]["top_logprobs"])}
        else:  # no log-probabilities: the binarized reading of the text
            read = AE.preference_from_text(reply.text)
            example |= {"read_by": "text", "preference": math.nan if read is None else read, "reply": reply.text}
        example["preference"] = AE.unswitch(example["preference"], example["switched"])
    gamed = pd.read_csv(files["gamed"])
    summaries = []
    for name, _ in models:
        annotations = [
            {"index": e["index"], "instruction": baseline[e["index"]]["instruction"]}
            | {"output_1": baseline[e["index"]]["output"], "output_2": e["output_2"]}
            | {"generator_1": baseline[e["index"]].get("generator", "baseline"), "generator_2": name}
            | {"preference": e.get("preference", 1.5), "annotator": "weighted_alpaca_eval_gpt4_turbo"}
            | {k: e[k] for k in ("read_by", "error") if k in e}
            for e in examples
            if e["model"] == name
        ]
        metrics = _alpaca_eval_metrics(AE, annotations, gamed)
        unparsable = [a["index"] for a in annotations if math.isnan(a["preference"]) and "error" not in a]
        summary = {"model": name, **{k: _plain(v) for k, v in metrics.items()}}
        summary |= {"avg_length": sum(len(a["output_2"]) for a in annotations) / len(annotations)}
        summary |= {"read_by_text": sum(a.get("read_by") == "text" for a in annotations), "unparsable": unparsable}
        summary |= {"failed": [a["index"] for a in annotations if "error" in a]}
        summary["judge"] = {"base_url": m.base_url, "model": m.model, "params": params}
        json_files.write_json(out / f"alpaca_eval_annotations_{slug(name)}.json", annotations, indent=2)
        json_files.write_json(out / f"alpaca_eval_summary_{slug(name)}.json", summary, indent=2)
        summaries.append(summary)
    write_scalars(
        out,
        {f"alpaca_eval/{s['model']}/{k}": s[k] for s in summaries for k in ("length_controlled_winrate", "win_rate")},
    )
    print("\n| model | LC win rate | win rate | avg length | n |\n|---|---:|---:|---:|---:|")
    for s in summaries:
        print(
            f"| {s['model']} | {_pm(s['length_controlled_winrate'], s['lc_standard_error'])} | "
            f"{_pm(s['win_rate'], s['standard_error'])} | {s['avg_length']:.0f} | {s['n_total']} |"
        )
        if s["read_by_text"]:
            print(f"  {s['model']}: {s['read_by_text']} preferences read from the reply's text (no log-probabilities)")
        if s["unparsable"] or s["failed"]:
            print(f"  {s['model']}: {len(s['unparsable'])} unparsable, {len(s['failed'])} failed, not scored")
    print(f"\nRequests: {client.stats.as_dict()}\nSummaries: {out}/alpaca_eval_summary_*.json")
    for s in summaries:
        scored = len(baseline) - len(s["unparsable"]) - len(s["failed"])
        check_success(
            scored,
            len(baseline),
            m.min_success,
            f"AlpacaEval preferences of {s['model']}",
            "run the same command again: failed requests are asked again, answers come from the cache",
        )
    return summaries


def _pm(value: float | None, error: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" + (f" ± {error:.2f}" if error is not None else "")


def _alpaca_eval_metrics(AE, annotations: list[dict], gamed) -> dict:
    """The win rates; where too few preferences were read for the GLM (a judge that gave none), the raw win rate
    alone, and why (alpaca-eval would fail inside its fit)."""
    import math

    read = [a["preference"] for a in annotations if not math.isnan(a["preference"])]
    if len({round(x, 12) for x in read}) < 2:
        metrics = AE.win_rate([a["preference"] for a in annotations])
        why = f"{len(read)} preferences read, {len(set(read))} distinct: too few to fit the length-controlled GLM"
        print(f"  {annotations[0]['generator_2']}: {why}")
        return metrics | {"length_controlled_winrate": None, "lc_standard_error": None, "lc_not_computed": why}
    return AE.length_controlled_winrate(annotations, gamed)


def _plain(value):
    """numpy scalars as JSON numbers, NaN as null."""
    value = value.item() if hasattr(value, "item") else value
    return None if isinstance(value, float) and value != value else value


def _alpaca_eval_outputs(path, rows: list, by_instruction: dict[str, str]) -> tuple[str, dict[str, str]]:
    """alpaca_eval's model_outputs.json ({"instruction", "output", "generator"}), matched to the set by instruction."""
    answers: dict[str, str] = {}
    for index, row in enumerate(rows):
        if row.get("instruction") not in by_instruction:
            raise RecordError(f"{path}: record {index}: its instruction is not one of AlpacaEval's 805")
        answers[by_instruction[row["instruction"]]] = str(row.get("output", ""))
    missing = [i for i in by_instruction.values() if i not in answers]
    if missing:
        raise RecordError(f"{path}: AlpacaEval instruction {missing[0]} has no output")
    return str(rows[0].get("generator") or Path(path).stem), answers


def evaluate(cfg: DictConfig):
    from gpt4llm.evaluation.responses import read_responses

    out = Path(cfg.paths.output_dir)
    if OmegaConf.select(cfg, "model.path"):  # an engine that cannot run here stops before the questions are fetched
        from gpt4llm.models.vllm_engine import check_engine

        check_engine(cfg.engine, cfg.model.device)
    if cfg.metric.name == "mt_bench":
        return evaluate_mt_bench_cmd(cfg, out)
    if cfg.metric.name in ("arena_hard", "alpaca_eval"):
        import importlib.util

        if importlib.util.find_spec("sklearn") is None:  # their ratings are scikit-learn fits, as the references'
            raise ConfigError(f"metric={cfg.metric.name} needs scikit-learn: pip install 'gpt4llm[judges]'")
        run = evaluate_arena_hard_cmd if cfg.metric.name == "arena_hard" else evaluate_alpaca_eval_cmd
        return run(cfg, out)
    if not cfg.responses:
        raise ConfigError(f"metric={cfg.metric.name} scores answers: responses=<responses.jsonl> (or a list [a,b])")
    paths = list(cfg.responses) if isinstance(cfg.responses, ListConfig) else [cfg.responses]
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
    raise ConfigError(f"metric={cfg.metric.name}: expected rouge, judge, reward, {', '.join(BENCHMARKS)}")


@hydra_command("evaluate")
@reports_user_errors
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
