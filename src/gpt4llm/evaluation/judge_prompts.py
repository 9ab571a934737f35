"""The GPT-4 judge's prompts, each from its source.

Single-answer scoring: the paper's prompt, from GPT-4-LLM issue #8 (the authors' answer on how responses were scored;
docs/paper_spec.md, "Scoring prompt"), verbatim; sent as the only (user) message, as the issue shows no system prompt.

Pairwise review (Vicuna-80): FastChat's own files, read as data and never retyped: `prompt.jsonl` (system prompt,
template and one instruction per category) and `reviewer.jsonl` (which prompt each category gets) from FastChat
commit 6d987107 (release v0.1.10), the review the paper ran. conf/metric/judge.yaml pins their URLs and checksums.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gpt4llm.errors import RecordError
from gpt4llm.io.json_files import read_json_records

SINGLE_SYSTEM = None
SINGLE_TEMPLATE = (
    "### Instruction\n{instruction}\n### Response\n{response}\n### End of Response\n"
    "We would like to request your feedback on the performance of AI assistant in response to the user question "
    "displayed above. Please rate the helpfulness, relevance, accuracy, level of details of their responses. Each "
    "assistant receives an overall score on a scale of 1 to 10, where a higher score indicates better overall "
    "performance. Please first output a single line containing value indicating the scores. In the subsequent line, "
    "please provide a comprehensive explanation of your evaluation, avoiding any potential bias."
)

PROMPT_FIELDS = ("prompt_id", "system_prompt", "prompt_template", "defaults")
REVIEWER_FIELDS = ("reviewer_id", "prompt_id", "category")


@dataclass(frozen=True)
class FastChatReviewers:
    """FastChat's `gen_prompt`: the first reviewer whose category is the question's, else the first reviewer
    (general); its prompt is `prompts[prompt_id - 1]`; the template is filled with the question, both answers and
    the prompt's `defaults` (the category's instruction)."""

    prompts: list[dict]
    reviewers: list[dict]

    @classmethod
    def from_files(cls, prompt_file: str | Path, reviewer_file: str | Path) -> FastChatReviewers:
        prompts, reviewers = read_json_records(Path(prompt_file)), read_json_records(Path(reviewer_file))
        for file, records, fields in (
            (prompt_file, prompts, PROMPT_FIELDS),
            (reviewer_file, reviewers, REVIEWER_FIELDS),
        ):
            for index, record in enumerate(records):
                missing = [f for f in fields if f not in record]
                if missing:
                    raise RecordError(f"{file}: record {index}: field '{missing[0]}' is missing (not FastChat's file?)")
        for index, reviewer in enumerate(reviewers):
            if (
                not 1 <= reviewer["prompt_id"] <= len(prompts)
                or prompts[reviewer["prompt_id"] - 1]["prompt_id"] != reviewer["prompt_id"]
            ):
                raise RecordError(
                    f"{reviewer_file}: record {index}: prompt_id {reviewer['prompt_id']} is not line "
                    f"{reviewer['prompt_id']} of {prompt_file}"
                )
        return cls(prompts, reviewers)

    def prompt_for(self, category: str | None) -> dict:
        reviewer = next((r for r in self.reviewers if r["category"] == category), self.reviewers[0])
        return self.prompts[reviewer["prompt_id"] - 1]

    def messages(self, category: str | None, question: str, answer_1: str, answer_2: str) -> list[dict]:
        prompt = self.prompt_for(category)
        user = prompt["prompt_template"].format(
            question=question, answer_1=answer_1, answer_2=answer_2, **prompt["defaults"]
        )
        return [{"role": "system", "content": prompt["system_prompt"]}, {"role": "user", "content": user}]

    def asks_for_tuple(self, category: str | None) -> bool:
        """FastChat's math prompt has GPT-4 solve the problem first and give the scores as a Python tuple at the end."""
        return "Python tuple" in self.prompt_for(category)["defaults"].get("prompt", "")
