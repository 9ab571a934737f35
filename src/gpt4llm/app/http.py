"""What the project's two web servers (`serve`, `humaneval`) share: a FastAPI app on uvicorn, over a socket bound
before uvicorn starts (so a port in use is said at once, in one line, and port=0 gets a free one), served in a
background thread (tests, benchmarks) or in the foreground until Ctrl-C or SIGTERM."""

from __future__ import annotations

import errno
import signal
import socket
import threading
import time

from gpt4llm.errors import ServerStartError


def listen(host: str, port: int, backlog: int = 2048) -> socket.socket:
    try:
        return socket.create_server((host, port), backlog=backlog)
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise ServerStartError(
                f"port {port} on {host} is in use: stop what listens there, or pass port=<another>"
            ) from None
        raise ServerStartError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None


class WebServer:
    """Subclasses give `build_app()`; `uvicorn_options` go to uvicorn.Config."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, **uvicorn_options):
        self.socket = listen(host, port)
        self.host, self.port = host, self.socket.getsockname()[1]
        self.uvicorn_options = uvicorn_options
        self._uvicorn = None
        self._thread: threading.Thread | None = None

    def build_app(self):
        raise NotImplementedError

    def _server(self):
        import uvicorn

        config = uvicorn.Config(
            self.build_app(), log_level="warning", access_log=False, lifespan="off", **self.uvicorn_options
        )
        self._uvicorn = uvicorn.Server(config)
        return self._uvicorn

    def start(self, timeout: float = 30.0):
        """Serves in a background thread and returns once it accepts; `close()` stops it."""
        server = self._server()
        self._thread = threading.Thread(target=server.run, kwargs={"sockets": [self.socket]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        return self

    def serve_until_stopped(self) -> None:
        """In the foreground until Ctrl-C, or SIGTERM (`kill`, a container's stop), which ends it the same way."""
        signal.signal(signal.SIGTERM, _interrupt)
        try:
            self._server().run(sockets=[self.socket])
        except KeyboardInterrupt:
            pass
        finally:
            self.close()

    def close(self) -> None:
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.socket.close()


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
