"""Synthesize: the paper's GPT-4 data, made again with any OpenAI-compatible teacher (GPT-4, a vLLM server, or
`python -m gpt4llm.serve` with a model trained here).

    python -m gpt4llm.synthesize job=answer instructions=alpaca_data.json teacher.model=gpt-4
    python -m gpt4llm.synthesize job=translate instructions=alpaca_data.json job.language=Chinese
    python -m gpt4llm.synthesize job=score 'responses={gpt4:a.json,text-davinci-003:b.json,icm-1.3b:c.jsonl}'

| job       | reads                          | writes (in the run directory)                                          |
| answer    | Alpaca records (instruction,   | <name>.answers.json: instruction, input, output                        |
|           | input)                         | (alpaca_gpt4_data.json's layout)                                       |
| translate | Alpaca records                 | <name>.<language>.json: instruction, input translated; output ""       |
| score     | several models' answers to the | comparison_data_v2.json (user_input, responses_and_scores) and         |
|           | same instructions              | cmp_data_scores.json (the score lists gpt4llm.plots draws)             |

- answer: the paper's Algorithm 1, the Alpaca prompt as the one user message, temperature 1.0, top_p 1.0,
  max_tokens 512 (job.*). A record that appears k times gets sample k, i.e. its own draw, as each of the paper's
  records did.
- translate: each distinct instruction and input text translated once (the paper had ChatGPT translate Alpaca's
  instructions, then GPT-4 answer them in Chinese).
- score: every response scored on its own with the paper's scoring prompt (GPT-4-LLM issue #8, the one copy in
  evaluation/judge_prompts.py), the score read from the reply's first line by the judge's lenient rule; an unparsable
  reply is asked for again (a new sample) up to job.max_parse_retries times.

Every reply goes to the client's on-disk cache as it arrives, and the output is rebuilt from the cache: a killed run,
run again, loses nothing and pays only for what it never received. Answers cut at max_tokens (finish_reason "length"),
empty answers, unparsable scores and requests that failed after the client's retries are counted and listed by
record index (0-based, file order) in <output stem>.report.json, never dropped silently; a rerun asks for the failed
ones again. The teacher's key is read from the environment variable teacher.api_key_env and written nowhere.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from gpt4llm.app.cli import hydra_command, reports_user_errors
from gpt4llm.errors import ConfigError
from gpt4llm.inference.openai_client import check_success, client_from_config
from gpt4llm.io import json_files
from gpt4llm.synthesis.tasks import (
    TASKS,
    answer,
    job_name,
    listed,
    read_instructions,
    read_sources,
    score,
    translate,
)

log = logging.getLogger(__name__)

for _name, _node in TASKS.items():
    ConfigStore.instance().store(group="job", name=_name, node=_node)


def synthesize(cfg: DictConfig) -> dict[str, Any]:
    """Runs cfg.job, writes cfg.output and its report, and returns the report."""
    name = job_name(cfg.job)
    if name != "score" and not cfg.instructions:
        raise ConfigError(f"job={name} needs instructions=FILE: Alpaca-format records (instruction, optional input)")
    started = time.time()
    client = client_from_config(cfg.teacher)
    output = Path(cfg.output)
    report: dict[str, Any] = {"job": name, "output": str(output)}
    if name == "score":
        sources = read_sources(cfg.responses)
        data, scores, reviews, found = score(client, sources, cfg.job, cfg.limit)
        scores_file = json_files.write_json(output.with_name("cmp_data_scores.json"), scores, indent=None)
        reviews_file = output.with_name(output.stem + ".reviews.jsonl")
        json_files.write_jsonl(reviews_file, reviews)
        report |= {
            "responses": {s: str(p) for s, p in _source_files(cfg.responses, sources).items()},
            "scores": str(scores_file),
            "reviews": str(reviews_file),
        }
    else:
        records, skipped = read_instructions(cfg.instructions, cfg.limit)
        report |= {
            "instructions": str(cfg.instructions),
            "records": len(records) + sum(map(len, skipped.values())),
            "skipped_records": {k: listed(v) for k, v in skipped.items()},
        }
        run = answer if name == "answer" else translate
        data, found = run(client, records, cfg.job)
    json_files.write_json(output, data)
    stats = client.stats.as_dict()
    report |= found | {
        "teacher": {"base_url": client.base_url, "model": client.model, "api_key_env": client.api_key_env},
        "settings": OmegaConf.to_container(cfg.job, resolve=True),
        "requests": stats,
        "estimated_cost_usd": client.estimated_cost(),
        "saved_by_cache_usd": client.estimated_cost(cached=True),
        "seconds": round(time.time() - started, 1),
    }
    report_file = json_files.write_json(output.with_name(output.stem + ".report.json"), report, indent=2)
    _print_summary(name, report, output, report_file)
    asked = report["records"] if name != "score" else found.get("prompts", report["written"])
    check_success(
        report["written"], asked, cfg.min_success, "records", "run the same command again to ask for the rest"
    )
    return report


def _source_files(responses: Any, sources: dict) -> dict[str, str]:
    if isinstance(responses, (dict, DictConfig)):
        return {str(k): str(v) for k, v in responses.items()}
    files = [responses] if isinstance(responses, (str, Path)) else list(responses)
    return {name: str(path) for name, path in zip(sources, files)}


def _print_summary(name: str, report: dict, output: Path, report_file: Path) -> None:
    requests = report["requests"]
    cost = report["estimated_cost_usd"]
    paid = f"{requests['prompt_tokens'] + requests['completion_tokens']} tokens"
    paid += f" (~${cost:.2f})" if cost is not None else ""
    print(f"\n{name}: {report['written']} records written to {output}")
    print(
        f"  requests sent {requests['sent']} (retries {requests['retried']}), "
        f"from the cache {requests['cached']}; paid {paid}"
    )
    for reason, value in report.items():  # every listed problem, also those listed per source or per reason
        found = (
            {reason: value}
            if isinstance(value, dict) and "count" in value
            else {f"{reason}: {sub}": info for sub, info in value.items() if isinstance(info, dict) and "count" in info}
            if isinstance(value, dict)
            else {}
        )
        for what, info in found.items():
            if info["count"]:
                more = " ..." if info["count"] > 10 else ""
                print(f"  {info['count']} x {what}: indices {info['indices'][:10]}{more}")
    if name == "score":
        print(f"  scores: {report['scores']}  (python -m gpt4llm.plots results={output.parent})")
    print(f"  report: {report_file}")


@hydra_command("synthesize")
@reports_user_errors
def main(cfg: DictConfig) -> None:
    try:
        synthesize(cfg)
    except KeyboardInterrupt:
        print(
            "\nInterrupted. Every answer received is in the cache "
            f"({cfg.teacher.cache}); run the same command again to continue.",
            file=sys.stderr,
        )
        sys.exit(130)


if __name__ == "__main__":
    main()
