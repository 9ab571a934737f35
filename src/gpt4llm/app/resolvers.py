"""The config resolvers the commands' YAML uses (`${gpt4llm.model_name:${model.path}}`), registered by app.cli."""

from __future__ import annotations

import os
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


def model_name(path: str | None) -> str:
    """A name for a model directory: its own name, or its run's name for a training export (<run>/export)."""
    if not path:
        return "model"
    p = Path(str(path).rstrip("/"))
    return p.parent.name if p.name == "export" and p.parent.name else p.name or "model"


def stem(path: str | None, default: str) -> str:
    return Path(str(path)).stem if path else default


def synthesis_file(job: DictConfig, name: str) -> str:
    """synthesize's output file name: <name>.answers.json, <name>.<language>.json, comparison_data_v2.json."""
    kind = job.get("name") if isinstance(job, DictConfig) else None
    if kind == "translate":
        return f"{name}.{job.language}.json"
    return "comparison_data_v2.json" if kind == "score" else f"{name}.answers.json"


def groups_help(config_name: str) -> str:
    """The config groups a command's config composes (its defaults list), each with its options: what `--help` lists,
    so that no command offers another command's groups."""
    from importlib.resources import files

    from hydra.core.config_store import ConfigStore

    conf = files("gpt4llm.conf")
    defaults = OmegaConf.load(conf / f"{config_name}.yaml").get("defaults", [])
    stored = ConfigStore.instance().repo  # groups registered in code (synthesize's job)
    lines = []
    for entry in defaults:
        if isinstance(entry, str) and (conf / f"{entry}.yaml").is_file():  # another primary config (plan: train)
            lines.append(groups_help(entry))
        if not isinstance(entry, DictConfig):
            continue
        ((key, default),) = entry.items()
        group = key.split("@")[0].split()[-1].strip("/")
        if group in ("hydra", "paths"):
            continue
        directory = conf / group
        options = (
            [p.name.removesuffix(".yaml") for p in directory.iterdir() if p.name.endswith(".yaml")]
            if directory.is_dir()
            else []
        )
        options += [name.removesuffix(".yaml") for name in stored.get(group, {})]
        lines.append(f"{group}: {', '.join(sorted(options))}  (default: {default})")
    return "\n".join(lines) or "(none: set the keys below directly)"


def run_dir(ckpt_path: str | None, default: str) -> str:
    """A resumed run continues in the run directory of its checkpoint (<run>/checkpoints/<ckpt>), so its TensorBoard
    curves, logs and export stay in one place; any other run gets `default`."""
    if ckpt_path:
        checkpoints = Path(str(ckpt_path)).resolve().parent
        if checkpoints.name == "checkpoints":
            return str(checkpoints.parent)
    return default


def config_subdir(output_dir: str) -> str:
    """Where Hydra saves a launch's config in its run directory: `.hydra`, unless an earlier launch saved there (a
    resume, or a second launch that the run's lock then refuses); that one's goes to `.hydra/launches/<time>_<pid>`,
    so the run's own config is never overwritten."""
    if not (Path(output_dir) / ".hydra" / "config.yaml").exists():
        return ".hydra"
    return f".hydra/launches/{time.strftime('%Y-%m-%d_%H-%M-%S')}_{os.getpid()}"


def register() -> None:
    OmegaConf.register_new_resolver("gpt4llm.model_name", model_name, replace=True)
    OmegaConf.register_new_resolver("gpt4llm.stem", stem, replace=True)
    OmegaConf.register_new_resolver("gpt4llm.synth_file", synthesis_file, replace=True)
    OmegaConf.register_new_resolver("gpt4llm.groups_help", groups_help, replace=True)
    OmegaConf.register_new_resolver("gpt4llm.run_dir", run_dir, replace=True)
    OmegaConf.register_new_resolver("gpt4llm.pid", os.getpid, replace=True, use_cache=True)
    # cached: the answer must not change once Hydra has saved the config it names
    OmegaConf.register_new_resolver("gpt4llm.config_subdir", config_subdir, replace=True, use_cache=True)
