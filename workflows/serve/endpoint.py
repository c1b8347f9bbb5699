"""Helpers every HTTP service on Serve shares (the embeddings app, the debate app): the base URL
of an app from its ``http`` section, and waiting until it answers ``/healthz``. Pure (no Serve)."""

from __future__ import annotations

import time
import urllib.request
from typing import Any

from embedforge.errors import EngineError


def endpoint_url(config: Any, port: int | None = None) -> str:
    """Base URL of an app whose config has an ``http`` section (0.0.0.0 / :: reached on 127.0.0.1)."""
    host = "127.0.0.1" if config.http.host in ("0.0.0.0", "::") else config.http.host
    prefix = config.http.route_prefix.rstrip("/")
    return f"http://{host}:{port or config.http.port}{prefix}"


def wait_healthy(url: str, timeout_s: float) -> None:
    """Poll ``{url}/healthz`` until it answers 200 (EngineError after ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=5) as resp:  # noqa: S310 (our own server)
                if resp.status == 200:
                    return
        except OSError as e:
            last = e
        time.sleep(0.5)
    raise EngineError(f"server at {url} not healthy after {timeout_s:.0f}s (last error: {last}); "
                      "see the Serve logs under the Ray session folder")
