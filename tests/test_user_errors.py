"""Bad invocations of every command end the same way: exit status 1, a last stderr line `Error: ...` that names the
setting or the path at fault, no traceback, and no run directory left behind (gpt4llm.app.cli.reports_user_errors).

The commands run in this process, through their real `main` (Hydra's composition included), so the table stays fast
enough for the quick tier; the CLI tests elsewhere run the same entry points as subprocesses."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

from helpers.configs import TINY_OVERRIDES

GOOD = [{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(12)]


def files(tmp: Path) -> dict[str, Path]:
    """The inputs the table's cases point at: good ones, and bad ones of several kinds."""
    made = {
        "good.json": json.dumps(GOOD),
        "three.json": json.dumps(GOOD[:3]),
        "malformed.json": '[{"instruction": "a", "output": "b"},',
        "no_output.json": json.dumps([{"instruction": "a"}]),
        "not_pairs.json": json.dumps([{"instruction": "a", "output": "b"}]),
        "answers.jsonl": "".join(json.dumps({"id": i, "model": "m", "response": str(i)}) + "\n" for i in range(3)),
        "prompts.jsonl": "".join(json.dumps({"instruction": f"q{i}"}) + "\n" for i in range(2)),
        "scored.jsonl": "".join(
            json.dumps({"id": i, "model": "m", "instruction": f"q{i}", "response": str(i)}) + "\n" for i in range(3)
        ),
        "header_only.csv": "instruction,input,output\n",
    }
    for name, text in made.items():
        (tmp / name).write_text(text)
    (tmp / "plain_dir").mkdir()
    (tmp / "other_program").mkdir()  # a folder that holds something, but no model
    (tmp / "other_program" / "notes.txt").write_text("not a model")
    (tmp / "zero.parquet").write_bytes(b"")
    (tmp / "latin1.csv").write_bytes("instruction,input,output\nCafé?,,Sí.\n".encode("latin-1"))
    import datasets

    datasets.DatasetDict(test=datasets.Dataset.from_list(GOOD)).save_to_disk(str(tmp / "saved_test_only"))
    return {name: tmp / name for name in [*made, "plain_dir", "other_program"]}


# (command, arguments with {tmp} for the test's directory, what the error line must name)
CASES = [
    ("train", ["data.val_size=-5"], "data.val_size=-5"),
    ("train", ["data.batch_size=0"], "data.batch_size=0"),
    ("train", ["task.optimizer.lr=-1"], "task.optimizer.lr=-1"),
    ("train", ["+data.batch_sise=4"], "batch_sise"),
    ("train", ["trainer.max_steps=0"], "trainer.max_steps=0"),
    ("train", ["data=local", "data.path={tmp}/missing.json"], "missing.json"),
    ("train", ["data=local", "data.path={tmp}/malformed.json"], "malformed.json: not valid JSON"),
    ("train", ["data=local", "data.path={tmp}/no_output.json"], "record 0: field 'output' is missing"),
    ("train", ["data=local", "data.path={tmp}/three.json", "data.val_size=5"], "data.val_size=5"),
    ("train", ["data=local", "data.path={tmp}/plain_dir"], "plain_dir"),
    ("train", ["data.batching=zigzag"], "data.batching='zigzag'"),
    ("train", ["global_batch_size=7"], "global_batch_size=7"),
    ("train", ["ckpt_path={tmp}/nothing.ckpt"], "ckpt_path="),
    ("train", ["model.tokenizer=magic"], "model.tokenizer='magic'"),
    ("train", ["task=rm", "data=local_pairs", "data.path={tmp}/not_pairs.json"], "not_pairs.json: record 0"),
    ("train", ["data=local", "data.path={tmp}/header_only.csv"], "header_only.csv: holds no records"),
    ("train", ["data=local", "data.path={tmp}/zero.parquet"], "zero.parquet: not a readable Parquet file"),
    ("train", ["data=local", "data.path={tmp}/latin1.csv"], "latin1.csv: not UTF-8 text"),
    ("train", ["data=local", "data.path={tmp}/saved_test_only"], "has no split 'train': its splits are test"),
    ("train", ["model=hf", "model.path={tmp}/no_model"], "no_model: no such model directory"),
    ("train", ["model=hf", "model.path={tmp}/plain_dir"], "plain_dir: holds no model (no config.json"),
    ("train", ["model=hf", "model.path={tmp}/other_program"], "it holds notes.txt"),
    ("score", ["reward_model={tmp}/other_program", "input={tmp}/scored.jsonl"], "other_program: holds no model"),
    (
        "bestofn",
        ["sft_model={tmp}/plain_dir", "reward_model={tmp}/plain_dir", "prompts={tmp}/prompts.jsonl"],
        "plain_dir: holds no model",
    ),
    ("train", ["peft=lora", "peft.lora_alpha=0"], "peft.lora_alpha=0: the adapters' output is scaled"),
    ("train", ["peft=lora", "peft.lora_dropout=1.0"], "peft.lora_dropout=1.0"),
    ("train", ["peft=lora", "peft.lora_dropout=1.5"], "peft.lora_dropout=1.5"),
    ("train", ["peft=lora", "peft.r=0"], "peft.r=0: LoRA's rank"),
    ("train", ["peft=lora", "peft.r=-1"], "peft.r=-1"),
    ("train", ["peft=lora", "peft.r=1.5"], "peft.r=1.5"),
    ("train", ["peft=lora", "peft.r=abc"], "peft.r='abc'"),
    ("train", ["peft=lora", "peft.bias=sometimes"], "peft.bias='sometimes': choose one of none, all, lora_only"),
    ("train", ["peft=lora", "peft.target_modules=[]"], "peft.target_modules=[]"),
    ("train", ["peft=lora", "peft.target_modules=[q_proj,qq_proj]"], "qq_proj matches no layer of LlamaForCausalLM"),
    ("prepare", ["data=local", "data.path={tmp}/missing.json"], "missing.json"),
    ("prepare", ["data.val_size=2.5"], "data.val_size=2.5"),
    ("plan", ["plan.device=TPU"], "plan.device=TPU"),
    ("plan", ["peft=lora", "peft.r=-8"], "peft.r=-8"),
    ("plan", ["peft=lora", "peft.lora_dropout=1.0"], "peft.lora_dropout=1.0"),
    ("plan", ["model=hf", "model.path={tmp}/no_model"], "model.path="),
    ("generate", [], "model.path is required"),
    ("generate", ["model.path={tmp}", "decoding.num_samples=3"], "decoding.num_samples"),
    ("generate", ["model.path={tmp}/no_model", "eval=demo"], "no_model: no such model directory"),
    ("generate", ["model.path={tmp}", "eval=vicuna80"], "HF_HUB_OFFLINE is set, so it is not downloaded"),
    ("score", ["reward_model={tmp}/no_model", "input={tmp}/scored.jsonl"], "no_model: no such model directory"),
    ("evaluate", ["metric=rouge", "responses={tmp}/missing.jsonl"], "missing.jsonl"),
    ("evaluate", ["metric=reward", "responses={tmp}/answers.jsonl"], "metric.model"),
    ("evaluate", ["metric=reward", "metric.model={tmp}", "responses={tmp}/answers.jsonl"], "no field 'instruction'"),
    ("evaluate", ["metric=reward", "metric.model={tmp}/no_model", "responses={tmp}/scored.jsonl"], "no_model: no such"),
    (
        "evaluate",
        ["metric=judge", "responses={tmp}/answers.jsonl", "metric.opponent={tmp}/answers.jsonl"],
        "HF_HUB_OFFLINE is set, so it is not downloaded",
    ),
    ("evaluate", ["metric=rouge", "responses=[{tmp}/answers.jsonl,{tmp}/answers.jsonl]"], "same model name"),
    ("bestofn", ["sft_model={tmp}", "reward_model={tmp}", "prompts={tmp}/missing.jsonl"], "missing.jsonl"),
    ("synthesize", ["job=answer"], "instructions=FILE"),
    ("synthesize", ["job=answer", "instructions={tmp}/missing.json"], "missing.json"),
    ("synthesize", ["job=score"], "job=score needs responses"),
    ("synthesize", ["job=translate", "instructions={tmp}/malformed.json"], "malformed.json"),
    ("serve", [], "model.path is required"),
    ("serve", ["model.path={tmp}/no_model"], "no_model"),
    ("humaneval", ["study={tmp}/no_study", "report=true"], "no_study"),
    ("humaneval", ["responses=[{tmp}/missing.jsonl,{tmp}/answers.jsonl]", "study={tmp}/study"], "missing.jsonl"),
    ("analyze", ["field=title"], "field=title"),
    ("plots", ["results={tmp}/nowhere"], "nowhere"),
    ("train", ["task=dpo", "data=demo_pairs", "data.demo.num_records=60", "task.beta=nan"], "task.beta=nan"),
    ("train", ["task=dpo", "data=demo_pairs", "data.demo.num_records=60", "task.beta=inf"], "task.beta=inf"),
    ("train", ["task=dpo", "data=demo_pairs", "data.demo.num_records=60", "task.beta=0"], "task.beta=0"),
    ("train", ["task=dpo", "data=demo_pairs", "data.demo.num_records=60", "task.beta=-0.1"], "task.beta=-0.1"),
    ("train", ["ckpt_path={tmp}/good.json"], "good.json: not a Lightning checkpoint"),
    ("train", ["ckpt_path={tmp}/plain_dir"], "plain_dir: a directory, but not a DeepSpeed checkpoint"),
]


@pytest.mark.parametrize("command, args, named", CASES, ids=[f"{c}:{' '.join(a)}" for c, a, _ in CASES])
def test_a_bad_invocation_ends_in_one_error_line(command, args, named, tmp_path, monkeypatch, capsys):
    files(tmp_path)
    run = tmp_path / "run"
    argv = [a.format(tmp=tmp_path) for a in args]
    if command in ("train", "prepare"):  # the tiny model and a small demo, unless the case says otherwise
        demo = [] if any(a.startswith("data=") for a in argv) else ["data.demo.num_records=60", "data.val_size=10"]
        tiny = [] if any(a.startswith("model=") for a in argv) else TINY_OVERRIDES
        argv = _last_wins([*tiny, *demo, *argv])
    argv += [f"hydra.run.dir={run}", f"paths.data_dir={tmp_path / 'data'}"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [f"gpt4llm-{command}", *argv])
    monkeypatch.delenv("GPT4LLM_TRACEBACK", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the offline cases; nothing else here downloads
    main = importlib.import_module(f"gpt4llm.{command}").main
    with pytest.raises(SystemExit) as exited:
        main()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exited.value.code == 1, err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    assert lines and lines[-1].startswith("Error: ") and named in lines[-1], err[-2000:]
    assert not run.exists(), f"the failed run left {sorted(p.name for p in run.iterdir())}"


def _last_wins(overrides: list[str]) -> list[str]:
    """Hydra refuses a key given twice: a case's own setting replaces the defaults added here."""
    out: dict[str, str] = {}
    for override in overrides:
        key = override.split("=", 1)[0]
        out.pop(key, None)
        out[key] = override
    return list(out.values())


def _digests(directory: Path) -> dict[str, str]:
    import hashlib

    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("command", ["train", "prepare", "plan"])
def test_a_forgotten_model_hf_never_overwrites_the_users_model(command, tiny_model_dir, tmp_path, monkeypatch, capsys):
    """`model.path=<a real model>` under the default `model=tiny` (model=hf forgotten) once replaced the user's model
    directory with a random tiny one and exited 0: it is refused, and every file in it keeps its bytes."""
    import shutil

    user_model = tmp_path / "my-model"
    shutil.copytree(tiny_model_dir, user_model)  # a real Hugging Face model directory: config, weights, tokenizer
    (user_model / "tiny_spec.json").unlink()  # ... that gpt4llm did not build
    (user_model / "README.md").write_text("my fine-tuned model, three weeks of GPU time\n")
    before = _digests(user_model)
    run = tmp_path / "run"
    argv = [*TINY_OVERRIDES, f"model.path={user_model}", f"hydra.run.dir={run}", f"paths.data_dir={tmp_path / 'data'}"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [f"gpt4llm-{command}", *argv])
    with pytest.raises(SystemExit) as exited:
        importlib.import_module(f"gpt4llm.{command}").main()
    err = capsys.readouterr().err
    assert exited.value.code == 1, err[-2000:]
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert last.startswith("Error: ") and f"model.path={user_model}" in last and "model=hf" in last, last
    assert _digests(user_model) == before
    beside = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("my-model"))
    assert beside == ["my-model"]  # no lock file, no temporary beside it


def test_the_tiny_model_is_built_only_where_it_was_built_before_or_nothing_is(tmp_path):
    from gpt4llm.errors import ConfigError
    from gpt4llm.models.tiny import build_tiny_model
    from helpers.configs import TINY_SPEC

    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    with pytest.raises(ConfigError, match="did not build"):
        build_tiny_model(other, **TINY_SPEC)
    assert (other / "todo.txt").read_text() == "mine" and len(list(other.iterdir())) == 1
    ours = build_tiny_model(tmp_path / "tiny", **TINY_SPEC)
    assert build_tiny_model(ours, **{**TINY_SPEC, "seed": 1}) == ours  # ours: rebuilt in place for another spec


@pytest.mark.parametrize(
    "command, typo, nearest",
    [
        ("train", "trainer.max_step=10", "did you mean trainer.max_steps=10?"),
        ("train", "data.batchsize=4", "did you mean data.batch_size=4?"),
        ("generate", "decoding.max_new_token=8", "did you mean decoding.max_new_tokens=8?"),
    ],
)
def test_a_mistyped_setting_is_answered_with_the_nearest_one(command, typo, nearest, tmp_path, monkeypatch, capsys):
    """Hydra answers `trainer.max_step=10` with "use +trainer.max_step=10", which adds a key nothing reads."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [f"gpt4llm-{command}", typo, f"hydra.run.dir={tmp_path / 'run'}"])
    with pytest.raises(SystemExit) as exited:
        importlib.import_module(f"gpt4llm.{command}").main()
    assert exited.value.code == 1
    last = [line for line in capsys.readouterr().err.splitlines() if line.strip()][-1]
    assert last.startswith(f"Error: {typo.split('=')[0]} is not a setting") and nearest in last, last
