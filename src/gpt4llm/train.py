"""Train: `python -m gpt4llm.train [group=option ...] [key=value ...]` (see conf/train.yaml).

With no arguments it fine-tunes the tiny model on the demo tasks, offline on CPU, in a few minutes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig, open_dict

from gpt4llm.app.cli import hydra_command, reports_user_errors, use_hydra_logging

log = logging.getLogger(__name__)


def train(cfg: DictConfig, started: float | None = None) -> dict[str, float]:
    """Trains as `cfg` says, the one training in its run directory while it runs (a second stops at once, naming the
    first: gpt4llm.training.resume.run_directory_lock); returns the final metrics. `started`: when the run's time
    began (the command: its process's start), for the phases in the run summary; None: now."""
    import time

    from gpt4llm.training.resume import run_directory_lock

    started = time.time() if started is None else started
    with run_directory_lock(cfg.paths.output_dir):
        return _train(cfg, started)


def _train(cfg: DictConfig, started: float) -> dict[str, float]:
    # Heavy imports here, so that --help and --cfg job answer at once.
    import lightning as L
    from hydra.utils import instantiate

    from gpt4llm.app.checks import check_config, check_values
    from gpt4llm.models.export import export_hf
    from gpt4llm.models.hf import prepare_tokenizer
    from gpt4llm.training.callbacks import LastValidation, RandomState, RecordedSettings, ValidationCost
    from gpt4llm.training.datamodules import build_datamodule
    from gpt4llm.training.hardware import (
        check_launch,
        check_precision,
        cuda_capabilities,
        derive_accumulation,
    )
    from gpt4llm.training.hyperparameters import compared_hyperparameters
    from gpt4llm.training.phases import PhaseClock
    from gpt4llm.training.resume import check_resume, checkpoint_step, run_settings
    from gpt4llm.training.strategies import build_strategy, check_adapters, check_strategy

    check_config(cfg)
    check_values(cfg)
    check_launch()  # under torchrun/srun every rank must name the same run directory
    check_adapters(cfg.get("peft"))
    check_strategy(cfg.strategy, cfg.trainer.precision, cfg.get("peft"))
    clock = PhaseClock(started)
    clock.mark("start-up")
    if cfg.trainer.accelerator != "cpu":  # bf16 asked for on a GPU without it (V100) stops here, not in a kernel
        check_precision(cfg.trainer.precision, cfg.trainer.accelerator, *cuda_capabilities())
    L.seed_everything(cfg.seed, workers=True)
    tokenizer, trains = prepare_tokenizer(
        cfg.model.path, cfg.model.tiny, cfg.model.tokenizer, cfg.data.get("template", "auto")
    )
    with open_dict(cfg.data):
        cfg.data.template = trains.format.name  # what data.template=auto decided, for the data, the task, the logs
    log.info(f"Prompt format: {trains.why}")
    datamodule = build_datamodule(cfg, tokenizer)
    module = instantiate(cfg.task, tokenizer=tokenizer)
    if hasattr(module, "reward_factories"):  # online RL: a judge's reward needs the client, from a layer above models
        from gpt4llm.evaluation.judge_reward import judge_reward

        module.reward_factories = {"judge": judge_reward}
    validating = cfg.data.val_size != 0  # a number, or auto (5% of the records)
    if not validating:
        metric = optimized_metric(cfg)
        fallback = f"; optimized_metric falls back to {metric}" if metric != cfg.optimized_metric else ""
        log.info(f"data.val_size=0: nothing is held out (as in the paper); no validation loop{fallback}")
    # A resumed run goes on in its run directory: TensorBoard drops what the interrupted run logged past the checkpoint.
    purge = {"purge_step": checkpoint_step(cfg.ckpt_path)} if cfg.ckpt_path else {}
    last_validation, recorded, validation_cost = LastValidation(), RecordedSettings(), ValidationCost()
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        **({} if validating else {"limit_val_batches": 0}),
        strategy=build_strategy(cfg.strategy, cfg.get("peft")),
        callbacks=[
            *(instantiate(c) for name, c in cfg.callbacks.items() if c and not _bar_off(name, cfg)),
            last_validation,
            validation_cost,
            recorded,
            RandomState(),  # dropout's masks after a resume as without one
            clock,
        ],
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
    if hasattr(datamodule, "accumulate"):  # online RL: the prompts of one generation, repeated num_iterations times
        datamodule.accumulate = trainer.accumulate_grad_batches
    recorded.settings = run_settings(cfg, trainer, datamodule)  # what every checkpoint records of this run
    if cfg.ckpt_path:  # a resume that would train another run (other data, template, task, ...) stops here
        recorded.settings = check_resume(cfg.ckpt_path, recorded.settings, datamodule)
    # The settings runs are compared by, not the whole config (that is the run directory's .hydra/config.yaml).
    hparams = compared_hyperparameters(cfg, _hydra_choices())
    for logger in trainer.loggers:
        logger.log_hyperparams(hparams)

    if validating and cfg.validate_first and not cfg.ckpt_path:
        trainer.validate(module, datamodule=datamodule)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    if validating and last_validation.step != trainer.global_step and not trainer.interrupted:
        # Stopped by max_steps between two validations: the final figures should be those of the final model.
        trainer.validate(module, datamodule=datamodule)
    clock.mark("training and validation")
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    for logger in trainer.loggers:  # TensorBoard's HParams tab: this run's settings beside its final metrics
        if isinstance(logger, L.pytorch.loggers.TensorBoardLogger):
            logger.log_hyperparams(hparams, metrics={f"hp/{k}": v for k, v in metrics.items()})

    out = Path(cfg.paths.output_dir)
    if cfg.export:  # on every rank: ZeRO-3 and FSDP gather the weights collectively; rank 0 writes and verifies
        export_hf(module.model, tokenizer, out / "export", trainer=trainer, load_base=module.load_base_for_merge)
        clock.mark("export")
    if trainer.is_global_zero:
        from gpt4llm.io.atomic import write_text

        # The final figures as a file for what reads runs later (gpt4llm.reproduce), with where the time went
        everything = {"global_step": trainer.global_step, **metrics, **clock.metrics()}
        write_text(out / "metrics.json", json.dumps(everything, indent=1))
        checkpoint = trainer.checkpoint_callback
        print(f"\nRun directory: {out}")
        if any(isinstance(logger, L.pytorch.loggers.TensorBoardLogger) for logger in trainer.loggers):
            print(f"  TensorBoard:  tensorboard --logdir {out}")
        if checkpoint is not None and checkpoint.last_model_path:
            print(f"  Checkpoint:   {checkpoint.last_model_path}  (resume with ckpt_path=...)")
        if cfg.export:
            print(f"  Export:       {out / 'export'}  (AutoModelForCausalLM.from_pretrained)")
        print("  Final:        " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
        if validation_cost.summary():
            print(f"  Validation:   {validation_cost.summary()}")
        print(f"  Time:         {clock.summary()}")
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
    if name == "val/loss" and cfg.task._target_.startswith("gpt4llm.models.rl_module."):
        name = "val/reward"  # online RL has no loss to compare on held-out data: the reward its samples earn
    if cfg.data.val_size == 0 and name.startswith("val/"):
        return "train/" + name.removeprefix("val/")
    return name


def _hydra_choices() -> dict | None:
    """The option chosen in each config group (`model=llama7b`), when Hydra composed the run."""
    from hydra.core.hydra_config import HydraConfig

    return dict(HydraConfig.get().runtime.choices) if HydraConfig.initialized() else None


def _bar_off(callback: str, cfg: DictConfig) -> bool:
    """The progress bar's callback, left out when the trainer has no bar (Lightning refuses a bar callback then)."""
    return callback == "progress_bar" and not cfg.trainer.get("enable_progress_bar", True)


@hydra_command("train")
@reports_user_errors
def main(cfg: DictConfig) -> float | None:
    use_hydra_logging()
    from gpt4llm.training.phases import run_started

    metrics = train(cfg, started=run_started())  # the whole process: what its user waited for
    name = optimized_metric(cfg)
    value = metrics.get(name)  # what a hyperparameter sweeper optimises
    if value is None:
        log.warning(f"optimized_metric={name} was not logged; the run logged {sorted(metrics)}")
    else:
        print(f"  Optimized metric {name}: {value:.6g}")
    return value


if __name__ == "__main__":
    main()
