"""An export as it lies on a shared disk: its files readable by the group and others as the umask says (safetensors
writes weights 0600), and a checksum manifest that `sha256sum -c` accepts and that our loaders verify, so a damaged
copy is said as such."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from helpers.configs import compose_train, demo_overrides


@pytest.fixture(scope="module")
def lora_export(tmp_path_factory):
    """A LoRA run's export (the merged model and adapter/), trained a few steps under umask 027."""
    from gpt4llm.train import train

    tmp = tmp_path_factory.mktemp("export")
    cfg = compose_train(demo_overrides(tmp, "peft=lora", "trainer.max_steps=2", "data.exact_match_examples=0"))
    cfg.paths.output_dir = str(tmp / "run")
    old = os.umask(0o027)
    try:
        train(cfg)
    finally:
        os.umask(old)
    return tmp / "run" / "export"


def test_every_exported_file_has_the_mode_the_umask_gives(lora_export):
    files = [p for p in lora_export.rglob("*") if p.is_file()]
    assert {"model.safetensors", "adapter_model.safetensors", "tokenizer_config.json"} <= {p.name for p in files}
    modes = {str(p.relative_to(lora_export)): oct(p.stat().st_mode & 0o777) for p in files}
    assert set(modes.values()) == {oct(0o640)}, modes  # umask 027: group-readable, not 0600
    assert oct(lora_export.stat().st_mode & 0o777) == oct(0o750)


@pytest.mark.skipif(shutil.which("sha256sum") is None, reason="coreutils' sha256sum is the manifest's oracle")
def test_the_manifest_lists_every_file_and_sha256sum_accepts_it(lora_export):
    manifest = lora_export / "checksums.sha256"
    listed = {line.split("  ", 1)[1] for line in manifest.read_text().splitlines()}
    on_disk = {str(p.relative_to(lora_export)) for p in lora_export.rglob("*") if p.is_file()} - {manifest.name}
    assert listed == on_disk and "adapter/adapter_model.safetensors" in listed
    checked = subprocess.run(["sha256sum", "-c", "--strict", manifest.name], cwd=lora_export, capture_output=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_a_damaged_copy_is_refused_where_it_is_loaded(lora_export, tmp_path):
    from gpt4llm.data.tokenizer import load_tokenizer
    from gpt4llm.errors import CheckpointError
    from gpt4llm.models.hf import load_causal_lm

    copy = shutil.copytree(lora_export, tmp_path / "copy")
    load_causal_lm(str(copy), load_tokenizer(str(copy)))  # a whole copy loads
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped byte at the end, where a cut transfer leaves its mark
    weights.write_bytes(bytes(data))
    os.utime(copy / "checksums.sha256")  # a new mtime: verified again, not taken from this process's memory
    with pytest.raises(CheckpointError, match=r"model.safetensors differs from its checksum"):
        load_tokenizer(str(copy))
    shutil.copy(lora_export / "model.safetensors", weights)
    (copy / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json is listed in checksums.sha256"):
        load_tokenizer(str(copy))
