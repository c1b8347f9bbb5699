"""The model deployment: multiplexed embedders with dynamic batching grouped by (model, layers).

* Model multiplexing (``@serve.multiplexed``): the served model name arrives as the request's
  multiplexed model id; the replica loads that model's folder (local or ``s3://``) on first use
  and keeps the ``max_models_per_replica`` most recently used. Serve routes requests for a model
  to replicas that already hold it.
* Tokens first (:mod:`workflows.serve.tokens`): texts are tokenized once on arrival (token-id
  inputs are checked against the vocabulary), under the over-length policy; batches carry ids.
* Admission: a request that would take the replica's queued sentences past
  ``limits.max_queued_sentences`` is answered 503 with ``Retry-After`` at once, so a flood
  queues a bounded amount of work (memory: sentences x max tokens) and the rest is told to retry.
* Dynamic batching, sized in sentences: requests are split into chunks of at most
  ``max_batch_size`` sentences and go to the replica's
  :class:`~workflows.serve.forward_queue.ForwardQueue`, which runs one forward pass at a time and
  merges everything that queued meanwhile into the next one, grouped by (model, layers) -- the
  two things that change the forward pass (TEI's and Infinity's policy). ``dimensions`` is a
  cheap slice after the pass, so requests with different dimensions share one forward batch.
  Not ``@serve.batch``: in front of the queue it only delayed each batch by its timeout (the
  queue already gathers what arrives while the model is busy).
* Timings: each answer carries its phases (tokenize, queue, forward) and the metrics go to
  ``ray.util.metrics`` (cluster-wide through Ray's metrics agents, see :mod:`.metrics`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import logging
import math
import time
from typing import Any

import numpy as np

from workflows.serve.config import ServeConfig
from workflows.serve.forward_queue import ForwardQueue
from workflows.serve.limits import RequestError, check_range, overloaded

log = logging.getLogger(__name__)


def _chunks(rows: list, size: int) -> list[list]:
    return [rows[i:i + size] for i in range(0, len(rows), size)]


def model_info(name: str, embedder: Any, max_tokens: int, long_inputs: str = "reject") -> dict[str, Any]:
    """What ``/v1/models`` shows: the elastic grid, or the full depth/width when the model has none."""
    grid = embedder.grid or {}
    return {
        "id": name,
        "max_layers": embedder.num_layers,
        "max_dimensions": embedder.dimension,
        "layers": list(grid.get("layers") or [embedder.num_layers]),
        "dimensions": list(grid.get("dims") or [embedder.dimension]),
        "max_tokens": max_tokens,
        "vocab_size": len(embedder.counting_tokenizer),
        "long_inputs": long_inputs,
        "backend": getattr(embedder, "backend", "sentence-transformers"),
    }


def make_model_server(config: ServeConfig) -> type:
    """The model deployment class for ``config`` (decorator arguments come from the config)."""
    from ray import serve

    batching = config.batching

    class EmbeddingModelServer:
        def __init__(self, config_data: dict[str, Any]):
            import torch

            self.config = ServeConfig.model_validate(config_data)
            self._threads = self.config.model_deployment.torch_threads or max(1, math.ceil(
                self.config.model_deployment.num_cpus))
            torch.set_num_threads(self._threads)
            # Forward passes run in this one thread (forward_ids sets torch's per-thread count in it:
            # a fresh thread would otherwise compute on OMP_NUM_THREADS, 1 in Ray workers).
            self._encoder = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode")
            self._forward = ForwardQueue(self._encode, self.config.batching.max_batch_size,
                                         self.config.batching.batch_wait_timeout_s)
            self._admitted = 0  # sentences admitted and not yet answered
            from workflows.serve.metrics import ModelMetrics

            self.metrics = ModelMetrics()

        @serve.multiplexed(max_num_models_per_replica=batching.max_models_per_replica)
        async def get_model(self, model_id: str) -> Any:
            from actors.embedder import Embedder, EmbedderConfig

            source = self.config.models.get(model_id)
            if source is None:
                raise RequestError(f"model {model_id!r} is not served; served: {', '.join(self.config.models)}",
                                   status_code=404, param="model", code="model_not_found")
            started = time.monotonic()
            import ray

            if self.config.backends.get(model_id) == "vllm":
                embedder = await asyncio.to_thread(self._vllm_embedder, model_id, source)
                if embedder is not None:
                    return embedder
            device = "cuda" if ray.get_gpu_ids() else "cpu"  # GPUs given to this replica (ray_actor_options)
            embedder = await asyncio.to_thread(Embedder, EmbedderConfig(
                model=source, device=device, batch_size=self.config.batching.encode_batch_size,
                normalize=self.config.normalize,
                num_cpus=self.config.model_deployment.num_cpus, torch_threads=self._threads))
            native = embedder.model.max_seq_length or self.config.limits.max_tokens_per_input
            embedder.model.max_seq_length = min(native, self.config.limits.max_tokens_per_input)
            embedder.max_tokens = embedder.model.max_seq_length
            # Tokenization runs on the event loop while padding runs in the encode thread; a fast
            # tokenizer's padding/truncation state is shared, so the loop gets its own copy.
            embedder.counting_tokenizer = copy.deepcopy(embedder.model.tokenizer)
            from workflows.serve.tokens import text_prompt

            embedder.serve_prompt = text_prompt(embedder.model)
            log.info("loaded model %s from %s in %.1fs (%d layers, %d dims, max %d tokens)", model_id,
                     embedder.model_path, time.monotonic() - started, embedder.num_layers, embedder.dimension,
                     embedder.model.max_seq_length)
            return embedder

        def _vllm_embedder(self, model_id: str, source: str) -> Any:
            """The vLLM pooling engine for ``model_id``, or None (logged) when vLLM cannot run its pooling."""
            import copy as _copy

            from actors.vllm_embedder import VLLMEmbedder, VLLMEmbedderConfig, vllm_pooling_support
            from embedforge.models import resolve_model

            folder = resolve_model(source)
            reason = vllm_pooling_support(folder)
            if reason is not None:
                log.warning("model %s: served with sentence-transformers, not vLLM: %s", model_id, reason)
                return None
            native = _native_max_tokens(folder)
            v = self.config.vllm
            embedder = VLLMEmbedder(VLLMEmbedderConfig(
                model=folder, dtype=v.dtype, kv_cache_gb=v.kv_cache_gb, enforce_eager=v.enforce_eager,
                num_threads=self._threads,
                max_model_len=min(native or self.config.limits.max_tokens_per_input,
                                  self.config.limits.max_tokens_per_input)))
            embedder.counting_tokenizer = _copy.deepcopy(embedder.tokenizer)
            embedder.serve_prompt = embedder.prompt
            log.info("loaded model %s from %s with vLLM's pooling runner (%d layers, %d dims, max %d tokens)",
                     model_id, folder, embedder.num_layers, embedder.dimension, embedder.max_tokens)
            return embedder

        async def info(self, model_id: str | None = None) -> dict[str, Any]:
            model_id = model_id or serve.get_multiplexed_model_id()
            embedder = await self.get_model(model_id)
            return model_info(model_id, embedder, embedder.max_tokens, self.config.limits.long_inputs)

        def _admit(self, n: int) -> None:
            limit = self.config.limits.max_queued_sentences
            if self._admitted and self._admitted + n > limit:
                self.metrics.rejected.inc()
                raise overloaded(f"{self._admitted} sentences are queued in this replica (limit {limit})",
                                 self.config.limits.retry_after_s)
            self._admitted += n

        async def embed(self, inputs: list, dimensions: int | None = None,
                        layers: int | None = None, model_id: str | None = None) -> dict[str, Any]:
            """Embeddings [n, dims] float32 of texts or token-id lists, plus usage, batches and phase timings.

            ``model_id``: given by a fused deployment's routes; otherwise the multiplexed id of the call.
            """
            from workflows.serve.tokens import to_token_ids

            began = time.monotonic()
            model_id = model_id or serve.get_multiplexed_model_id()
            embedder = await self.get_model(model_id)
            check_range("dimensions", dimensions, 1, embedder.dimension, f"model {model_id!r}")
            check_range("layers", layers, 1, embedder.num_layers, f"model {model_id!r}")
            if layers is not None and layers < embedder.num_layers and getattr(embedder, "backend", "") == "vllm":
                raise RequestError(f"layers={layers}: model {model_id!r} runs on vLLM's pooling runner, which has no "
                                   f"early exit; omit layers or ask for {embedder.num_layers}", status_code=400,
                                   param="layers", code="invalid_value")
            self._admit(len(inputs))
            try:
                tok = to_token_ids(embedder.counting_tokenizer, inputs, embedder.max_tokens,
                                   self.config.limits.long_inputs, len(embedder.counting_tokenizer),
                                   embedder.serve_prompt, model_id)
                enqueued = time.monotonic()
                parts = await asyncio.gather(*(
                    self._forward.submit((model_id, layers), chunk)
                    for chunk in _chunks(tok.ids, self.config.batching.max_batch_size)))
            finally:
                self._admitted -= len(inputs)
            emb = np.concatenate([p.embeddings for p in parts])
            from embedforge.elastic import truncate_dims

            emb = truncate_dims(emb, dimensions, normalize=self.config.normalize)
            queue_s = max(p.started for p in parts) - enqueued
            forward_s = sum(p.seconds for p in parts)
            self.metrics.observe(model_id, len(inputs), tok.tokens, [p.batch_size for p in parts], queue_s,
                                 forward_s, tok.seconds)
            return {
                "embeddings": np.ascontiguousarray(emb, dtype=np.float32),
                "prompt_tokens": tok.tokens,
                "dimensions": int(emb.shape[1]),
                "layers": int(layers or embedder.num_layers),
                "batch_sizes": [p.batch_size for p in parts],
                "timings": {"replica": time.monotonic() - began, "tokenize": tok.seconds, "queue": queue_s,
                            "forward": forward_s},
            }

        async def _encode(self, key: tuple[str, int | None], rows: list[list[int]]) -> np.ndarray:
            from workflows.serve.tokens import forward_ids

            model_id, layers = key
            embedder = await self.get_model(model_id)
            if getattr(embedder, "backend", "") == "vllm":
                return await asyncio.get_running_loop().run_in_executor(self._encoder, embedder.forward_ids, rows)
            return await asyncio.get_running_loop().run_in_executor(
                self._encoder, forward_ids, embedder.model, rows, self.config.batching.encode_batch_size, layers,
                self._threads)

        def check_health(self) -> None:
            """Serve's health check: the replica is alive while its event loop answers."""

    return EmbeddingModelServer


def _native_max_tokens(folder: str) -> int | None:
    """The folder's sentence-transformers max_seq_length (or its tokenizer's model_max_length), if it names one."""
    import json
    from pathlib import Path

    for name, key in (("sentence_bert_config.json", "max_seq_length"), ("tokenizer_config.json", "model_max_length")):
        p = Path(folder, name)
        if p.is_file():
            value = json.loads(p.read_text()).get(key)
            if isinstance(value, int) and 0 < value < 1_000_000:
                return value
    return None


def unwrap_error(err: BaseException) -> BaseException:
    """The user-level exception behind a Ray task error (Ray wraps replica exceptions)."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, BaseException) else err


__all__ = ["make_model_server", "model_info", "unwrap_error", "RequestError"]
