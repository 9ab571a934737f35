"""The Alpaca prompt templates, verbatim from stanford_alpaca's train.py (PROMPT_DICT), which the paper followed.

Training, generation, serving and data synthesis all build prompts here (through data.formats.alpaca where a prompt
format is asked), so there is one copy; `alpaca_prompt` also recognises text that is an Alpaca prompt already (the
GPT-4-LLM comparison files, clients sending templated prompts). The chat template an Alpaca export carries is
formats/templates/alpaca.jinja, held to this text id for id by tests/test_chat_template.py.
"""

PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)


def format_prompt(instruction: str, input: str = "") -> str:
    """The prompt a record is trained and queried with; an empty `input` selects the no-input template."""
    if input:
        return PROMPT_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


RESPONSE_TAG = "### Response:"
# The first paragraph of each template: text that starts with one is a prompt templated already.
PREAMBLES = (PROMPT_INPUT.split("\n\n")[0], PROMPT_NO_INPUT.split("\n\n")[0])


def alpaca_prompt(text: str) -> str:
    """`text` as the Alpaca prompt the SFT model answers: wrapped in the no-input template unless it already holds a
    template, and ending in '### Response:' (which comparison_data_v2's `user_input` leaves off)."""
    if not text.lstrip().startswith(PREAMBLES):
        return format_prompt(text)
    body = text.strip()
    return body if body.endswith(RESPONSE_TAG) else body + "\n\n" + RESPONSE_TAG


def without_response_tag(prompt: str) -> str:
    """comparison_data_v2's `user_input`: an Alpaca prompt without its trailing '### Response:'."""
    if not prompt.endswith("\n\n" + RESPONSE_TAG):
        raise ValueError("not an Alpaca prompt: it does not end with '### Response:'")
    return prompt[: -len("\n\n" + RESPONSE_TAG)]
