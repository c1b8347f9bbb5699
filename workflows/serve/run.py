"""Start the embeddings application on Ray Serve and (optionally) block until a signal.

``run_serve(config)`` starts or joins Ray (:func:`embedforge.runtime.init_ray`), starts Serve's
HTTP proxy on ``http.host:http.port``, deploys :func:`workflows.serve.app.build_app`, waits until
it answers ``/healthz``, commits ``endpoint.json`` under ``output`` (when set) and returns a
summary. With ``serve.blocking`` it then waits for SIGINT/SIGTERM and shuts Serve down; without,
it returns at once and the application keeps running as long as this process's Ray does (on a
cluster: until ``serve shutdown``).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

from workflows.serve.config import ServeConfig
from workflows.serve.endpoint import endpoint_url, wait_healthy

log = logging.getLogger(__name__)


def serve_environment(config: ServeConfig) -> dict[str, str]:
    """Environment Ray Serve reads when Ray starts, for ``serve.http_front`` (empty for the default proxy)."""
    if config.serve.http_front == "haproxy":
        # RAY_SERVE_THROUGHPUT_OPTIMIZED: user code on the replica's main loop, buffered access logs,
        # gRPC between replicas, direct ingress; RAY_SERVE_ENABLE_HA_PROXY: HAProxy in front of it.
        return {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
    return {}


def deploy(config: ServeConfig) -> str:
    """Start Serve's proxy and deploy the app on an already running Ray; return the base URL."""
    from ray import serve

    from embedforge.runtime import check_resources
    from workflows.serve.app import build_app

    check_resources(config.model_deployment.num_cpus, config.model_deployment.num_gpus, "serve.model_deployment",
                    config.ray.fail_fast_on_missing_gpus)
    serve.start(http_options={"host": config.http.host, "port": config.http.port})
    serve.run(build_app(config), name=config.serve.app_name, route_prefix=config.http.route_prefix,
              blocking=False)
    url = endpoint_url(config)
    wait_healthy(url, config.serve.startup_timeout_s)
    return url


def run_serve(config: ServeConfig) -> dict[str, Any]:
    from embedforge import storage
    from embedforge.runtime import init_ray

    os.environ.update(serve_environment(config))  # before Ray starts here (a local Ray inherits it)
    init_ray(config.ray)
    url = deploy(config)
    summary: dict[str, Any] = {
        "url": url, "embeddings": f"{url}/v1/embeddings", "models": list(config.models),
        "default_model": config.default_model_name, "auth": config.auth.mode, "app": config.serve.app_name,
        "output": config.output,
    }
    if config.output:
        storage.write_json(storage.join(config.output, "endpoint.json"), summary)
        summary["manifest"] = storage.commit(config.output, {"kind": "serve", "files": ["endpoint.json"],
                                                             "url": url, "models": list(config.models)})
    log.info("embeddings server ready at %s (models: %s)", url, ", ".join(config.models))
    if config.serve.blocking:
        block_until_signal(config.serve.app_name)
    return summary


def block_until_signal(app_name: str) -> None:
    """Wait for SIGINT/SIGTERM, then shut Serve down."""
    from ray import serve

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
    log.info("signal received: shutting down Serve (application %s)", app_name)
    serve.shutdown()
