"""The settings a person compares between runs, for the loggers' hyperparameter views (TensorBoard's HParams tab,
Weights & Biases' config, MLflow's params).

Not the whole config: its ~90 keys bury the few that differ between runs under `_target_` class paths, the machine's
absolute paths and unset options. The whole resolved config is in the run directory's `.hydra/config.yaml`.
"""

from __future__ import annotations

import os

from omegaconf import DictConfig, OmegaConf

# The config groups whose chosen option names a run (`model=llama7b data=alpaca_gpt4 ...`), when Hydra composed it.
GROUPS = ("experiment", "task", "model", "data", "peft", "strategy", "trainer")
# Values by key: what makes two runs' results differ, in the order a reader scans them. Unset ones are left out.
KEYS = (
    "model.path",
    "data.path",
    "data.template",
    "data.train_on",
    "data.pairing",
    "model.max_length",
    "data.batch_size",
    "global_batch_size",
    "trainer.accumulate_grad_batches",
    "trainer.max_epochs",
    "trainer.max_steps",
    "task.optimizer.lr",
    "task.optimizer.weight_decay",
    "task.lr_scheduler",
    "task.warmup_ratio",
    "task.loss",
    "task.beta",
    "task.label_smoothing",
    "task.reference",
    "peft.r",
    "peft.lora_alpha",
    "peft.lora_dropout",
    "peft.target_modules",
    "peft.quantization",
    "trainer.precision",
    "trainer.devices",
    "trainer.num_nodes",
    "model.gradient_checkpointing",
    "seed",
)


def compared_hyperparameters(cfg: DictConfig, choices: dict | None = None) -> dict[str, float | int | str | bool]:
    """Scalars keyed as on the command line (`task.optimizer.lr`); `choices`: Hydra's chosen option per group."""
    params: dict[str, float | int | str | bool] = {}
    for group in GROUPS:
        if (choices or {}).get(group):
            params[group] = str(choices[group])
    for key in KEYS:
        value = OmegaConf.select(cfg, key, default=None)
        if value is None or value == "":
            continue
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value, resolve=True)
        if isinstance(value, list):
            value = ",".join(map(str, value))
        elif isinstance(value, str) and os.path.isabs(value):
            value = _short_path(value)
        params[key] = value
    return params


def _short_path(path: str) -> str:
    """A local file or model by its last two path parts (`Alpaca/export`, `data/alpaca_gpt4_data.json`): what tells
    runs apart, without the machine's directories."""
    parts = [p for p in path.rstrip("/").split("/") if p]
    return "/".join(parts[-2:])
