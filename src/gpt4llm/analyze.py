"""Analyze: `python -m gpt4llm.analyze data=alpaca_gpt4 versus=alpaca` draws the paper's Figure 1 for any
instruction dataset: the verb–noun pairs of its texts (top pairs, sunburst) and the lengths of its instructions and
outputs, a second dataset beside the first. Writes, in logs/analyze/runs/<time>/: verb_noun_<dataset>.csv (the
notebook's columns), cmp_freq.png/pdf (1c), sunburst_<dataset>.html/png, cmp_seq_len_freq.png/pdf (1d),
instruction_len_freq.png/pdf and summary.json. A figure with nothing to draw (no pair seen often enough for the
sunburst) is skipped, with its reason in summary.json's skipped_figures; the rest is written. The parse rule:
gpt4llm.analysis.verb_noun."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from gpt4llm.app.cli import hydra_command, reports_user_errors
from gpt4llm.errors import MissingFileError

log = logging.getLogger(__name__)


def dataset_file(data: DictConfig) -> Path:
    """The file a data config names, downloaded or generated as training would (never tokenized here)."""
    from hydra.utils import instantiate

    # Only the file's settings are read: the model's (max_length, attention) are not part of this command's config.
    settings = OmegaConf.merge(data, {"max_length": 512, "attn_implementation": None})
    return instantiate(settings, tokenizer=None).source_file()


def versus_file(versus: str) -> Path:
    """`versus`: a file, or the name of a data config (composed as `data=<name>` would be)."""
    if Path(versus).suffix in (".json", ".jsonl") or Path(versus).exists():
        return Path(versus)
    from hydra import compose

    try:
        composed = compose(config_name="analyze", overrides=[f"data={versus}"])
    except Exception as err:  # hydra's MissingConfigException and friends: say what can be given
        raise MissingFileError(f"versus={versus}: neither a file nor a data config ({err})") from None
    return dataset_file(composed.data)


def analyze(cfg: DictConfig) -> dict:
    from gpt4llm.analysis import verb_noun_charts as V
    from gpt4llm.analysis.verb_noun import cached_pairs, load_parser
    from gpt4llm.data.records import load_instruction_records
    from gpt4llm.evaluation import paper_figures as F
    from gpt4llm.io.json_files import write_json

    if cfg.field not in ("output", "instruction"):
        from gpt4llm.errors import ConfigError

        raise ConfigError(f"field={cfg.field}: choose output or instruction")
    nlp = load_parser(cfg.parser.model) if cfg.verb_noun else None  # before any work: a missing model is said at once
    files = {Path(str(cfg.data.path)).stem: dataset_file(cfg.data)}
    if cfg.versus:
        other = versus_file(str(cfg.versus))
        files[other.stem if other.stem not in files else f"{other.stem} (versus)"] = other
    out, formats = Path(cfg.paths.output_dir), tuple(cfg.formats)
    records, summary, not_drawn = {}, {"datasets": {}}, {}
    for name, path in files.items():  # duplicates and broken records are left out, and counted
        records[name], loaded = load_instruction_records(path, skip_invalid=True)
        skipped = {reason: s["count"] for reason, s in loaded.summary()["skipped"].items()}
        summary["datasets"][name] = {"file": str(path), "records": len(records[name]), "skipped": skipped}

    # Figure 1d, and the same for the instructions: lengths in words.
    for field, name, label in (
        ("output", "cmp_seq_len_freq", "Output Sequence Length"),
        ("instruction", "instruction_len_freq", "Instruction Length"),
    ):
        lengths = {n: [len(r[field].split()) for r in rs] for n, rs in records.items()}
        F.save(F.draw_output_lengths(lengths, label), out, name, formats)
        for n, values in lengths.items():
            summary["datasets"][n][f"{field}_words_mean"] = round(sum(values) / max(len(values), 1), 2)

    if nlp is not None:
        counts = {}
        for name, path in files.items():
            texts = [r[cfg.field] for r in records[name]]
            started = time.perf_counter()
            pairs, cache, reused = cached_pairs(
                path,
                texts,
                cfg.field,
                nlp,
                Path(cfg.cache_dir),
                batch_size=cfg.parser.batch_size,
                processes=cfg.parser.processes,
            )
            seconds = time.perf_counter() - started
            shutil.copyfile(cache, out / f"verb_noun_{F.slug(name)}.csv")
            counts[name] = V.pair_counts(pairs)
            rows = V.sunburst_rings(counts[name], **cfg.sunburst)
            title = f"{name}: top verbs and their direct objects ({cfg.field})"
            if rows:
                V.write_sunburst_html(rows, title, out / f"sunburst_{F.slug(name)}.html")
                F.save(V.draw_sunburst(rows, title), out, f"sunburst_{F.slug(name)}", ("png",))
            else:  # a pie of nothing cannot be drawn (small data: the notebook's min_count is for 52K texts)
                not_drawn[f"sunburst_{F.slug(name)}"] = V.why_no_sunburst(counts[name], **cfg.sunburst)
            summary["datasets"][name] |= {
                "parsed": len(pairs),
                "with_verb": sum(v is not None for v, _ in pairs),
                "with_pair": sum(counts[name].values()),
                "unique_pairs": len(counts[name]),
                "unique_verbs": len({v for v, _ in counts[name]}),
                "sunburst_pairs": len(rows),
                "top_pairs": [[v, n, c] for (v, n), c in counts[name].most_common(cfg.top_pairs)],
                "parse_seconds": round(seconds, 1),
                "parse_cache": str(cache),
                "parse_reused": reused,
            }
            log.info(
                f"{name}: {len(pairs)} texts {'read from the cache' if reused else 'parsed'} in {seconds:.1f} s; "
                f"{len(counts[name])} unique verb-noun pairs"
            )
        first = next(iter(counts))
        if counts[first]:
            F.save(V.draw_top_pairs(counts, cfg.top_pairs), out, "cmp_freq", formats)
        else:  # its bars are the first dataset's top pairs: there are none
            not_drawn["cmp_freq"] = f"{first}: no text has a verb with a direct-object noun"
    for figure, why in not_drawn.items():
        log.warning(f"{figure}: not drawn: {why}")
    summary |= {
        "field": cfg.field,
        "parser": cfg.parser.model if nlp is not None else None,
        "skipped_figures": not_drawn,
    }
    write_json(out / "summary.json", summary, indent=1)
    print(f"Figures and tables in {out}")
    for name, row in summary["datasets"].items():
        pairs = f", {row['unique_pairs']} unique verb-noun pairs" if "unique_pairs" in row else ""
        print(f"  {name}: {row['records']} records{pairs}")
    for figure, why in not_drawn.items():
        print(f"  not drawn: {figure}: {why}")
    return summary


@hydra_command("analyze")
@reports_user_errors
def main(cfg: DictConfig) -> None:
    analyze(cfg)


if __name__ == "__main__":
    main()
