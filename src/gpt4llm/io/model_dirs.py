"""Whether a directory is one the project may write a built model into: kept free of heavy imports, since `plan`
asks it before anything is loaded."""

from __future__ import annotations

from pathlib import Path

from gpt4llm.errors import ConfigError

# What marks a directory as a model that is not ours: transformers' config or tokenizer files, or weights.
MODEL_FILE_NAMES = ("config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "adapter_config.json")
MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def refuse_foreign_directory(path: Path) -> None:
    """The tiny model is written only where it was built before (its `tiny_spec.json` marks the directory as ours) or
    where nothing is: a rebuild replaces the whole directory, so a `model.path` pointed at the user's own model under
    `model=tiny` (a forgotten `model=hf`) would otherwise be overwritten with a random tiny one."""
    if not path.exists() and not path.is_symlink():
        return
    if (path / "tiny_spec.json").is_file():
        return
    if not path.is_dir():
        raise ConfigError(
            f"model.path={path} is a file, not a directory gpt4llm built: model=tiny builds its tiny model only in a "
            f"directory of its own (leave model.path at its default, or name a new directory)"
        )
    entries = sorted(p.name for p in path.iterdir())
    if any(name in MODEL_FILE_NAMES or name.endswith(MODEL_FILE_SUFFIXES) for name in entries):
        raise ConfigError(
            f"model.path={path} holds a model that gpt4llm did not build, and model=tiny would replace it with a "
            f"random tiny one: to train that model, add model=hf (nothing was written there)"
        )
    raise ConfigError(
        f"model.path={path} is a directory gpt4llm did not build ({len(entries)} entries): model=tiny builds its tiny "
        f"model only in a directory of its own (leave model.path at its default, or name a new directory)"
    )
