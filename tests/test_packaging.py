"""A regular (non-editable) install works from any directory: the wheel ships the configs, every subpackage, and the
console scripts; the top level of the package holds the commands and nothing else."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

from helpers.configs import ROOT, TINY_OVERRIDES

pytestmark = pytest.mark.slow
COMMANDS = {
    "train",
    "prepare",
    "plan",
    "generate",
    "evaluate",
    "plots",
    "score",
    "bestofn",
    "synthesize",
    "serve",
    "reproduce",
    "humaneval",
    "analyze",
}
SRC = ROOT / "src" / "gpt4llm"


def test_top_level_holds_the_commands_and_no_library_module_imports_one():
    # beside the commands, only errors.py: the bottom layer every other module raises from (README, Layout)
    assert {p.stem for p in SRC.glob("*.py")} - {"__init__", "errors"} == COMMANDS
    for path in SRC.rglob("*.py"):
        if path.parent == SRC:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            commands = [
                n for n in names if n.removeprefix("gpt4llm.").split(".")[0] in COMMANDS and n.startswith("gpt4llm.")
            ]
            assert not commands, f"{path.relative_to(ROOT)} imports the command {commands[0]}"


def test_the_package_list_is_every_package():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(SRC.parent).parts) for p in SRC.rglob("__init__.py")} | {"gpt4llm.conf"}
    assert listed == found


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel, built from this checkout and installed into a directory of its own."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
    )
    [wheel] = out.glob("gpt4llm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "gpt4llm/conf/train.yaml" in names and "gpt4llm/conf/strategy/deepspeed_zero3_offload.yaml" in names
    assert (
        "gpt4llm/rating/static/rate.html" in names and "gpt4llm/rating/static/start.html" in names
    )  # the rating pages
    target = out / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    return target


def run_installed(target: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_a_wheel_install_runs_from_any_directory(installed, tmp_path):
    where = run_installed(installed, tmp_path, "-c", "import gpt4llm; print(gpt4llm.__file__)")
    assert where.stdout.startswith(str(installed)), where.stdout + where.stderr  # not this checkout's code
    helped = run_installed(installed, tmp_path, "-m", "gpt4llm.synthesize", "--help")
    assert helped.returncode == 0 and "job: answer, score, translate" in helped.stdout and "task:" not in helped.stdout
    run = tmp_path / "run"
    trained = run_installed(
        installed,
        tmp_path,
        "-m",
        "gpt4llm.train",
        *TINY_OVERRIDES,
        "data.demo.num_records=300",
        "data.val_size=20",
        "trainer.max_steps=2",
        "validate_first=false",
        "callbacks.exact_match=null",
        f"hydra.run.dir={run}",
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert (run / "export" / "config.json").exists() and (tmp_path / "data" / "models").is_dir()  # data/ under the cwd
    script = installed / "bin" / "gpt4llm-plan"
    assert script.exists()
    planned = run_installed(
        installed,
        tmp_path,
        str(script),
        "trainer=v100x16",
        "model=llama7b",
        "strategy=deepspeed_zero3_offload",
        f"hydra.run.dir={tmp_path / 'plan'}",
    )
    assert planned.returncode == 0 and "DeepSpeed's CPU Adam" in planned.stdout, planned.stderr[-2000:]


def test_plain_pytest_collects_every_test_file():
    # `pytest` as well as `python -m pytest` (which also puts the current directory on sys.path): the console
    # script's entry point with nothing prepended to sys.path (-P), wherever the script itself was installed
    entry = "import sys, pytest; sys.exit(pytest.console_main())"
    proc = subprocess.run(
        [sys.executable, "-P", "-c", entry, "--collect-only", "-q"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0 and " error" not in proc.stdout.lower(), proc.stdout[-3000:]
    collected = {line.split("::")[0] for line in proc.stdout.splitlines() if "::" in line}
    assert collected == {f"tests/{p.name}" for p in (ROOT / "tests").glob("test_*.py")}
