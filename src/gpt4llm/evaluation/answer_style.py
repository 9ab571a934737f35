"""The style features of one answer that Arena-Hard-Auto's style control reads (`conv_metadata` in its answer files):
the answer's token count and its markdown headers, list items and bold spans.

Reproduced from lmarena/arena-hard-auto at commit 3071ef95d913bb5cd632641db336a3b6c7fe4bdd (2025-03-19):
gen_answer.py (blob d305ffe6) writes, for a one-choice one-turn answer, token_len = the length of
tiktoken.encoding_for_model("gpt-3.5-turbo").encode(answer, disallowed_special=()) (cl100k_base) merged with
add_markdown_info.py's (blob ccb319d4) count_markdown_elements of the answer after remove_pattern with its code-block
pattern. The token count is of the whole answer; the markdown counts are of the answer with code blocks "removed".

Its code-block removal is kept as it is, quirks included, since they change the counts: it deletes only what lies
between each pair of ``` fences (the fences stay), and it deletes every occurrence of that text anywhere in the answer,
not only inside the block; a block holding a backtick is not a block to its pattern.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from gpt4llm.errors import ConfigError

TOKENIZER_MODEL = "gpt-3.5-turbo"  # gen_answer's tiktoken.encoding_for_model argument (cl100k_base)

_CODE_BLOCK = re.compile("```([^`]*)```")
# count_markdown_elements' patterns, key for key as its conv_metadata stores them. Headers are line starts with exactly
# n "#" and any whitespace after (a newline too); list items may be indented, and \s* at a line start also runs over
# blank lines; bold is one line of ** or __ delimited text.
_HEADERS = {f"h{n}": re.compile(rf"^#{{{n}}}\s", re.MULTILINE) for n in range(1, 7)}
_LISTS = {"ordered": re.compile(r"^\s*\d+\.\s", re.MULTILINE), "unordered": re.compile(r"^\s*[-*+]\s", re.MULTILINE)}
_BOLD = {"**": re.compile(r"\*\*[^*\n]+\*\*"), "__": re.compile(r"__[^_\n]+__")}


def strip_code_blocks(text: str) -> str:
    """remove_pattern(text, "```([^`]*)```"): for each block's inner text, in order, every occurrence of it in the
    (already shortened) text is deleted."""
    for inner in _CODE_BLOCK.findall(text):
        text = text.replace(inner, "")
    return text


def markdown_counts(text: str) -> dict[str, dict[str, int]]:
    """count_markdown_elements(strip_code_blocks(text), suffix=""): header_count (h1..h6), list_count (ordered,
    unordered) and bold_count (**, __), each a dict of counts as Arena-Hard's answer files hold them."""
    text = strip_code_blocks(text)

    def count(patterns: dict[str, re.Pattern]) -> dict[str, int]:
        return {key: len(pattern.findall(text)) for key, pattern in patterns.items()}

    return {"header_count": count(_HEADERS), "list_count": count(_LISTS), "bold_count": count(_BOLD)}


def style_features(text: str, count_tokens: Callable[[str], int]) -> dict:
    """One answer's conv_metadata as gen_answer writes it: {"token_len": count_tokens(text), "header_count": {...},
    "list_count": {...}, "bold_count": {...}}. `count_tokens` counts the whole answer; `tiktoken_counter()` is the
    reference's. The result is what `arena_hard.battles(features=...)` takes per model and question."""
    return {"token_len": int(count_tokens(text))} | markdown_counts(text)


def tiktoken_counter() -> Callable[[str], int]:
    """gen_answer's token count: len(encoding_for_model("gpt-3.5-turbo").encode(text, disallowed_special=())), i.e.
    cl100k_base with special-token text counted as plain text (never an error). tiktoken downloads the encoding on
    first use and caches it; without it and offline this raises ConfigError."""
    try:
        import tiktoken
    except ImportError as e:
        raise ConfigError(
            "arena_hard style control counts tokens with tiktoken, which is not installed: pip install tiktoken"
        ) from e
    try:
        encoding = tiktoken.encoding_for_model(TOKENIZER_MODEL)
    # requests' connection errors are OSErrors; a bad download is a ValueError; a missing downloader an ImportError
    except (OSError, ValueError, ImportError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise ConfigError(
            f"tiktoken cannot load the {TOKENIZER_MODEL} encoding (cl100k_base), which it downloads on first use "
            f"({type(e).__name__}: {reason}); run once online to cache it, or set TIKTOKEN_CACHE_DIR to a directory "
            "that holds the cached file"
        ) from e

    def count_tokens(text: str) -> int:
        return len(encoding.encode(text, disallowed_special=()))

    return count_tokens
