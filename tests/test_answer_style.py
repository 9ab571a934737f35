"""Answer style features (gpt4llm.evaluation.answer_style) against Arena-Hard-Auto's own counting.

The markdown literals were produced by running lmarena/arena-hard-auto's add_markdown_info.py at commit
3071ef95d913bb5cd632641db336a3b6c7fe4bdd (blob ccb319d4) from a scratch directory outside this project, as its
gen_answer.py (blob d305ffe6) calls it on each answer: count_markdown_elements(remove_pattern(text,
re.compile("```([^`]*)```")), suffix=""), under Python 3.11, on the texts below, and printing each result.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import types

import pytest

from gpt4llm.errors import ConfigError
from gpt4llm.evaluation.answer_style import markdown_counts, strip_code_blocks, style_features, tiktoken_counter

TEXTS = [
    "# One\n## Two\n### Three\n#### Four\n##### Five\n###### Six\n####### Seven\n#NoSpace\n  # indented\n"
    "#\tTab\n#\nend",
    "1. first\n2. second\n   1. nested one\n   - nested dash\n10. ten\n1.no space\n* star\n+ plus\n- dash\n\t- tabbed",
    "**bold** and __under__ and ***triple*** and **multi\nline** and ____ and **a*b** and __a_b__ **x** **",
    "```python\n# comment\n- not a list\n**x**\n1. no\n```\nafter # text\n- real item\n## Real header",
    "Use x here\n```\nx\n```\n- x marks the spot\n**box**",
    "```js\nconst s = `a`;\n# inside\n```\n## Head\n- item",
    "``````\n# H\n```\nunclosed\n# also counted\n- yes",
    "\n\n\n1. a\n\n2. b\n\n   3. c\n- \n-\n*",
    "---\n***\n* * *\n*italic* _it_ __bold__text__ **one** **two**",
    "# A\r\n- b\r\n**c**\r\n1. d\r\n",
    "## Ünïcödé 中文 🚀\n- 項目\n**粗体**",
    "",
    "```\n# a\n```\ntext\n```\n# a\n```\n# a\n",
]


def counts(h: tuple, lists: tuple, bold: tuple) -> dict:
    """The reference's dict, written compactly: (h1..h6), (ordered, unordered), (**, __)."""
    return {
        "header_count": dict(zip(("h1", "h2", "h3", "h4", "h5", "h6"), h)),
        "list_count": dict(zip(("ordered", "unordered"), lists)),
        "bold_count": dict(zip(("**", "__"), bold)),
    }


# The reference's output for TEXTS, in order.
REFERENCE_COUNTS = [
    counts((3, 1, 1, 1, 1, 1), (0, 0), (0, 0)),  # "#\tTab" and "#\nend" are h1 (\s), "####### Seven" nothing
    counts((0, 0, 0, 0, 0, 0), (4, 5), (0, 0)),
    counts((0, 0, 0, 0, 0, 0), (0, 0), (5, 2)),
    counts((0, 1, 0, 0, 0, 0), (0, 1), (0, 0)),  # the code block's header, item and bold are gone
    counts((0, 0, 0, 0, 0, 0), (0, 1), (1, 0)),  # the block's "\nx\n" is deleted, not every x
    counts((1, 1, 0, 0, 0, 0), (0, 1), (0, 0)),  # a backtick inside: not a block, "# inside" counts
    counts((2, 0, 0, 0, 0, 0), (0, 1), (0, 0)),
    counts((0, 0, 0, 0, 0, 0), (3, 2), (0, 0)),
    counts((0, 0, 0, 0, 0, 0), (0, 1), (2, 1)),
    counts((1, 0, 0, 0, 0, 0), (1, 1), (1, 0)),
    counts((0, 1, 0, 0, 0, 0), (0, 1), (1, 0)),
    counts((0, 0, 0, 0, 0, 0), (0, 0), (0, 0)),
    counts((0, 0, 0, 0, 0, 0), (0, 0), (0, 0)),  # "\n# a\n" deleted everywhere, the last header included
]


@pytest.mark.parametrize(("text", "expected"), list(zip(TEXTS, REFERENCE_COUNTS)), ids=range(len(TEXTS)))
def test_markdown_counts_equal_add_markdown_info(text, expected):
    assert markdown_counts(text) == expected


def test_code_blocks_are_stripped_as_the_reference_does():
    # only the inside goes, fences stay; the inside is deleted wherever else it occurs too (literals: the
    # reference's remove_pattern on these texts)
    assert strip_code_blocks("a```\nb\n```c\nb\n") == "a``````c"
    assert strip_code_blocks("```py\nx = `1`\n```") == "```py\nx = `1`\n```"


def test_style_features_count_tokens_with_the_given_counter():
    seen = []

    def counter(text):
        seen.append(text)
        return 42

    text = "# Title\n```\n**not bold**\n```\n- item **bold**"
    features = style_features(text, counter)
    assert seen == [text]  # the whole answer, code block included, as gen_answer counts it
    assert features == {"token_len": 42} | markdown_counts(text)
    assert features["bold_count"] == {"**": 1, "__": 0}
    assert style_features("", len)["token_len"] == 0


def _cl100k_cached() -> bool:
    """Whether tiktoken would find cl100k_base in its cache (so loading it reads no network)."""
    cache = os.environ.get("TIKTOKEN_CACHE_DIR", os.environ.get("DATA_GYM_CACHE_DIR"))
    cache = os.path.join(tempfile.gettempdir(), "data-gym-cache") if cache is None else cache
    url = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
    return bool(cache) and os.path.exists(os.path.join(cache, hashlib.sha1(url.encode()).hexdigest()))


def test_tiktoken_counter_counts_as_gen_answer():
    pytest.importorskip("tiktoken")
    if not _cl100k_cached():
        pytest.skip("tiktoken's cl100k_base file is not cached here (it downloads on first use; no network in tests)")
    count = tiktoken_counter()
    assert count("hello world") == 2
    assert count("<|endoftext|>") > 1  # disallowed_special=(): special-token text is plain text, never an error


def test_tiktoken_counter_errors(monkeypatch):
    monkeypatch.setitem(sys.modules, "tiktoken", None)
    with pytest.raises(ConfigError, match="not installed"):
        tiktoken_counter()

    def offline(model):
        raise OSError("Failed to resolve 'openaipublic.blob.core.windows.net'\nmore")

    monkeypatch.setitem(sys.modules, "tiktoken", types.SimpleNamespace(encoding_for_model=offline))
    with pytest.raises(ConfigError, match="TIKTOKEN_CACHE_DIR") as error:
        tiktoken_counter()
    assert "\n" not in str(error.value) and "run once online" in str(error.value)
