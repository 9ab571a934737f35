"""`python -m gpt4llm.reproduce`: the stage runner's cache on toy stages, the paper preset's plumbing, and the tiny
preset end to end (killed mid-stage, completed, then reused whole)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpt4llm.errors import StageFailed
from gpt4llm.reproduction.runner import Pipeline, Stage
from helpers.configs import CONF


# --- the runner, on toy stages (gpt4llm.plots on a results directory it writes nothing for) -------------------------
def toy(name: str, *args: str, **kw) -> Stage:
    return Stage(name, "gpt4llm.plots", [f"results={kw.pop('results')}", "formats=[png]", *args], **kw)


@pytest.mark.slow  # a command run as a subprocess (README, the test tiers)
def test_runner_reuses_unchanged_stages_and_redoes_changed_ones_and_their_dependents(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": "a", "output": "b c"}]))
    lines: list[str] = []

    def stages(extra: str = "paper=false") -> list[Stage]:
        return [
            toy("first", extra, f"data_files=[{data}]", results=results, inputs=[str(data)]),
            toy("second", f"data_files=[{data}]", results=results, needs=["first"], outputs=["cmp_seq_len_freq.png"]),
            toy("third", results=results, skip="no key for it"),
            toy("fourth", results=results, needs=["third"]),
        ]

    def run(s, **kw):
        return {o.stage.name: o.status for o in Pipeline(tmp_path / "root", s, echo=lines.append, **kw).run()}

    first_time = {"first": "ran", "second": "ran", "third": "skipped", "fourth": "skipped"}
    assert run(stages()) == first_time
    assert run(stages()) == {**first_time, "first": "reused", "second": "reused"}
    assert any("fourth: skipped: it needs third" in line for line in lines)
    data.write_text(json.dumps([{"instruction": "a", "output": "b c d"}]))  # an input changed: it and its dependents
    assert run(stages()) == first_time
    assert run(stages("paper=true")) == first_time  # a setting changed
    assert run(stages("paper=true"), force=["second"]) == {**first_time, "first": "reused"}
    assert run(stages("paper=true"), only=["second"]) == {
        "first": "not selected",
        "second": "reused",
        "third": "skipped",
        "fourth": "skipped",
    }
    record = json.loads((tmp_path / "root" / "second" / "stage.json").read_text())
    assert record["command"].startswith("-m gpt4llm.plots") and record["seconds"] > 0


def test_a_failed_or_half_made_stage_is_never_reused(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    bad = [
        toy("a", results=results),
        toy("b", "no_such_key=1", results=results, needs=["a"]),
        toy("c", results=results, needs=["b"]),
    ]
    with pytest.raises(StageFailed, match=r"stage b exited with status 1; its log: .*b/stage.log\n(.|\n)*no_such_key"):
        Pipeline(tmp_path / "root", bad, echo=lambda line: None).run()
    assert (tmp_path / "root" / "a" / "stage.json").exists() and not (tmp_path / "root" / "b" / "stage.json").exists()
    missing = [toy("a", results=results, outputs=["never_written.png"])]
    with pytest.raises(StageFailed, match="did not write never_written.png"):
        Pipeline(tmp_path / "root2", missing, echo=lambda line: None).run()
    with pytest.raises(StageFailed, match="needs a, which has not run"):
        Pipeline(tmp_path / "root3", bad[:2], only=["b"], echo=lambda line: None).run()


# --- the paper's preset: every stage's settings compose under its command's config ------------------------------
@pytest.mark.parametrize("beyond", [[], ["preset.dpo.enabled=true", "preset.grpo.enabled=true"]])
def test_every_stage_of_the_paper_preset_composes(beyond, tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir

    from gpt4llm.reproduction.study import build_stages

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    deepspeed = compose_strategy_target("deepspeed_zero3")
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("reproduce", overrides=[f"out={tmp_path}", "launcher=[srun,python]", *beyond])
        stages = build_stages(cfg, tmp_path)
        for stage in stages:
            command = stage.module.split(".")[1]
            args = [a for a in stage.args if not a.startswith(("responses=", "results="))]
            composed = compose(command, overrides=args)  # a wrong key or group fails here, as it would at start
            if stage.name == "train/reward_model":  # its own hardware replaces the common one (Hydra takes each once)
                assert composed.model.path == "facebook/opt-1.3b" and composed.trainer.accelerator == "gpu"
                assert composed.trainer.get("num_nodes", 1) == 1 and composed.strategy._target_ != deepspeed
            elif stage.name == "train/LLaMA-GPT4-GRPO":  # from the SFT export, rewarded by the study's RM
                assert composed.model.path == str(tmp_path / "train" / "LLaMA-GPT4" / "export")
                assert composed.reward.path == str(tmp_path / "train" / "reward_model" / "export")
                assert stage.needs == ["train/LLaMA-GPT4", "train/reward_model"] and composed.task.num_generations == 8
            elif command == "train":
                assert stage.launcher == ["srun", "python"] and composed.trainer.num_nodes == 2
                assert composed.strategy.offload_parameters and composed.model.max_length == 512
    names = [s.name for s in stages]
    # the paper's 4 trainings, 9 generations, ROUGE, best-of-N and its ranking, the review and the plots; beyond
    # the paper, each tuned model's training and its 3 generations, and 3 judge benchmarks of the 2 judged models
    # and each tuned one
    assert len(names) == 4 + 9 + 5 + 4 * len(beyond) + 3 * (2 + len(beyond)) and names[-1] == "plots"
    judge = next(s for s in stages if s.name == "judge/ChatGPT")
    assert judge.skip.startswith("no judge key: $OPENAI_API_KEY is not set")
    arena = next(s for s in stages if s.name == "benchmark/arena_hard/LLaMA-GPT4")
    assert arena.skip == judge.skip and arena.needs == ["train/LLaMA-GPT4"]
    assert f"model.path={tmp_path / 'train' / 'LLaMA-GPT4' / 'export'}" in arena.args
    assert f"answers_dir={tmp_path / 'benchmark' / 'arena_hard' / 'LLaMA-GPT4' / 'answers'}" in arena.args
    assert {s.name for s in stages if s.name.startswith("benchmark/")} <= set(next(
        s for s in stages if s.name == "plots").after)  # fmt: skip


def test_peft_lora_is_one_override_and_the_report_says_so(tmp_path):
    from hydra import compose, initialize_config_dir

    from gpt4llm.reproduction.study import build_stages
    from gpt4llm.reproduction.study_report import training_section

    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("reproduce", overrides=[f"out={tmp_path}", "peft=lora"])
        stages = build_stages(cfg, tmp_path)
        sft = [s for s in stages if s.name.startswith("train/") and s.name != "train/reward_model"]
        assert len(sft) == 3 and all("peft=lora" in s.args for s in sft)
        assert compose("train", overrides=sft[0].args).peft.method == "lora"  # it composes as train sees it
    assert "peft=lora" in training_section(tmp_path, cfg.preset, "lora").note


def compose_strategy_target(name: str) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.load(CONF / "strategy" / f"{name}.yaml").get("_target_", "")


# --- the tiny preset, end to end ---------------------------------------------------------------------------------
def reproduce_command(tmp_path: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "gpt4llm.reproduce",
        "preset=tiny",
        f"paths.data_dir={tmp_path / 'data'}",
        f"paths.log_dir={tmp_path / 'logs'}",
        *extra,
    ]


@pytest.mark.slow
def test_tiny_study_killed_mid_stage_then_completed_then_reused_whole(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    root = tmp_path / "logs" / "reproduce" / "tiny"
    proc = subprocess.Popen(
        reproduce_command(tmp_path),
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    seen = []
    deadline = time.time() + 1500  # the four training stages first: minutes on a loaded machine
    while time.time() < deadline:
        line = proc.stdout.readline()
        seen.append(line)
        if "generate/LLaMA-GPT4/vicuna80: running" in line or not line:
            break
    time.sleep(1)  # inside the stage (a generate stage takes several seconds: torch alone takes more to import)
    os.killpg(proc.pid, signal.SIGKILL)  # the runner and the stage's process, as a lost node or kill -9 would
    proc.wait(timeout=60)
    assert "generate/LLaMA-GPT4/vicuna80: running" in "".join(seen), "".join(seen)
    assert (root / "train" / "reward_model" / "stage.json").exists()
    killed = root / "generate" / "LLaMA-GPT4" / "vicuna80"
    assert (killed / "stage.log").exists() and not (killed / "stage.json").exists()  # half-made: never to be used

    started = time.monotonic()
    second = subprocess.run(
        reproduce_command(tmp_path), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500
    )
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    print(f"the rest of the tiny study: {time.monotonic() - started:.0f} s")
    for name in ("train/LLaMA-GPT4", "train/LLaMA-GPT4-CN", "train/Alpaca", "train/reward_model"):
        assert f"{name}: reused" in second.stdout
    assert re.search(r"generate/LLaMA-GPT4/vicuna80: done in .* \(not done before\)", second.stdout)
    answers = [json.loads(line) for line in (killed / "responses.jsonl").read_text().splitlines()]
    assert len(answers) == len({a["id"] for a in answers}) == 6  # redone whole, nothing kept from the killed try
    report = (root / "report.md").read_text()
    page = (root / "report.html").read_text()

    # Every number of ours in the report is read from an artefact of the run.
    tables = {
        json.loads(p.read_text())[0]["Length"]: json.loads(p.read_text())
        for p in (root / "evaluate" / "rouge").glob("rouge_len*.json")
    }
    for row in tables["ALL"]:
        assert f"| ALL | {row['Model']} | " in report and f"{row['rougeL']:.4f} (n={row['NumInstance']})" in report
    assert "| ALL | LLaMA-GPT4 | 0.3447 (n=9000) |" in report  # the paper's value beside ours
    summary = json.loads((root / "judge" / "ChatGPT" / "judge_summary_LLaMA-GPT4.json").read_text())
    assert summary["questions"] == 6 and summary["judge"]["base_url"].startswith("http://127.0.0.1:")
    if summary["scored"]:
        assert f"{summary['totals'][0]:g} : {summary['totals'][1]:g}" in report
    else:  # the tiny judge's replies hold no scores: the table says so, not "0 : 0"
        assert "the judge model produced no parsable scores (0 of 6 questions scored)" in report
    assert "| rank1 (best-of-N group) | 624 : 667 = 94% |" in report and "| B (best-of-N group) |" in report
    # beyond the paper: LLaMA-GPT4 after DPO, generated, scored and judged like the others, marked as not the paper's
    assert "| ALL | LLaMA-GPT4-DPO | not in the paper (+ DPO) |" in report
    assert "| LLaMA-GPT4-DPO (not in the paper: + DPO on the comparisons) |" in report
    dpo = json.loads((root / "train" / "LLaMA-GPT4-DPO" / "metrics.json").read_text())
    assert dpo["global_step"] == 30 and "val/rewards/accuracies" in dpo
    # and after GRPO rewarded by the study's own reward model
    assert "| ALL | LLaMA-GPT4-GRPO | not in the paper (+ GRPO) |" in report
    assert "| LLaMA-GPT4-GRPO (not in the paper: + GRPO with the paper's reward model) |" in report
    grpo = json.loads((root / "train" / "LLaMA-GPT4-GRPO" / "metrics.json").read_text())
    assert grpo["global_step"] == 20 and "val/rewards/model/mean" in grpo
    scored = json.loads((root / "evaluate" / "reward" / "reward_summary.json").read_text())
    for model, method in (("DPO", "DPO on the comparisons"), ("GRPO", "GRPO with the paper's reward model")):
        mean = scored[f"LLaMA-GPT4-{model}"]["mean_reward"]  # the same reward model's score of its answers
        label = f"mean reward of LLaMA-GPT4-{model}'s answers (not in the paper: + {method})"
        assert f"| {label} | not reported | {mean:.4f} |" in report
    # beyond the paper: the judge benchmarks on their demo stand-ins, judged by the served tiny model, each result in
    # the report with its file (its verdicts are noise: mostly unparsable, and the report says how many were read)
    assert "## Beyond the paper: MT-Bench, AlpacaEval 2, Arena-Hard" in report
    for metric in ("mt_bench", "alpaca_eval", "arena_hard"):
        for model in ("LLaMA-GPT4", "LLaMA-GPT4-DPO", "LLaMA-GPT4-GRPO"):
            summary_file = root / "benchmark" / metric / model / f"{metric}_summary_{model}.json"
            assert json.loads(summary_file.read_text())["model"] == model
            assert f"| benchmark/{metric}/{model}/{metric}_summary_{model}.json |" in report
    mt = json.loads((root / "benchmark/mt_bench/LLaMA-GPT4/mt_bench_summary_LLaMA-GPT4.json").read_text())
    assert mt["judgments"] == 16 and mt["judge"]["base_url"].startswith("http://127.0.0.1:")
    answers = (root / "benchmark/mt_bench/LLaMA-GPT4/answers/answers.jsonl").read_text().splitlines()
    assert len(answers) == 8 and all(len(json.loads(a)["turns"]) == 2 for a in answers)
    rm = json.loads((root / "train" / "reward_model" / "metrics.json").read_text())
    assert f"| reward model val/rm_acc | not reported | {rm['val/rm_acc']:.4f} |" in report
    for section in ("## Stages", "## Provenance", "## Figures", "## Human evaluation", "## Training runs"):
        assert section in report
    assert "package torch" in report and "sha256:" in report and "python -m gpt4llm.reproduce preset=tiny" in report
    figures = sorted(p.name for p in (root / "plots").glob("*.png"))
    assert "bar_unnatural.png" in figures and "cmp_seq_len_freq.png" in figures
    if not summary["scored"]:  # the tiny judge's replies hold no scores: no Figure 4, and the plots log says why
        assert "no question got scores" in (root / "plots" / "stage.log").read_text()
    assert any(f.startswith("pie_LLaMA-GPT4_vs_GPT-4") for f in figures)
    assert page.count("data:image/png;base64,") == len(figures) and 'src="http' not in page

    third = subprocess.run(
        reproduce_command(tmp_path), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert third.returncode == 0, third.stderr[-3000:]
    stages = re.findall(r"^\[\d+/(\d+)\] (\S+): (\w+)", third.stdout, re.MULTILINE)
    assert stages and all(status == "reused" for _, _, status in stages) and len(stages) == int(stages[0][0])
    assert "running" not in third.stdout
    assert "| 1 | train/LLaMA-GPT4 | reused |" in (root / "report.md").read_text()
