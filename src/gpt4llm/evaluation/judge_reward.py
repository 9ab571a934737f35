"""A served judge as online RL's reward (`reward=judge`, conf/reward/judge.yaml): any OpenAI-compatible endpoint
(OpenAI, vLLM, `python -m gpt4llm.serve`) scores each completion 1-10 under a rubric, through the project's client
(inference.openai_client: retries with backoff, the answer cache, token and cost counts).

The rubric is the paper's single-answer prompt (evaluation.judge_prompts.SINGLE_TEMPLATE) unless `reward.rubric`
gives another with the same two fields, {instruction} and {response}. The score is read from the reply's first line
(evaluation.judge.parse_scores); a reply without one is asked again (`max_parse_retries`). Every reply is cached by
the request, so a resumed run, or the same completion sampled again, pays nothing twice. A completion left without a
score after the retries stops the run with one line: a reward cannot be made up.

Built in the evaluation layer (it needs the client) and handed to models.rewards by the train command."""

from __future__ import annotations

from gpt4llm.errors import ConfigError, DownloadError
from gpt4llm.evaluation import judge_prompts as P
from gpt4llm.evaluation.judge import ask_for_scores, reader
from gpt4llm.inference.openai_client import client_from_config
from gpt4llm.models.rewards import Scores


def judge_reward(prefix: str, spec) -> Scores:
    """`score(prompts, completions, fields, completion_ids)` for the judge of `spec` (laid out as
    conf/reward/judge.yaml), and its running cost."""
    from omegaconf import OmegaConf

    block = OmegaConf.create(dict(spec))
    rubric = spec.get("rubric") or P.SINGLE_TEMPLATE
    if "{instruction}" not in rubric or "{response}" not in rubric:
        raise ConfigError(f"{prefix}.rubric: must contain {{instruction}} and {{response}} (the prompt and the answer)")
    try:
        client = client_from_config(block)
    except DownloadError:
        raise
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"{prefix}: the judge's client settings are incomplete ({err})") from None
    params = {"temperature": float(spec.get("temperature", 0.0)), "max_tokens": int(spec.get("max_tokens", 256))}
    retries = int(spec.get("max_parse_retries", 2))
    read = reader("lenient", 1)

    def score(prompts, completions, fields, completion_ids):
        conversations = [
            [{"role": "user", "content": rubric.format(instruction=p, response=c)}]
            for p, c in zip(prompts, completions)
        ]
        verdicts = ask_for_scores(client, conversations, [read] * len(conversations), params, retries, None)
        missing = [v for v in verdicts if v.scores is None]
        if missing:
            first = missing[0].error or f"no score in the reply {missing[0].replies[-1][:120]!r}"
            raise ConfigError(
                f"{prefix}: the judge {spec['model']} at {spec['base_url']} left {len(missing)} of "
                f"{len(verdicts)} completions without a score ({first}); resume from the last checkpoint once it "
                f"answers (the replies so far are cached)"
            )
        return [v.scores[0] for v in verdicts]

    def cost() -> dict[str, float]:
        stats = client.stats
        spent = {"tokens": float(stats.prompt_tokens + stats.completion_tokens), "cached": float(stats.cached)}
        estimate = client.estimated_cost()
        return spent | ({"usd": float(estimate)} if estimate is not None else {})

    return Scores(score, cost)
