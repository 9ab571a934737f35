"""Downloads against a real HTTP server on 127.0.0.1: complete files land atomically, cut or bad ones never do."""

from __future__ import annotations

import hashlib
import json
import subprocess

import pytest

from gpt4llm.data.sources import ensure_file
from gpt4llm.errors import DownloadError, RecordError
from helpers.fake_servers import FileServer

RECORDS = [{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(500)]
BODY = json.dumps(RECORDS).encode()


@pytest.fixture
def server(loopback):
    return lambda body=BODY, **kwargs: loopback(FileServer, body=body, **kwargs)


def leftovers(directory):
    return [p.name for p in directory.iterdir() if ".part" in p.name]


def git_blob_id(body: bytes) -> str:
    """The oracle for git-sha1 checksums: git itself."""
    return (
        subprocess.run(["git", "hash-object", "--stdin"], input=body, capture_output=True, check=True)
        .stdout.decode()
        .strip()
    )


@pytest.mark.parametrize("algorithm", ["git-sha1", "sha256"])
def test_download_validates_and_is_cached(tmp_path, server, algorithm):
    srv = server()
    target = tmp_path / "data" / "alpaca_gpt4_data.json"
    checksum = f"{algorithm}:" + (git_blob_id(BODY) if algorithm == "git-sha1" else hashlib.sha256(BODY).hexdigest())
    ensure_file(target, srv.url, checksum=checksum, num_records=500, required_fields=("instruction", "output"))
    assert target.read_bytes() == BODY and srv.requests == 1
    ensure_file(target, srv.url, checksum=checksum, num_records=500)  # a second run does not touch the network
    assert srv.requests == 1


def test_a_cut_connection_is_retried_and_never_leaves_half_a_file(tmp_path, server):
    srv = server(cuts=1)
    target = tmp_path / "d.json"
    ensure_file(target, srv.url, num_records=500, attempts=2)
    assert srv.requests == 2 and target.read_bytes() == BODY and not leftovers(tmp_path)

    always_cut = server(cuts=99)
    target = tmp_path / "e.json"
    with pytest.raises(DownloadError) as err:
        ensure_file(target, always_cut.url, attempts=2, setting="data.path")
    assert not target.exists() and not leftovers(tmp_path)
    message = str(err.value)
    assert "of" in message and "bytes" in message  # says what happened: connection closed after N of M bytes
    assert f"copy the file to {target}" in message and "data.path=" in message


def test_offline_says_which_file_and_which_override(tmp_path):
    target = tmp_path / "alpaca_gpt4_data.json"
    with pytest.raises(DownloadError, match="alpaca_gpt4_data.json") as err:
        ensure_file(target, "http://127.0.0.1:9/nothing-listens-here.json", attempts=1, setting="data.path")
    assert f"copy the file to {target}" in str(err.value) and "data.path=/path/to/alpaca_gpt4_data.json" in str(
        err.value
    )


@pytest.mark.parametrize(
    "body, kwargs, message",
    [
        (BODY, {"num_records": 52002}, "500 records, expected 52002"),
        (BODY, {"checksum": "sha256:" + "0" * 64}, "sha256 is [0-9a-f]{64}, expected 0{64} .*Delete it"),
        (BODY, {"checksum": "git-sha1:" + "0" * 40}, "git-sha1 is [0-9a-f]{40}, expected 0{40} .*Delete it"),
        (
            json.dumps([{"instruction": "x"}]).encode(),
            {"required_fields": ("instruction", "output")},
            "record 0: field 'output' is missing",
        ),
        (b"<html>rate limited</html>", {}, "not valid JSON"),
    ],
)
def test_a_wrong_file_is_an_error_and_is_not_kept(tmp_path, server, body, kwargs, message):
    srv = server(body=body)
    target = tmp_path / "d.json"
    with pytest.raises(RecordError, match=message) as err:
        ensure_file(target, srv.url, **kwargs)
    assert str(target) in str(err.value) and not target.exists() and not leftovers(tmp_path)
