"""Reward functions that ship with gpt4llm, for `reward=function reward.fn=gpt4llm.models.reward_functions:<name>`.

A reward function has TRL's signature: `fn(prompts, completions, **fields) -> list[float]`, one number per
completion, where `fields` are the prompt records' fields (each a list, one entry per completion: `output` holds a
record's reference answer) and `completion_ids`. Your own functions take the same arguments
(`reward.fn=mypackage.rewards:my_reward`); settings of your own go in `reward.kwargs`.
"""

from __future__ import annotations

from collections import Counter


def reference_f1(prompts: list[str], completions: list[str], output: list[str] | None = None, **_) -> list[float]:
    """The word-overlap F1 of each completion with its record's reference answer (`output`; SQuAD's token F1 on
    whitespace words, case-folded): partial credit, so a policy far from the answers still gets a signal. The demo's
    default reward (its answers are exact)."""
    _check_references("reference_f1", output)
    return [_f1(completion, reference) for completion, reference in zip(completions, output)]


def exact_match(prompts: list[str], completions: list[str], output: list[str] | None = None, **_) -> list[float]:
    """1.0 where the completion, stripped, is the reference answer (`output`), else 0.0."""
    _check_references("exact_match", output)
    return [float(completion.strip() == reference.strip()) for completion, reference in zip(completions, output)]


def letter_share(prompts: list[str], completions: list[str], letter: str = "e", **_) -> list[float]:
    """The share of a completion's characters that are `letter` (case-folded; 0 for an empty completion): a dense
    reward that any policy, a random one included, can learn to raise, for checking that training learns
    (`reward.kwargs.letter=a`)."""
    letter = letter.lower()
    return [completion.lower().count(letter) / len(completion) if completion else 0.0 for completion in completions]


def _check_references(name: str, output) -> None:
    missing = len(output or []) if output is None else sum(not isinstance(o, str) for o in output)
    if output is None or missing:
        raise ValueError(
            f"{name} needs each prompt record's reference answer, its 'output' field: "
            f"{'none has one' if output is None else f'{missing} of {len(output)} have none'}"
        )


def _f1(prediction: str, reference: str) -> float:
    predicted, wanted = prediction.lower().split(), reference.lower().split()
    common = sum((Counter(predicted) & Counter(wanted)).values())
    if not predicted or not wanted or not common:
        return float(predicted == wanted)
    precision, recall = common / len(predicted), common / len(wanted)
    return 2 * precision * recall / (precision + recall)
