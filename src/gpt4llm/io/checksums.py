"""A checksum manifest for a directory we write whole (an export): `checksums.sha256`, one `<sha256>  <path>` line per
file in the format `sha256sum -c` reads, written last, and verified where we load the directory again, so a weight file
damaged in a copy (a truncated transfer, a full disk on the other side) is said as such, not met as garbage logits."""

from __future__ import annotations

import hashlib
from pathlib import Path

from gpt4llm.errors import CheckpointError

MANIFEST = "checksums.sha256"
_verified: dict[Path, float] = {}  # directory -> the manifest's mtime when it was verified in this process


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: str | Path) -> Path:
    """The manifest of every file under `directory` (the manifest itself left out)."""
    directory = Path(directory)
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    lines = [f"{file_sha256(p)}  {p.relative_to(directory).as_posix()}\n" for p in files]
    out = directory / MANIFEST
    out.write_text("".join(lines), encoding="utf-8")
    return out


def verify_manifest(directory: str | Path) -> None:
    """Checks every file the manifest lists (a directory without one, written before manifests or by another tool, is
    taken as it is); once per process and manifest. A CheckpointError names the first file that is missing or
    differs."""
    directory = Path(directory).expanduser().resolve()
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return
    stamp = manifest.stat().st_mtime
    if _verified.get(directory) == stamp:
        return
    for number, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        expected, _, name = line.partition("  ")
        path = directory / name
        if not path.is_file():
            raise CheckpointError(
                f"{directory}: {name} is listed in {MANIFEST} (line {number}) but missing: copy the whole export again"
            )
        if file_sha256(path) != expected:
            raise CheckpointError(
                f"{directory}: {name} differs from its checksum in {MANIFEST} (damaged or changed after the export): "
                f"copy the export again, or export it anew (delete {MANIFEST} to load it as it is)"
            )
    _verified[directory] = stamp
