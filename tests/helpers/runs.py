"""Running the commands as a user does (`python -m gpt4llm.<command>`), and reading what a run logged."""

from __future__ import annotations

import json
import os
import selectors
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2


def run_cli(module: str, args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """`python -m <module> <args>` offline in `cwd`; fails the test with the end of its output unless it exits 0."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **env)
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def write(path: Path, records) -> Path:
    """`records` as a JSON file (a list of Alpaca records, say)."""
    path.write_text(json.dumps(records, ensure_ascii=False))
    return path


def events(run_dir: Path, **size_guidance) -> EventAccumulator:
    """A run's TensorBoard events, as TensorBoard reads them (purge_step honoured)."""
    return EventAccumulator(str(run_dir / "tensorboard"), size_guidance=size_guidance or None).Reload()


def scalars(run_dir: Path) -> dict[str, list[float]]:
    """Every scalar tag of a run, with its values in step order."""
    logged = events(run_dir)
    return {tag: [e.value for e in logged.Scalars(tag)] for tag in logged.Tags()["scalars"]}


def scalars_by_step(run_dir: Path) -> dict[str, dict[int, float]]:
    """Every scalar tag of a run, with its values by step."""
    logged = events(run_dir)
    return {tag: {e.step: e.value for e in logged.Scalars(tag)} for tag in logged.Tags()["scalars"]}


def hparams_of(run: Path) -> tuple[dict, set[str]]:
    """The hyperparameters and metric tags TensorBoard's HParams plugin reads from a run's events."""
    content = events(run, tensors=0).PluginTagToContent("hparams")
    session = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
    params = {
        k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind"))
        for k, v in session.session_start_info.hparams.items()
    }
    return params, {m.name.tag for m in experiment.experiment.metric_infos}


def raw_chat_request(key: str, body: bytes) -> bytes:
    """A whole POST /v1/chat/completions as bytes, for tests that drive serve through a bare socket (hang-ups,
    half-sent requests)."""
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + key.encode()
        + b"\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


class HalfSentFlood(threading.Thread):
    """serve's issue 11 client, bounded: from each of `addresses` (loopback source addresses; it connects to 127.0.0.1
    only) it keeps `per_address` connections open with part of a request head sent, reopening each as soon as the
    server drops it (after `pause` seconds a round). It stops when told, after `seconds`, or after `max_opens`
    connections. `python -m helpers.runs flood PORT PER_ADDRESS SECONDS` (tests/ on the path) runs one from 127.0.0.1
    in a process of its own until its stdin closes, printing `ready` once its connections are open and the number it
    opened at the end."""

    HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Ty"

    def __init__(self, port: int, addresses, per_address: int, seconds=30.0, max_opens=20_000, pause=0.005):
        super().__init__(daemon=True)
        self.port, self.addresses, self.per_address = port, list(addresses), per_address
        self.seconds, self.max_opens, self.pause = seconds, max_opens, pause
        self.stop, self.ready = threading.Event(), threading.Event()
        self.opened = self.dropped = 0

    def open(self, address: str, selector) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind((address, 0))
            sock.settimeout(5)
            sock.connect(("127.0.0.1", self.port))
            sock.sendall(self.HEAD)
        except OSError:  # dropped at once, or refused: counted as dropped, reopened next round
            sock.close()
            self.dropped += 1
            return
        finally:
            self.opened += 1
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, address)

    def run(self) -> None:
        selector = selectors.DefaultSelector()
        deadline = time.monotonic() + self.seconds
        try:
            for address in self.addresses:
                for _ in range(self.per_address):
                    self.open(address, selector)
            self.ready.set()
            while not self.stop.is_set() and time.monotonic() < deadline and self.opened < self.max_opens:
                for key, _ in selector.select(timeout=0.05):
                    try:
                        if key.fileobj.recv(4096):
                            continue
                    except BlockingIOError:
                        continue
                    except OSError:
                        pass
                    selector.unregister(key.fileobj)
                    key.fileobj.close()
                    self.dropped += 1
                held = {}
                for key in selector.get_map().values():
                    held[key.data] = held.get(key.data, 0) + 1
                for address in self.addresses:  # reopen what was dropped
                    for _ in range(self.per_address - held.get(address, 0)):
                        self.open(address, selector)
                time.sleep(self.pause)
        finally:
            self.ready.set()
            for key in list(selector.get_map().values()):
                key.fileobj.close()
            selector.close()


def flood_from_a_process(port: int, per_address: int, seconds: float) -> None:
    """A HalfSentFlood from 127.0.0.1 in this process, until stdin closes: the attacker in a process of its own."""
    flood = HalfSentFlood(port, ["127.0.0.1"], per_address, seconds=seconds, max_opens=100_000, pause=0)
    flood.start()
    flood.ready.wait()
    print("ready", flush=True)
    sys.stdin.read()
    flood.stop.set()
    flood.join()
    print(flood.opened, flush=True)


if __name__ == "__main__" and sys.argv[1:2] == ["flood"]:
    flood_from_a_process(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
