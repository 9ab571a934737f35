"""The paper's study as stages (gpt4llm.reproduction.runner), from a preset (conf/preset/*.yaml):

train/<model>            SFT of each model                        -> export/, metrics.json
train/reward_model       the reward model                         -> export/, metrics.json
generate/<model>/<set>   every model on every eval set            -> responses.jsonl
evaluate/rouge           ROUGE-L by reference length (Figure 6)   -> rouge_len*.json
bestofn                  N samples ranked by the reward model     -> bestofn.jsonl
evaluate/reward          the ranking groups rank1..N and B        -> reward_summary.json, ranking_groups/
judge/<opponent>         the FastChat review vs each opponent     -> judge_summary_<model>.json
plots                    every figure, the paper's Figure 3 too   -> *.png, *.pdf
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from omegaconf import DictConfig

from gpt4llm.errors import ServerStartError
from gpt4llm.reproduction.runner import Stage, die_with_parent


def _strings(values) -> list[str]:
    return [str(v) for v in values or []]


def merged(*override_lists) -> list[str]:
    """Hydra overrides from several lists, a later one replacing an earlier one of the same key (Hydra refuses a key
    given twice): the stage's own settings win over the preset's common ones."""
    out: dict[str, str] = {}
    for overrides in override_lists:
        for override in _strings(overrides):
            key = override.split("=", 1)[0].lstrip("+~")
            out.pop(key, None)
            out[key] = override
    return list(out.values())


def ranking_group_names(args: list[str]) -> list[str]:
    n = next((int(a.split("=", 1)[1]) for a in args if re.fullmatch(r"n=\d+", a)), 5)  # bestofn.yaml's default
    return [f"rank{k}" for k in range(1, n + 1)] + ["B"]


def build_stages(cfg: DictConfig, root: Path, judge_server: JudgeServer | None = None) -> list[Stage]:
    p = cfg.preset
    paths = [f"paths.data_dir={cfg.paths.data_dir}", f"paths.log_dir={cfg.paths.log_dir}"]
    launcher = _strings(cfg.launcher) or None
    stages: list[Stage] = []
    export = lambda model: root / "train" / model / "export"  # noqa: E731
    answers = lambda model, eval_set: root / "generate" / model / eval_set / "responses.jsonl"  # noqa: E731

    peft = cfg.peft.name if cfg.get("peft") else "none"
    adapters = [f"peft={peft}"] if peft != "none" else []  # beyond the paper: LoRA or QLoRA for the SFT models
    for model, args in p.sft.items():
        stages.append(
            Stage(
                f"train/{model}",
                "gpt4llm.train",
                merged(p.train_common, args, paths, adapters),
                outputs=["export/config.json", "metrics.json"],
                launcher=launcher,
            )
        )
    stages.append(
        Stage(
            "train/reward_model",
            "gpt4llm.train",
            merged(p.train_common, p.reward_model, paths),
            outputs=["export/config.json", "metrics.json"],
            launcher=launcher,
        )
    )
    dpo = p.get("dpo") or {}
    tuned = [dpo.name] if dpo.get("enabled") else []  # beyond the paper: the SFT model after DPO
    if tuned:
        stages.append(
            Stage(
                f"train/{dpo.name}",
                "gpt4llm.train",
                merged(dpo.args, [f"model.path={export(dpo.model)}"], paths),
                needs=[f"train/{dpo.model}"],
                outputs=["export/config.json", "metrics.json"],
                launcher=launcher,
            )
        )
    for model in [*p.sft, *tuned]:
        for eval_set, args in p.eval_sets.items():
            stages.append(
                Stage(
                    f"generate/{model}/{eval_set}",
                    "gpt4llm.generate",
                    merged(args, p.generate_common, [f"model.path={export(model)}", f"model.name={model}"], paths),
                    needs=[f"train/{model}"],
                    outputs=["responses.jsonl"],
                )
            )

    rouge_models = [*p.rouge.models, *tuned]
    rouge_inputs = [answers(m, p.rouge.eval_set) for m in rouge_models]
    stages.append(
        Stage(
            "evaluate/rouge",
            "gpt4llm.evaluate",
            ["metric=rouge", f"responses=[{','.join(map(str, rouge_inputs))}]", *paths],
            needs=[f"generate/{m}/{p.rouge.eval_set}" for m in rouge_models],
            outputs=["rouge_lenALL.json"],
        )
    )

    b = p.bestofn
    stages.append(
        Stage(
            "bestofn",
            "gpt4llm.bestofn",
            [
                f"sft_model={export(b.model)}",
                f"reward_model={export('reward_model')}",
                f"prompts={answers(b.model, b.eval_set)}",
                *_strings(b.args),
                *paths,
            ],
            needs=[f"train/{b.model}", "train/reward_model", f"generate/{b.model}/{b.eval_set}"],
            outputs=["bestofn.jsonl"],
        )
    )
    stages.append(
        Stage(
            "evaluate/reward",
            "gpt4llm.evaluate",
            ["metric=reward", f"responses={root / 'bestofn' / 'bestofn.jsonl'}", *paths],
            needs=["bestofn"],
            outputs=["reward_summary.json"],
        )
    )

    j = p.judge
    groups = ranking_group_names(_strings(b.args))
    judged_models = [*j.models, *tuned]
    judged = [answers(m, j.eval_set) for m in judged_models]
    judged += [root / "evaluate" / "reward" / "ranking_groups" / g / "responses.jsonl" for g in groups]
    skip = judge_skip_reason(j)
    judge_stages = []
    for opponent, spec in j.opponents.items():
        needs = [f"generate/{m}/{j.eval_set}" for m in judged_models] + ["evaluate/reward"]
        inputs: list[str] = []
        reason = skip  # the same for every opponent (no judge key)
        downloads: dict[str, dict] = {}
        if spec.get("model"):
            opponent_file = answers(spec.model, j.eval_set)
            needs.append(f"generate/{spec.model}/{j.eval_set}")
        else:  # a published answer file: downloaded when the stage runs, not while the study is planned
            opponent_file = Path(str(spec.path))
            inputs.append(str(opponent_file))
            downloads[str(opponent_file)] = {"url": spec.get("url"), "checksum": spec.get("checksum")}
        args = [
            "metric=judge",
            f"responses=[{','.join(map(str, judged))}]",
            f"metric.opponent={opponent_file}",
            *_strings(j.eval),
            *_strings(j.args),
            *paths,
        ]
        runtime = None
        if j.serve:
            needs.append(f"train/{j.serve}")
            args.append(f"metric.cache={root / 'judge' / opponent / 'replies.jsonl'}")  # the served model's own
            runtime = judge_server.arguments if judge_server else None
        stage = Stage(
            f"judge/{opponent}",
            "gpt4llm.evaluate",
            args,
            needs=list(dict.fromkeys(needs)),
            inputs=inputs,
            downloads=downloads,
            outputs=[f"judge_summary_{j.models[0]}.json"],
            skip=reason,
            runtime_args=runtime,
        )
        judge_stages.append(stage.name)
        stages.append(stage)

    stages.append(
        Stage(
            "plots",
            "gpt4llm.plots",
            [f"results={root}", "paper=true", *paths],
            needs=["evaluate/rouge"],
            after=judge_stages + ["evaluate/reward"],
        )
    )
    return stages


def judge_skip_reason(judge: DictConfig) -> str | None:
    if judge.serve or not judge.key_env:
        return None
    if not os.environ.get(str(judge.key_env)):
        return (
            f"no judge key: ${judge.key_env} is not set (set it, and preset.judge.args=[metric.base_url=...,"
            f"metric.model=...] for an endpoint other than OpenAI's GPT-4)"
        )
    return None


class JudgeServer:
    """A model of the study served by `python -m gpt4llm.serve` on 127.0.0.1 as the judge, started when a judge stage
    first runs (not when every judge stage is reused) and stopped at the end."""

    def __init__(self, export_dir: Path, name: str, log_dir: Path):
        self.export_dir, self.name, self.log_dir = export_dir, name, log_dir
        self.process: subprocess.Popen | None = None
        self.base_url: str | None = None

    def arguments(self) -> list[str]:
        if self.process is None:
            self.start()
        return [f"metric.base_url={self.base_url}", f"metric.model={self.name}", "metric.api_key_env=null"]

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        env.pop("GPT4LLM_API_KEY", None)  # served for this study alone, on loopback: no key
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gpt4llm.serve",
                f"model.path={self.export_dir}",
                f"model.name={self.name}",
                "port=0",
                "threads=1",
                f"hydra.run.dir={self.log_dir}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            preexec_fn=die_with_parent(),  # a server left behind by a killed reproduce would serve on for ever
        )
        deadline, lines = time.monotonic() + 300, []
        while time.monotonic() < deadline and self.process.poll() is None:
            line = self.process.stdout.readline()
            lines.append(line)
            if line.startswith("Serving "):
                self.base_url = line.rsplit(" at ", 1)[1].strip()
                # The rest of its output is read and dropped: a full pipe would stall the server.
                threading.Thread(target=self.process.stdout.read, daemon=True).start()
                return
        self.stop()
        raise ServerStartError(f"the judge server for {self.export_dir} did not start:\n{''.join(lines[-15:])}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
