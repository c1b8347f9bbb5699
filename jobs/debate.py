"""Serve the debate app: ``python -m jobs.debate --config configs/debate.yaml [--set a.b=c] [--dry-run]``.

Starts (or joins) Ray, deploys ``POST /v1/debate`` on Ray Serve and, with ``serve.blocking``, waits
for SIGINT/SIGTERM before shutting Serve down. API keys come from ``auth.api_keys_env`` or
``auth.api_keys_file``, never from the config.
"""

from __future__ import annotations

import json
import signal
import sys
import threading

from embedforge.config import run_job
from workflows.debate.config import DebateConfig


def debate(config: DebateConfig) -> int:
    from workflows.debate.app import run_debate_service

    summary = run_debate_service(config)
    print(json.dumps({k: v for k, v in summary.items() if k != "manifest"}, indent=2, default=str))
    print(f"POST {summary['debate']}  (Authorization: Bearer <key>)" if config.auth.mode != "disabled"
          else f"POST {summary['debate']}  (auth disabled)")
    if config.serve.blocking:
        from ray import serve

        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
        serve.shutdown()
    return 0


def main(argv=None) -> int:
    from workflows.pipeline.stages import check_api_keys

    return run_job(DebateConfig, debate, argv, check=lambda c: check_api_keys(c.auth))


if __name__ == "__main__":
    sys.exit(main())
