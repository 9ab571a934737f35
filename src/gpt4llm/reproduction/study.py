"""The paper's study as stages (gpt4llm.reproduction.runner), from a preset (conf/preset/*.yaml):

train/<model>            SFT of each model                        -> export/, metrics.json
train/reward_model       the reward model                         -> export/, metrics.json
train/<model>-DPO, -GRPO beyond the paper, when the preset enables them: DPO on the comparisons, GRPO rewarded by
                         the study's reward model                 -> export/, metrics.json
generate/<model>/<set>   every model on every eval set            -> responses.jsonl
evaluate/rouge           ROUGE-L by reference length (Figure 6)   -> rouge_len*.json
bestofn                  N samples ranked by the reward model     -> bestofn.jsonl
evaluate/reward          the ranking groups rank1..N and B        -> reward_summary.json, ranking_groups/
judge/<opponent>         the FastChat review vs each opponent     -> judge_summary_<model>.json
benchmark/<metric>/<model> beyond the paper, when the preset enables them: MT-Bench, AlpacaEval 2, Arena-Hard,
                         judged by the study's judge               -> <metric>_summary_<model>.json
plots                    every figure, the paper's Figure 3 too   -> *.png, *.pdf
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from gpt4llm.errors import ConfigError, ServerStartError
from gpt4llm.reproduction.runner import Stage, die_with_parent

TRAINED = ("export/config.json", "metrics.json")  # what a training stage leaves


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
    """The study's stages in the order they run: training, generation, ROUGE, best-of-N, the reviews, the figures."""
    p = cfg.preset
    layout = Layout(
        root,
        paths=[f"paths.data_dir={cfg.paths.data_dir}", f"paths.log_dir={cfg.paths.log_dir}"],
        launcher=_strings(cfg.launcher) or None,
    )
    tuned = tuned_models(p)
    groups = ranking_group_names(_strings(p.bestofn.args))
    judges = judge_stages(p.judge, layout, tuned, groups, judge_server)
    benchmarks = benchmark_stages(p, layout, tuned, judge_server)
    return [
        *training_stages(p, layout, peft_overrides(cfg)),
        *beyond_stages(p, layout),
        *generation_stages(p, layout, [*p.sft, *tuned]),
        rouge_stage(p.rouge, layout, tuned),
        *best_of_n_stages(p.bestofn, layout, tuned),
        *judges,
        *benchmarks,
        plots_stage(layout, [stage.name for stage in [*judges, *benchmarks]]),
    ]


@dataclass(frozen=True)
class Layout:
    """Where the study's stages write under its root, and what every stage's command is given."""

    root: Path
    paths: list[str]  # paths.data_dir and paths.log_dir, the same for every command
    launcher: list[str] | None  # the multi-node prefix of the training stages

    def export(self, model: str) -> Path:
        return self.root / "train" / model / "export"

    def answers(self, model: str, eval_set: str) -> Path:
        return self.root / "generate" / model / eval_set / "responses.jsonl"


def peft_overrides(cfg: DictConfig) -> list[str]:
    """Beyond the paper: the SFT models with LoRA or QLoRA adapters (the study's peft=)."""
    peft = cfg.peft.name if cfg.get("peft") else "none"
    return [f"peft={peft}"] if peft != "none" else []


# Beyond the paper: an SFT model tuned further, each when its preset entry (preset.dpo, preset.grpo) is enabled;
# generated, scored and judged like the paper's models, and marked in the report with what was done
BEYOND = {"dpo": "DPO on the comparisons", "grpo": "GRPO with the paper's reward model"}


def tuned_models(p: DictConfig) -> list[str]:
    """The names of the enabled beyond-the-paper models, in BEYOND's order."""
    return [p[key].name for key in BEYOND if (p.get(key) or {}).get("enabled")]


def beyond_method(p: DictConfig, name: str) -> str | None:
    """What made the beyond-the-paper model `name` ("DPO on the comparisons"), None for the paper's own models."""
    return next((what for key, what in BEYOND.items() if (p.get(key) or {}).get("name") == name), None)


def training_stages(p: DictConfig, layout: Layout, adapters: list[str]) -> list[Stage]:
    """The SFT of each model, then the reward model (never with adapters: the paper trains every weight of it)."""
    stages = [
        Stage(
            f"train/{model}",
            "gpt4llm.train",
            merged(p.train_common, args, layout.paths, adapters),
            outputs=list(TRAINED),
            launcher=layout.launcher,
        )
        for model, args in p.sft.items()
    ]
    stages.append(
        Stage(
            "train/reward_model",
            "gpt4llm.train",
            merged(p.train_common, p.reward_model, layout.paths),
            outputs=list(TRAINED),
            launcher=layout.launcher,
        )
    )
    return stages


def beyond_stages(p: DictConfig, layout: Layout) -> list[Stage]:
    """Each enabled beyond-the-paper training from one SFT model's export: DPO on the comparisons, GRPO rewarded by
    the study's reward model (its export)."""
    stages = []
    for key in BEYOND:
        spec = p.get(key) or {}
        if not spec.get("enabled"):
            continue
        rewarded = key == "grpo"
        extra = [f"model.path={layout.export(spec.model)}"]
        extra += [f"reward.path={layout.export('reward_model')}"] if rewarded else []
        stages.append(
            Stage(
                f"train/{spec.name}",
                "gpt4llm.train",
                merged(spec.args, extra, layout.paths),
                needs=[f"train/{spec.model}", *(["train/reward_model"] if rewarded else [])],
                outputs=list(TRAINED),
                launcher=layout.launcher,
            )
        )
    return stages


def generation_stages(p: DictConfig, layout: Layout, models: list[str]) -> list[Stage]:
    """Every model's answers to every eval set."""
    return [
        Stage(
            f"generate/{model}/{eval_set}",
            "gpt4llm.generate",
            merged(
                args, p.generate_common, [f"model.path={layout.export(model)}", f"model.name={model}"], layout.paths
            ),
            needs=[f"train/{model}"],
            outputs=["responses.jsonl"],
        )
        for model in models
        for eval_set, args in p.eval_sets.items()
    ]


def rouge_stage(rouge: DictConfig, layout: Layout, tuned: list[str]) -> Stage:
    """ROUGE-L by reference length (Figure 6) of the chosen models' answers to one eval set."""
    models = [*rouge.models, *tuned]
    inputs = [layout.answers(m, rouge.eval_set) for m in models]
    return Stage(
        "evaluate/rouge",
        "gpt4llm.evaluate",
        ["metric=rouge", f"responses=[{','.join(map(str, inputs))}]", *layout.paths],
        needs=[f"generate/{m}/{rouge.eval_set}" for m in models],
        outputs=["rouge_lenALL.json"],
    )


def best_of_n_stages(b: DictConfig, layout: Layout, tuned: list[str] = ()) -> list[Stage]:
    """N samples of one model ranked by the reward model, then the ranking groups rank1..N and B it makes, and
    beside them the reward model's mean reward of each beyond-the-paper model's answers to the same prompts."""
    sample = Stage(
        "bestofn",
        "gpt4llm.bestofn",
        [
            f"sft_model={layout.export(b.model)}",
            f"reward_model={layout.export('reward_model')}",
            f"prompts={layout.answers(b.model, b.eval_set)}",
            *_strings(b.args),
            *layout.paths,
        ],
        needs=[f"train/{b.model}", "train/reward_model", f"generate/{b.model}/{b.eval_set}"],
        outputs=["bestofn.jsonl"],
    )
    responses = [layout.root / "bestofn" / "bestofn.jsonl", *(layout.answers(m, b.eval_set) for m in tuned)]
    scored = [f"metric.model={layout.export('reward_model')}"] if tuned else []
    rank = Stage(
        "evaluate/reward",
        "gpt4llm.evaluate",
        ["metric=reward", f"responses=[{','.join(map(str, responses))}]", *scored, *layout.paths],
        needs=["bestofn", *(["train/reward_model"] if tuned else []), *(f"generate/{m}/{b.eval_set}" for m in tuned)],
        outputs=["reward_summary.json"],
    )
    return [sample, rank]


def judge_stages(
    j: DictConfig, layout: Layout, tuned: list[str], groups: list[str], judge_server: JudgeServer | None
) -> list[Stage]:
    """The review of the judged answers (the study's models and the ranking groups) against each opponent."""
    judged_models = [*j.models, *tuned]
    judged = [layout.answers(m, j.eval_set) for m in judged_models]
    judged += [layout.root / "evaluate" / "reward" / "ranking_groups" / g / "responses.jsonl" for g in groups]
    skip = judge_skip_reason(j)  # the same for every opponent (no judge key)
    served = [f"train/{j.serve}"] if j.serve else []
    runtime = judge_server.arguments if j.serve and judge_server else None
    stages = []
    for opponent, spec in j.opponents.items():
        opponent_file, opponent_needs, downloads = opponent_answers(spec, j.eval_set, layout)
        needs = [f"generate/{m}/{j.eval_set}" for m in judged_models] + ["evaluate/reward"]
        stage = Stage(
            f"judge/{opponent}",
            "gpt4llm.evaluate",
            judge_arguments(j, layout, opponent, judged, opponent_file),
            needs=list(dict.fromkeys(needs + opponent_needs + served)),
            inputs=list(downloads),
            downloads=downloads,
            outputs=[f"judge_summary_{j.models[0]}.json"],
            skip=skip,
            runtime_args=runtime,
        )
        stages.append(stage)
    return stages


BENCHMARKS = ("mt_bench", "alpaca_eval", "arena_hard")


def benchmark_stages(p: DictConfig, layout: Layout, tuned: list[str], judge_server: JudgeServer | None) -> list[Stage]:
    """Beyond the paper: today's judge benchmarks (preset.benchmarks) of the judged models and the tuned ones, each
    model answering through `evaluate model.path=` into its stage and judged by the study's judge (served, or by key:
    skipped without one, as the review is). `demo_files`: the benchmarks' files are the demo stand-ins, written under
    the study (the tiny preset: the real ones are downloads)."""
    b = p.get("benchmarks") or {}
    if not b.get("enabled"):
        return []
    j = p.judge
    stand_ins: dict[str, list[str]] = {}
    if b.get("demo_files"):
        from gpt4llm.evaluation.demo_benchmarks import write_demo_benchmark_files

        stand_ins = write_demo_benchmark_files(layout.root / "benchmark" / "demo_files")
    runtime = judge_server.arguments if j.serve and judge_server else None
    stages = []
    for metric in b.metrics:
        if metric not in BENCHMARKS:
            raise ConfigError(f"preset.benchmarks.metrics.{metric}: expected one of {', '.join(BENCHMARKS)}")
        for model in [*b.models, *tuned]:
            directory = layout.root / "benchmark" / metric / model
            args = [
                f"metric={metric}",
                f"model.path={layout.export(model)}",
                f"model.name={model}",
                f"answers_dir={directory / 'answers'}",
                *stand_ins.get(metric, []),
                *_strings(b.get("args")),
                *_strings(b.metrics[metric]),
                *layout.paths,
            ]
            if j.serve:  # the study's own model on 127.0.0.1: its replies cached in the stage, nothing to pay
                args += [f"metric.cache={directory / 'replies.jsonl'}", "metric.prices=null"]
            stages.append(
                Stage(
                    f"benchmark/{metric}/{model}",
                    "gpt4llm.evaluate",
                    args,
                    needs=[f"train/{model}", *([f"train/{j.serve}"] if j.serve else [])],
                    outputs=[f"{metric}_summary_{model}.json"],
                    skip=judge_skip_reason(j),
                    runtime_args=runtime,
                )
            )
    return stages


def opponent_answers(spec: DictConfig, eval_set: str, layout: Layout) -> tuple[Path, list[str], dict[str, dict]]:
    """An opponent's answers, the stages that make them and the files to download for them: a model of the study's
    (generated by its stage) or a published answer file (downloaded when the stage runs, not while the study is
    planned)."""
    if spec.get("model"):
        return layout.answers(spec.model, eval_set), [f"generate/{spec.model}/{eval_set}"], {}
    path = Path(str(spec.path))
    return path, [], {str(path): {"url": spec.get("url"), "checksum": spec.get("checksum")}}


def judge_arguments(j: DictConfig, layout: Layout, opponent: str, judged: list[Path], opponent_file: Path) -> list[str]:
    """The review's settings; a served judge's replies are cached in the stage (the served model's own)."""
    args = [
        "metric=judge",
        f"responses=[{','.join(map(str, judged))}]",
        f"metric.opponent={opponent_file}",
        *_strings(j.eval),
        *_strings(j.args),
        *layout.paths,
    ]
    if j.serve:
        args.append(f"metric.cache={layout.root / 'judge' / opponent / 'replies.jsonl'}")
    return args


def plots_stage(layout: Layout, judge_stage_names: list[str]) -> Stage:
    """Every figure, drawn from the result files once ROUGE has run (and the reviews and rewards, when they ran)."""
    return Stage(
        "plots",
        "gpt4llm.plots",
        [f"results={layout.root}", "paper=true", *layout.paths],
        needs=["evaluate/rouge"],
        after=judge_stage_names + ["evaluate/reward"],
    )


def judge_skip_reason(judge: DictConfig) -> str | None:
    if judge.serve or not judge.key_env:
        return None
    if not os.environ.get(str(judge.key_env)):
        return (
            f"no judge key: ${judge.key_env} is not set (set it, and preset.judge.args=[metric.base_url=...,"
            f"metric.model=...] for an endpoint other than OpenAI's GPT-4)"
        )
    return None


def judge_server_for(judge: DictConfig, root: Path) -> JudgeServer | None:
    """The server of the study's model that judges (preset.judge.serve), or None where an endpoint judges."""
    if not judge.serve:
        return None
    return JudgeServer(root / "train" / str(judge.serve) / "export", str(judge.serve), root / "judge" / "server")


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
