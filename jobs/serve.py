"""Serve embeddings over an OpenAI-compatible HTTP API (Ray Serve).

    python -m jobs.serve --config configs/serve.yaml
    python -m jobs.serve --config configs/serve.yaml --set serve.blocking=false --set http.port=8001
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from embedforge.config import run_job
from workflows.serve.config import ServeConfig


def _run(config: ServeConfig) -> int:
    from workflows.serve.run import run_serve

    # run_serve blocks until SIGINT/SIGTERM when serve.blocking; print the URL before that.
    if config.serve.blocking:
        from workflows.serve.run import endpoint_url

        print(f"starting embeddings server at {endpoint_url(config)} (Ctrl-C to stop)", flush=True)
    summary: dict[str, Any] = run_serve(config)
    print(f"embeddings server: {summary['embeddings']}  models: {', '.join(summary['models'])}  "
          f"auth: {summary['auth']}", flush=True)
    if summary.get("output"):
        print(f"endpoint written to {summary['output']}/endpoint.json", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from workflows.pipeline.stages import DEPLOY

    return run_job(ServeConfig, _run, argv, check=DEPLOY.check)


if __name__ == "__main__":
    sys.exit(main())
