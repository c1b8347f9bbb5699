"""Metrics of the embeddings server through ``ray.util.metrics``: cluster-wide and monotonic.

Every replica records into Ray's metrics pipeline; each node's Ray metrics agent exports the
series of every worker on that node (one series per worker, kept after the worker exits), as
it exports Ray Serve's own ``ray_serve_*`` series (requests, latencies, replicas, queue lengths
per deployment). So counters never go backwards when the autoscaler adds or removes replicas,
and a Prometheus scraping the agents (Ray's service-discovery file, or KubeRay's pod monitor)
sees the whole cluster. ``GET /metrics`` of the app answers the same thing in one scrape: our
``ray_embedforge_serve_*`` and Ray Serve's ``ray_serve_*`` families from every node's agent.

* HTTP-facing replicas (:class:`HttpMetrics`): requests by model and status, latency by model.
* Model replicas (:class:`ModelMetrics`): inputs, tokens, sentences per forward pass, queue,
  tokenize and forward seconds, overload rejections.
"""

from __future__ import annotations

import logging
import urllib.request
from collections.abc import Iterable

log = logging.getLogger(__name__)

PREFIX = "embedforge_serve"
EXPORTED_PREFIXES = ("ray_embedforge_serve_", "ray_serve_")  # Ray adds "ray_" to ray.util.metrics names

_SECONDS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]
_SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]


class HttpMetrics:
    """Recorded where requests are answered (the ingress, or the fused deployment)."""

    def __init__(self) -> None:
        from ray.util.metrics import Counter, Histogram

        self.requests = Counter(f"{PREFIX}_requests", "Embedding requests by model and HTTP status",
                                tag_keys=("model", "status"))
        self.latency = Histogram(f"{PREFIX}_request_seconds", "Request latency inside the app", boundaries=_SECONDS,
                                 tag_keys=("model",))

    def observe(self, model: str, status: int, seconds: float) -> None:
        self.requests.inc(1, tags={"model": model, "status": str(status)})
        self.latency.observe(seconds, tags={"model": model})


class ModelMetrics:
    """Recorded in the model replicas."""

    def __init__(self) -> None:
        from ray.util.metrics import Counter, Histogram

        self.inputs = Counter(f"{PREFIX}_inputs", "Inputs embedded", tag_keys=("model",))
        self.tokens = Counter(f"{PREFIX}_tokens", "Prompt tokens embedded", tag_keys=("model",))
        self.rejected = Counter(f"{PREFIX}_overload_rejections", "Requests answered 503 because the replica's "
                                                                 "queue was full")
        self.batch_size = Histogram(f"{PREFIX}_batch_size", "Sentences per forward pass", boundaries=_SIZES)
        self.queue = Histogram(f"{PREFIX}_queue_seconds", "Wait from tokenized to its forward pass",
                               boundaries=_SECONDS)
        self.forward = Histogram(f"{PREFIX}_forward_seconds", "Forward pass time a request waited on",
                                 boundaries=_SECONDS)
        self.tokenize = Histogram(f"{PREFIX}_tokenize_seconds", "Tokenization time per request",
                                  boundaries=_SECONDS)

    def observe(self, model: str, inputs: int, tokens: int, batch_sizes: Iterable[int], queue_s: float,
                forward_s: float, tokenize_s: float) -> None:
        tags = {"model": model}
        self.inputs.inc(inputs, tags=tags)
        self.tokens.inc(tokens, tags=tags)
        for size in batch_sizes:
            self.batch_size.observe(size)
        self.queue.observe(queue_s)
        self.forward.observe(forward_s)
        self.tokenize.observe(tokenize_s)


def merge_families(texts: Iterable[str], prefixes: tuple[str, ...] = EXPORTED_PREFIXES) -> str:
    """Prometheus texts of several agents as one exposition: each family's HELP/TYPE once, then all its
    samples (the text format wants a family's samples together); only families named ``prefixes``."""
    order: list[str] = []
    headers: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    for text in texts:
        family = None
        for line in text.splitlines():
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                family = line.split(" ", 3)[2]
                if not family.startswith(prefixes):
                    family = None
                    continue
                if family not in headers:
                    order.append(family)
                    headers[family], samples[family] = [], []
                if line not in headers[family]:
                    headers[family].append(line)
            elif line and not line.startswith("#") and family is not None:
                samples[family].append(line)
    return "".join("\n".join(headers[f] + samples[f]) + "\n" for f in order)


def cluster_metrics(timeout_s: float = 2.0) -> str:
    """Our and Ray Serve's families from the metrics agent of every alive node (unreachable ones skipped)."""
    import ray

    texts = []
    for node in ray.nodes():
        if not node.get("Alive") or not node.get("MetricsExportPort"):
            continue
        url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 (the cluster's own agents)
                texts.append(resp.read().decode("utf-8", "replace"))
        except OSError as e:
            log.warning("Ray metrics agent at %s unreachable: %s", url, e)
    return merge_families(texts)
