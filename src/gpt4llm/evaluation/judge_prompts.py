"""The GPT-4 judge's prompts: data, in one place, each with its source.

Placeholders are `str.format` fields. Every prompt asks for the score(s) alone on the first line of the reply,
which is where `judge.parse_scores` reads them.
"""

# --- Single-answer scoring -------------------------------------------------------------------------------------
# Source: GPT-4-LLM issue #8, the authors' answer on how responses were scored (docs/paper_spec.md, "Scoring
# prompt"); verbatim. It is sent as the only (user) message: the issue shows no system prompt.
SINGLE_SYSTEM = None
SINGLE_TEMPLATE = (
    "### Instruction\n{instruction}\n### Response\n{response}\n### End of Response\n"
    "We would like to request your feedback on the performance of AI assistant in response to the user question "
    "displayed above. Please rate the helpfulness, relevance, accuracy, level of details of their responses. Each "
    "assistant receives an overall score on a scale of 1 to 10, where a higher score indicates better overall "
    "performance. Please first output a single line containing value indicating the scores. In the subsequent line, "
    "please provide a comprehensive explanation of your evaluation, avoiding any potential bias."
)

# --- Pairwise review (Vicuna-80) -------------------------------------------------------------------------------
# Source: FastChat v0.1.10, fastchat/eval (eval_gpt_review.py with table/reviewer.jsonl and table/prompt.jsonl),
# the review the paper ran on Vicuna's 80 questions. The system prompt and the template's layout are FastChat's as
# recorded in docs/paper_spec.md 3(b). The three reviewer instructions below are NOT FastChat's text (it could not
# be fetched here): they are our wording of what FastChat's general, coding and math prompts ask for (the criteria,
# the 1-10 scale, the two scores alone on the first line, an explanation after it, no position bias). For a run
# meant to match published Vicuna-style numbers, replace them with FastChat's prompt.jsonl texts.
PAIRWISE_SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
PAIRWISE_TEMPLATE = (
    "[Question]\n{question}\n\n"
    "[The Start of Assistant 1's Answer]\n{answer_1}\n\n[The End of Assistant 1's Answer]\n\n"
    "[The Start of Assistant 2's Answer]\n{answer_2}\n\n[The End of Assistant 2's Answer]\n\n"
    "[System]\n{prompt}\n\n"
)
REVIEW_PROMPTS = {
    "general": (
        "Please give us your feedback on how well the two AI assistants answered the user question shown above. "
        "Rate the helpfulness, relevance, accuracy and level of detail of each answer. Each assistant gets an overall "
        "score from 1 to 10, where a higher score means better overall performance.\n"
        "First output one line that contains only the two scores, for Assistant 1 and Assistant 2 in that order, "
        "separated by a space. On the following lines, explain your evaluation in full, without bias, and make sure "
        "the order in which the answers were presented does not influence your judgment."
    ),
    "coding": (
        "Your task is to judge the coding ability of the two assistants above, who were asked to write a program for "
        "the given problem. Review their code: whether it solves the problem correctly, how efficient it is, how "
        "clear its structure and naming are, and whether comments explain the non-obvious parts. Point out mistakes "
        "and suggest improvements.\n"
        "First output one line that contains only the two scores from 1 to 10, for Assistant 1 and Assistant 2 in "
        "that order, separated by a space. On the following lines, give your review."
    ),
    "math": (
        "Your task is to judge the answers of the two assistants above to a math problem. Solve the problem yourself "
        "step by step first, then check each assistant's solution step by step against yours, noting any error in "
        "the method or in the arithmetic, and whether the final answer is correct.\n"
        "First output one line that contains only the two scores from 1 to 10, for Assistant 1 and Assistant 2 in "
        "that order, separated by a space. On the following lines, give your solution and your review."
    ),
}
# FastChat's reviewer table routes Vicuna's `coding` and `math` questions to their own prompts; all others to general.
CATEGORY_PROMPT = {"coding": "coding", "math": "math"}
