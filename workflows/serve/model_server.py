"""The model deployment: multiplexed embedders with dynamic batching grouped by (model, layers).

* Model multiplexing (``@serve.multiplexed``): the served model name arrives as the request's
  multiplexed model id; the replica loads that model's folder (local or ``s3://``) on first use
  and keeps the ``max_models_per_replica`` most recently used. Serve routes requests for a model
  to replicas that already hold it.
* Dynamic batching (``@serve.batch``, sized in sentences): requests are split into chunks of at
  most ``max_batch_size`` sentences and gathered for ``batch_wait_timeout_s``; each gathered batch
  goes to the replica's :class:`~workflows.serve.forward_queue.ForwardQueue`, which runs one
  forward pass at a time and merges everything that queued meanwhile into the next one, grouped
  by (model, layers) -- the two things that change the forward pass. ``dimensions`` is a cheap
  slice after the pass, so requests with different dimensions share one forward batch.
* Limits: the token length of every input is measured before queueing; long inputs are
  truncated (counted as truncated) or rejected with 400.
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
from workflows.serve.limits import RequestError, check_range, check_token_lengths

log = logging.getLogger(__name__)


def _chunks(texts: list[str], size: int) -> list[list[str]]:
    return [texts[i:i + size] for i in range(0, len(texts), size)]


def _sentences(items: list[tuple]) -> int:
    return sum(len(item[1]) for item in items)


def model_info(name: str, embedder: Any, max_tokens: int) -> dict[str, Any]:
    """What ``/v1/models`` shows: the elastic grid, or the full depth/width when the model has none."""
    grid = embedder.grid or {}
    return {
        "id": name,
        "max_layers": embedder.num_layers,
        "max_dimensions": embedder.dimension,
        "layers": list(grid.get("layers") or [embedder.num_layers]),
        "dimensions": list(grid.get("dims") or [embedder.dimension]),
        "max_tokens": max_tokens,
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
            # Forward passes run in this one thread (the Embedder sets torch's per-thread count in it:
            # a fresh thread would otherwise compute on OMP_NUM_THREADS, 1 in Ray workers).
            self._encoder = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode")
            self._batched.set_max_batch_size(self.config.batching.max_batch_size)
            self._batched.set_batch_wait_timeout_s(self.config.batching.batch_wait_timeout_s)
            self._forward = ForwardQueue(self._encode, self.config.batching.max_batch_size)

        @serve.multiplexed(max_num_models_per_replica=batching.max_models_per_replica)
        async def get_model(self, model_id: str) -> Any:
            from actors.embedder import Embedder, EmbedderConfig

            source = self.config.models.get(model_id)
            if source is None:
                raise RequestError(f"model {model_id!r} is not served; served: {', '.join(self.config.models)}",
                                   status_code=404, param="model", code="model_not_found")
            started = time.monotonic()
            import ray

            device = "cuda" if ray.get_gpu_ids() else "cpu"  # GPUs given to this replica (ray_actor_options)
            embedder = await asyncio.to_thread(Embedder, EmbedderConfig(
                model=source, device=device, batch_size=self.config.batching.encode_batch_size,
                normalize=self.config.normalize,
                num_cpus=self.config.model_deployment.num_cpus, torch_threads=self._threads))
            native = embedder.model.max_seq_length or self.config.limits.max_tokens_per_input
            embedder.model.max_seq_length = min(native, self.config.limits.max_tokens_per_input)
            # Token counting runs on the event loop while encode runs in a worker thread; a fast
            # tokenizer's padding/truncation state is shared, so counting gets its own copy.
            embedder.counting_tokenizer = copy.deepcopy(embedder.model.tokenizer)
            log.info("loaded model %s from %s in %.1fs (%d layers, %d dims, max %d tokens)", model_id,
                     embedder.model_path, time.monotonic() - started, embedder.num_layers, embedder.dimension,
                     embedder.model.max_seq_length)
            return embedder

        async def info(self, model_id: str | None = None) -> dict[str, Any]:
            model_id = model_id or serve.get_multiplexed_model_id()
            embedder = await self.get_model(model_id)
            return model_info(model_id, embedder, embedder.model.max_seq_length)

        def _token_lengths(self, embedder: Any, texts: list[str]) -> list[int]:
            max_tokens = embedder.model.max_seq_length
            tok = embedder.counting_tokenizer
            if self.config.limits.long_inputs == "reject":
                raw = [len(ids) for ids in tok(texts, add_special_tokens=True)["input_ids"]]
                check_token_lengths(raw, max_tokens)
                return raw
            ids = tok(texts, add_special_tokens=True, truncation=True, max_length=max_tokens)["input_ids"]
            return [len(x) for x in ids]

        async def embed(self, texts: list[str], dimensions: int | None = None,
                        layers: int | None = None, model_id: str | None = None) -> dict[str, Any]:
            """Embeddings [n, dims] float32 plus usage and what the batches looked like.

            ``model_id``: given by a fused deployment's routes; otherwise the multiplexed id of the call.
            """
            model_id = model_id or serve.get_multiplexed_model_id()
            embedder = await self.get_model(model_id)
            check_range("dimensions", dimensions, 1, embedder.dimension, f"model {model_id!r}")
            check_range("layers", layers, 1, embedder.num_layers, f"model {model_id!r}")
            lengths = self._token_lengths(embedder, texts)
            enqueued = time.monotonic()
            # _batched answers with pending futures (see there); each resolves after its forward pass.
            pending = await asyncio.gather(*(
                self._batched((model_id, chunk, layers))
                for chunk in _chunks(texts, self.config.batching.max_batch_size)))
            parts = await asyncio.gather(*pending)
            emb = np.concatenate([p.embeddings for p in parts])
            if dimensions is not None and dimensions < emb.shape[1]:
                from embedforge.elastic import truncate_dims

                emb = truncate_dims(emb, dimensions, normalize=self.config.normalize)
            return {
                "embeddings": np.ascontiguousarray(emb, dtype=np.float32),
                "prompt_tokens": int(sum(lengths)),
                "dimensions": int(emb.shape[1]),
                "layers": int(layers or embedder.num_layers),
                "batch_sizes": [p.batch_size for p in parts],
                "queue_s": max(p.started for p in parts) - enqueued,
            }

        @serve.batch(max_batch_size=batching.max_batch_size, batch_wait_timeout_s=batching.batch_wait_timeout_s,
                     batch_size_fn=_sentences)
        async def _batched(self, items: list[tuple]) -> list[asyncio.Future]:
            """Hand the gathered batch to the forward queue and answer with its pending results at once.

            Returning futures (not results) lets ``@serve.batch`` gather the next batch while this
            one waits for or runs its forward pass; the forward queue merges them.
            """
            return [self._forward.submit((model_id, layers), texts) for model_id, texts, layers in items]

        async def _encode(self, key: tuple[str, int | None], texts: list[str]) -> np.ndarray:
            model_id, layers = key
            embedder = await self.get_model(model_id)
            return await asyncio.get_running_loop().run_in_executor(self._encoder, embedder.encode, texts, None, layers)

        def check_health(self) -> None:
            """Serve's health check: the replica is alive while its event loop answers."""

    return EmbeddingModelServer


def unwrap_error(err: BaseException) -> BaseException:
    """The user-level exception behind a Ray task error (Ray wraps replica exceptions)."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, BaseException) else err


__all__ = ["make_model_server", "model_info", "unwrap_error", "RequestError"]
