"""Serve: `python -m gpt4llm.serve model.path=EXPORT` answers OpenAI-compatible chat completions with our model
(/v1/chat/completions, /v1/models, /health), so `gpt4llm.synthesize`, the judge and any OpenAI client can use a model
trained here as they use GPT-4. What it accepts and how it batches: gpt4llm.inference.server."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from gpt4llm.app.cli import hydra_command, reports_user_errors
from gpt4llm.errors import ConfigError

if TYPE_CHECKING:  # the server module (FastAPI, the model code) is imported once the settings are checked
    from gpt4llm.inference.server import ModelServer, ServerSettings

log = logging.getLogger(__name__)


def check_settings(cfg: DictConfig) -> None:
    """A ConfigError for settings under which the server would refuse every request (or never answer one), before the
    model loads: a server that starts must be able to serve."""
    if not cfg.model.path:
        raise ConfigError(
            "model.path is required: model.path=logs/train/runs/<time>/export, or any local Hugging Face causal LM"
        )
    minimums = {
        "max_batch": 1,
        "max_queue": 1,  # 0: every request would get 503
        "max_n": 1,  # 0: every request would get 400
        "max_tokens_limit": 1,
        "default_max_tokens": 1,
        "max_body_bytes": 256,  # below it even a one-word chat request gets 413
        "max_connections": 2,  # uvicorn counts a request's own connection: at 1 every request would get 503
        "max_connections_per_client": 1,  # 0: every connection would be closed at once
    }
    for key, least in minimums.items():
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"{key}={value}: must be a whole number of at least {least} (default in conf/serve.yaml)")
    if cfg.default_max_tokens > cfg.max_tokens_limit:
        raise ConfigError(
            f"default_max_tokens={cfg.default_max_tokens} is above max_tokens_limit={cfg.max_tokens_limit}: every "
            "request without max_tokens would be refused; lower default_max_tokens or raise max_tokens_limit"
        )
    for key in ("batch_wait_ms", "request_timeout"):
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
            raise ConfigError(f"{key}={value}: must be a number of at least 0")
    if cfg.request_timeout == 0:
        raise ConfigError("request_timeout=0: no request could arrive in time; give seconds, e.g. request_timeout=10")
    idle = cfg.idle_timeout
    if isinstance(idle, bool) or not isinstance(idle, (int, float)) or not 0 < idle < float("inf"):
        raise ConfigError(f"idle_timeout={idle}: must be a number of seconds above 0 (default in conf/serve.yaml)")
    if cfg.max_context is not None and (
        isinstance(cfg.max_context, bool) or not isinstance(cfg.max_context, int) or cfg.max_context < 2
    ):
        raise ConfigError(f"max_context={cfg.max_context}: must be a whole number of at least 2, or null")


def serve(cfg: DictConfig) -> None:
    check_settings(cfg)
    import torch

    from gpt4llm.inference.server import load_server

    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    torch.manual_seed(cfg.seed)
    settings = server_settings(cfg)
    server = load_server(cfg.model.path, cfg.model.name, cfg.model.dtype, cfg.model.device, settings)
    announce(server, cfg.api_key_env)
    server.serve_until_stopped()


def server_settings(cfg: DictConfig) -> ServerSettings:
    """The server's settings from conf/serve.yaml; the key is read from the environment variable api_key_env names."""
    from gpt4llm.inference.server import ServerSettings

    return ServerSettings(
        host=cfg.host,
        port=cfg.port,
        api_key=os.environ.get(cfg.api_key_env) if cfg.api_key_env else None,
        max_batch=cfg.max_batch,
        batch_wait=cfg.batch_wait_ms / 1000,
        default_max_tokens=cfg.default_max_tokens,
        max_tokens_limit=cfg.max_tokens_limit,
        max_n=cfg.max_n,
        max_body_bytes=cfg.max_body_bytes,
        max_queue=cfg.max_queue,
        max_context=cfg.max_context,
        max_connections=cfg.max_connections,
        max_connections_per_client=cfg.max_connections_per_client,
        idle_timeout=cfg.idle_timeout,
        request_timeout=cfg.request_timeout,
    )


def announce(server: ModelServer, api_key_env: str | None) -> None:
    """Where the server listens, the prompt format chats become, and a request to try, never the key; a warning when
    other machines can reach it."""
    settings = server.settings
    if settings.host not in ("127.0.0.1", "localhost", "::1"):
        open_to_all = "" if settings.api_key else f", and ${api_key_env} is not set: no key is asked for"
        log.warning(f"Listening on {settings.host}: reachable from other machines{open_to_all}")
    auth = f"Bearer key from ${api_key_env}" if settings.api_key else "no key"
    print(
        f"Serving '{server.name}' (context {server.max_context} tokens, batches of up to {settings.max_batch}, "
        f"{auth}) at {server.base_url}",
        flush=True,
    )
    print(f"Prompt format: {server.served.why}", flush=True)
    header = f' -H "Authorization: Bearer ${api_key_env}"' if settings.api_key else ""
    print(
        f"  try: curl {server.base_url}/chat/completions -H 'Content-Type: application/json'{header} "
        f'-d \'{{"model": "{server.name}", "messages": [{{"role": "user", "content": "Hi"}}]}}\'',
        flush=True,
    )


@hydra_command("serve")
@reports_user_errors
def main(cfg: DictConfig) -> None:
    serve(cfg)


if __name__ == "__main__":
    main()
