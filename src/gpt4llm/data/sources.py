"""Dataset files on disk: downloaded once from their public URL, atomically, validated, then only read.

A download is written beside its target and renamed into place only after it is complete (its length matches the
server's Content-Length), parses as JSON records with the expected fields, and has the expected count and checksum.
Checksums are written `git-sha1:<hex>` (the file's git blob id, as GitHub lists it: sha1(b"blob <size>\0" + content),
checkable without git) or `sha256:<hex>`.
A cut connection or a bad file therefore never leaves anything at the target path, and a second run finds the file
and does not touch the network.

Offline (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE or GPT4LLM_OFFLINE set to 1), a missing file is an error before any
connection is tried, saying which file to put where. A loopback URL (a mirror on this machine) is still fetched.
"""

from __future__ import annotations

import hashlib
import http.client
import ipaddress
import os
import time
import urllib.parse
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

from gpt4llm.errors import ConfigError, DownloadError, MissingFileError, RecordError
from gpt4llm.io import atomic
from gpt4llm.io.json_files import read_json_records

CHUNK = 1 << 16
# Hugging Face's switches (users set them to keep a whole job off the network) and ours, for the files we download.
OFFLINE_SWITCHES = ("GPT4LLM_OFFLINE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def offline_switch() -> str | None:
    """The first offline switch that is on (as huggingface_hub reads them: 1, ON, YES or TRUE), or None."""
    return next(
        (n for n in OFFLINE_SWITCHES if os.environ.get(n, "").strip().upper() in ("1", "ON", "YES", "TRUE")), None
    )


def is_loopback(url: str) -> bool:
    """Whether `url` is on this machine (a local mirror, the tests' servers): offline does not forbid it."""
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class IncompleteDownload(OSError):
    """The connection closed before the server's Content-Length was received."""


def ensure_file(
    path: str | Path,
    url: str | None = None,
    checksum: str | None = None,
    num_records: int | None = None,
    required_fields: tuple[str, ...] = (),
    attempts: int = 3,
    timeout: float = 60.0,
    setting: str | None = None,
) -> Path:
    """`path`, downloading it from `url` first when it is not there yet. `setting`: the key that names the file
    (data.path, eval.path), for the error that says where else it may be."""
    path = Path(path)
    if path.exists():
        return path
    elsewhere = f"set {setting}=/path/to/{path.name}" if setting else "point the setting that names it at your copy"
    if not url:
        raise MissingFileError(f"{path}: no such file. Check the path, or {elsewhere}.")
    if (switch := offline_switch()) and not is_loopback(url):
        raise DownloadError(
            f"{path} is missing, and {switch} is set, so it is not downloaded from {url}. "
            f"Copy the file to {path}, or {elsewhere}."
        )
    last_error: Exception | None = None
    for attempt in range(1, attempts + 1):
        try:
            _download(url, path, timeout)
            break
        except (OSError, http.client.HTTPException) as err:  # URLError, timeouts, cuts, IncompleteDownload
            last_error = err
            if attempt < attempts:
                time.sleep(min(2 ** (attempt - 1), 10))
    else:
        raise DownloadError(
            f"{path} is missing and could not be downloaded from {url} ({last_error}). "
            f"On a machine without internet, copy the file to {path}, or {elsewhere}."
        ) from last_error
    try:
        validate_records_file(path, checksum=checksum, num_records=num_records, required_fields=required_fields)
    except RecordError:
        path.unlink()  # a file that fails validation must not be mistaken for the dataset next time
        raise
    return path


def _download(url: str, path: Path, timeout: float) -> None:
    with atomic.atomic_path(path, suffix="part") as tmp:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
            expected = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=expected, unit="B", unit_scale=True, desc=f"Downloading {path.name}") as bar:
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
            received = out.tell()
        if expected is not None and received != expected:
            raise IncompleteDownload(f"connection closed after {received} of {expected} bytes")


def file_digest(path: Path, algorithm: str) -> str:
    content = path.read_bytes()
    if algorithm == "git-sha1":
        return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()
    if algorithm == "sha256":
        return hashlib.sha256(content).hexdigest()
    raise ConfigError(f"checksum algorithm {algorithm!r}: expected git-sha1 or sha256")


def verify_checksum(path: Path, checksum: str) -> None:
    """Raises RecordError, with both digests and what to do, unless `path` has `checksum` ("git-sha1:<hex>")."""
    algorithm, _, expected = checksum.partition(":")
    digest = file_digest(path, algorithm)
    if digest != expected.lower():
        raise RecordError(
            f"{path}: {algorithm} is {digest}, expected {expected} (a different version or a damaged download). "
            f"Delete it to download the pinned version again, or point data.path at your own copy."
        )


def validate_records_file(
    path: Path, checksum: str | None = None, num_records: int | None = None, required_fields: tuple[str, ...] = ()
) -> None:
    """Raises RecordError, naming the file (and record and field), unless `path` is the dataset it should be."""
    if checksum:
        verify_checksum(path, checksum)
    if path.suffix not in (".json", ".jsonl"):  # a prompt template, a CSV table: the checksum is the whole check
        return
    records = read_json_records(path)
    if num_records is not None and len(records) != num_records:
        raise RecordError(f"{path}: {len(records)} records, expected {num_records}")
    for index, record in enumerate(records):
        missing = [f for f in required_fields if not isinstance(record, dict) or f not in record]
        if missing:
            raise RecordError(f"{path}: record {index}: field '{missing[0]}' is missing")
