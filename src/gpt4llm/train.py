"""Train: `python -m gpt4llm.train [group=option ...] [key=value ...]` (see conf/train.yaml).

With no arguments it fine-tunes the tiny model on the demo tasks, offline on CPU, in a few minutes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from gpt4llm.app.cli import CONFIG_PATH, reports_user_errors, use_hydra_logging

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, float]:
    # Heavy imports here, so that --help and --cfg job answer at once.
    import lightning as L
    from hydra.utils import instantiate

    from gpt4llm.app.checks import check_config, check_values
    from gpt4llm.models import adapters
    from gpt4llm.models.export import export_hf
    from gpt4llm.models.hf import prepare_tokenizer
    from gpt4llm.training.hardware import (
        check_launch,
        check_precision,
        cuda_capabilities,
        derive_accumulation,
    )
    from gpt4llm.training.hyperparameters import compared_hyperparameters
    from gpt4llm.training.resume import checkpoint_step

    check_config(cfg)
    check_values(cfg)
    check_launch()  # under torchrun/srun every rank must name the same run directory
    if adapters.active(cfg.get("peft")) and cfg.peft.get("quantization"):
        adapters.check_4bit()  # QLoRA where bitsandbytes cannot run 4-bit stops here, in one line
    if cfg.trainer.accelerator != "cpu":  # bf16 asked for on a GPU without it (V100) stops here, not in a kernel
        check_precision(cfg.trainer.precision, cfg.trainer.accelerator, *cuda_capabilities())
    L.seed_everything(cfg.seed, workers=True)
    tokenizer = prepare_tokenizer(
        cfg.model.path, cfg.model.tiny, cfg.model.tokenizer, cfg.data.get("template", "alpaca")
    )
    datamodule = instantiate(cfg.data, tokenizer=tokenizer)
    module = instantiate(cfg.task, tokenizer=tokenizer)
    validating = cfg.data.val_size > 0
    if not validating:
        metric = optimized_metric(cfg)
        fallback = f"; optimized_metric falls back to {metric}" if metric != cfg.optimized_metric else ""
        log.info(f"data.val_size=0: nothing is held out (as in the paper); no validation loop{fallback}")
    # A resumed run goes on in its run directory: TensorBoard drops what the interrupted run logged past the checkpoint.
    purge = {"purge_step": checkpoint_step(cfg.ckpt_path)} if cfg.ckpt_path else {}
    strategy = instantiate(cfg.strategy)
    if adapters.active(cfg.get("peft")) and hasattr(strategy, "exclude_frozen_parameters"):
        strategy.exclude_frozen_parameters = True  # DeepSpeed's checkpoint of an adapter run: the adapters alone
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        **({} if validating else {"limit_val_batches": 0}),
        strategy=strategy,
        callbacks=[instantiate(c) for c in cfg.callbacks.values() if c],
        logger=[
            instantiate(c, **(purge if c._target_.endswith("TensorBoardLogger") else {}))
            for c in cfg.logger.values()
            if c
        ],
    )
    if cfg.global_batch_size:
        trainer.accumulate_grad_batches = derive_accumulation(
            cfg.global_batch_size, cfg.data.batch_size, trainer.world_size
        )
        log.info(f"Global batch {cfg.global_batch_size}: gradient accumulation {trainer.accumulate_grad_batches}")
    # The settings runs are compared by, not the whole config (that is the run directory's .hydra/config.yaml).
    hparams = compared_hyperparameters(cfg, _hydra_choices())
    for logger in trainer.loggers:
        logger.log_hyperparams(hparams)

    if validating and cfg.validate_first and not cfg.ckpt_path:
        trainer.validate(module, datamodule=datamodule)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    if validating and module.validated_at_step != trainer.global_step and not trainer.interrupted:
        # Stopped by max_steps between two validations: the final figures should be those of the final model.
        trainer.validate(module, datamodule=datamodule)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    for logger in trainer.loggers:  # TensorBoard's HParams tab: this run's settings beside its final metrics
        if isinstance(logger, L.pytorch.loggers.TensorBoardLogger):
            logger.log_hyperparams(hparams, metrics={f"hp/{k}": v for k, v in metrics.items()})

    out = Path(cfg.paths.output_dir)
    if cfg.export:  # on every rank: ZeRO-3 and FSDP gather the weights collectively; rank 0 writes and verifies
        export_hf(module.model, tokenizer, out / "export", trainer=trainer, load_base=module.load_base_for_merge)
    if trainer.is_global_zero:
        from gpt4llm.io.atomic import write_text

        # The final figures as a file, for what reads runs later (gpt4llm.reproduce's report).
        write_text(out / "metrics.json", json.dumps({"global_step": trainer.global_step, **metrics}, indent=1))
        checkpoint = trainer.checkpoint_callback
        print(f"\nRun directory: {out}")
        print(f"  TensorBoard:  tensorboard --logdir {out}")
        if checkpoint is not None and checkpoint.last_model_path:
            print(f"  Checkpoint:   {checkpoint.last_model_path}  (resume with ckpt_path=...)")
        if cfg.export:
            print(f"  Export:       {out / 'export'}  (AutoModelForCausalLM.from_pretrained)")
        print("  Final:        " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
    _end_process_group()
    return metrics


def _end_process_group() -> None:
    """Each rank of a multi-process run stops its process group's threads before the interpreter exits: left to
    the exit, a rank of a torchrun job was once killed by "terminate called without an active exception" (SIGABRT)
    after a complete run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # no rank tears down while another still exports or writes
        dist.destroy_process_group()


def optimized_metric(cfg: DictConfig) -> str:
    """What the run reports to a sweeper: `optimized_metric`, or with nothing held out (data.val_size=0, the paper's
    runs) its training counterpart, val/loss -> train/loss, since no val/ metric is ever logged."""
    name = cfg.optimized_metric
    if cfg.data.val_size == 0 and name.startswith("val/"):
        return "train/" + name.removeprefix("val/")
    return name


def _hydra_choices() -> dict | None:
    """The option chosen in each config group (`model=llama7b`), when Hydra composed the run."""
    from hydra.core.hydra_config import HydraConfig

    return dict(HydraConfig.get().runtime.choices) if HydraConfig.initialized() else None


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
@reports_user_errors
def main(cfg: DictConfig) -> float | None:
    use_hydra_logging()
    metrics = train(cfg)
    name = optimized_metric(cfg)
    value = metrics.get(name)  # what a hyperparameter sweeper optimises
    if value is None:
        log.warning(f"optimized_metric={name} was not logged; the run logged {sorted(metrics)}")
    else:
        print(f"  Optimized metric {name}: {value:.6g}")
    return value


if __name__ == "__main__":
    main()
