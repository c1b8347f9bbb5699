"""Prometheus metrics of the embeddings server (prometheus_client), one registry per replica.

The ingress observes everything: request counts by model and status, tokens, inputs, the
batch sizes and queue times the model replicas report back with each result, and latency.
``/metrics`` serves this registry followed by the node's Ray metrics (which include Ray
Serve's own ``ray_serve_*`` series) fetched from the local Ray metrics agent.
"""

from __future__ import annotations

import logging
import urllib.request

log = logging.getLogger(__name__)

PREFIX = "embedforge_serve"


class ServeMetrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter(f"{PREFIX}_requests", "Embedding requests by model and HTTP status",
                                ["model", "status"], registry=self.registry)
        self.inputs = Counter(f"{PREFIX}_inputs", "Strings embedded", ["model"], registry=self.registry)
        self.tokens = Counter(f"{PREFIX}_tokens", "Prompt tokens embedded", ["model"], registry=self.registry)
        self.batch_size = Histogram(f"{PREFIX}_batch_size", "Sentences per forward batch in the model replica",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=self.registry)
        self.queue_seconds = Histogram(f"{PREFIX}_queue_seconds", "Time a request waited for its batch",
                                       buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
                                       registry=self.registry)
        self.latency_seconds = Histogram(f"{PREFIX}_request_seconds", "Request latency in the ingress", ["model"],
                                         buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
                                         registry=self.registry)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


def ray_node_metrics(timeout_s: float = 2.0) -> bytes:
    """The Prometheus text Ray's metrics agent exports on this node (empty when unreachable)."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node.get("NodeID") == node_id and node.get("MetricsExportPort"):
            url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
            try:
                with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 (local agent)
                    return resp.read()
            except OSError as e:
                log.debug("Ray metrics agent at %s unreachable: %s", url, e)
    return b""
