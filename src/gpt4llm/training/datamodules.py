"""Which data module a run's task trains on, from its data config: the one `train` and `prepare` both build."""

from __future__ import annotations

from omegaconf import DictConfig


def build_datamodule(cfg: DictConfig, tokenizer):
    """The data module of `cfg.data`; for a task that trains on prompts (online RL) the same file's prompts
    (data.prompt_datamodule), whatever kind of data the config names."""
    from hydra.utils import get_class, instantiate

    if getattr(get_class(cfg.task._target_), "trains_on", None) != "prompts":
        return instantiate(cfg.data, tokenizer=tokenizer)
    from gpt4llm.models.rl_module import effective_prompt_length

    longest = effective_prompt_length(
        cfg.data.max_length, cfg.task.max_completion_length, cfg.task.get("max_prompt_length")
    )
    return instantiate(
        cfg.data,
        _target_="gpt4llm.data.prompt_datamodule.PromptDataModule",
        tokenizer=tokenizer,
        max_prompt_length=longest,
        num_iterations=cfg.task.num_iterations,
    )
