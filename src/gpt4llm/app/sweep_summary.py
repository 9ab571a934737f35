"""The line a sweep ends with: which job did best by `optimized_metric` (a Hydra callback, conf/hydra/default.yaml).

Hydra's basic sweeper reports nothing and Optuna's writes its best parameters to a file; either way a user scanned
every job's directory. Each `train` job writes its final metrics to `metrics.json`, read back here."""

from __future__ import annotations

import json
from pathlib import Path

from hydra.experimental.callback import Callback

MINIMISED = ("loss", "ppl", "perplexity")  # a metric named so is better lower; any other (accuracy, exact match) higher


def best_job(sweep_dir: Path, metric: str, direction: str | None = None) -> str | None:
    """One line naming the best job of the sweep in `sweep_dir`, None where no job wrote metrics (not `train`)."""
    results = []
    for metrics_file in sorted(sweep_dir.glob("*/metrics.json")):
        values = json.loads(metrics_file.read_text())
        # with nothing held out a val/ metric is reported as its train/ counterpart (gpt4llm.train.optimized_metric)
        name = metric if metric in values else "train/" + metric.removeprefix("val/")
        if name in values:
            results.append((float(values[name]), name, metrics_file.parent))
    if not results:
        return None
    lower = direction == "minimize" if direction else any(word in metric for word in MINIMISED)
    value, name, job = min(results, key=lambda r: r[0]) if lower else max(results, key=lambda r: r[0])
    side = "lowest" if lower else "highest"
    return f"Best job: {job} ({name}={value:.4g}, the {side} of {len(results)} jobs; each job's in its metrics.json)"


class BestJob(Callback):
    def on_multirun_end(self, config, **kwargs) -> None:
        metric = config.get("optimized_metric")
        if metric:
            line = best_job(Path(config.hydra.sweep.dir), str(metric), config.hydra.sweeper.get("direction"))
            if line:
                print(line, flush=True)
