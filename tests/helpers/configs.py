"""Where the configs are, and the composed configs and overrides the tests run with (tiny model, few steps)."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
SHARED_DATA = ROOT.parent / "shared" / "data"

# Small enough that a training step takes milliseconds; the same builder as model=tiny.
TINY_SPEC = dict(
    vocab_size=512,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=128,
    corpus_records=600,
)
TINY_OVERRIDES = [f"model.tiny.{k}={v}" for k, v in TINY_SPEC.items()]


def compose_train(overrides: list[str] = ()):
    """The composed train config, as `python -m gpt4llm.train <overrides>` would see it (without Hydra's runtime)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def demo_overrides(tmp: Path, *extra: str) -> list[str]:
    """A fast demo run under `tmp`: tiny model, a few hundred records, a handful of steps."""
    return [
        f"paths.data_dir={tmp / 'data'}",
        f"hydra.run.dir={tmp / 'run'}",
        f"hydra.sweep.dir={tmp / 'sweep'}",
        *TINY_OVERRIDES,
        "data.demo.num_records=240",
        "data.val_size=40",
        "data.batch_size=8",
        "data.exact_match_examples=8",
        "trainer.max_epochs=1",
        "trainer.max_steps=6",
        "trainer.log_every_n_steps=1",
        *extra,
    ]


def rm_overrides(tmp: Path, *extra: str) -> list[str]:
    """The SFT demo's fast settings (tiny model, few records and steps), with the pairs demo and the RM task."""
    sft_only = ("data.exact_match_examples",)  # instruction data only
    return ["task=rm", "data=demo_pairs", *(o for o in demo_overrides(tmp) if not o.startswith(sft_only)), *extra]


def synth_cfg(tmp_path: Path, base_url: str, *overrides: str):
    """synthesize's config against a fake teacher at `base_url`: short timeouts, few retries, outputs under tmp_path."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(
            config_name="synthesize",
            overrides=[
                f"teacher.base_url={base_url}",
                "teacher.model=teacher-1",
                "teacher.api_key_env=SYNTH_TEST_KEY",
                f"teacher.cache={tmp_path / 'cache' / 'answers.jsonl'}",
                "teacher.timeout=1",
                "teacher.max_retries=2",
                "teacher.backoff=0.01",
                "teacher.concurrency=4",
                f"paths.output_dir={tmp_path / 'out'}",
                *overrides,
            ],
        )
