"""Embeddings for evaluation: an Embedder actor pool on Ray Data (or in-process), with a cache.

A unit of work is an :class:`EmbedRequest`: unique texts of one dataset role (e.g. the
sentences of STS-B test, or Cranfield's documents), the prompt prefix they get, and the layer
count (early exit; None = full depth). Embeddings are stored at full width: Matryoshka
truncation of a stored embedding (first d dims, renormalized) equals encoding with
``dimensions=d``, so every grid cell of a layer count reuses one entry.

Cache: one ``<key>.npy`` plus a ``<key>.json`` written after it (the commit marker) per
(model fingerprint, dataset key, prompt, layers, texts) under ``cache_dir`` (local or s3://).
A rerun with the same model and data loads instead of encoding.

The Ray path runs every uncached request in ONE Ray Data job over an actor pool, so the model
loads once per actor for the whole suite: :class:`GroupedEmbedder` wraps
``actors.embedder.Embedder`` and groups each batch by (prompt, layers), which the plain
``Embedder.__call__`` (one fixed prompt, full depth) cannot do.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embedforge import storage
from embedforge.schemas import require_columns

log = logging.getLogger(__name__)

TEXT, PROMPT, LAYERS, IDX, EMBEDDING = "text", "prompt", "layers", "idx", "embedding"
FULL_DEPTH = -1  # the layers column's value for "all layers" (Arrow has no None in int columns here)
_SAMPLED_HASH_BYTES = 1 << 20
_FULL_HASH_LIMIT = 64 << 20


@dataclass(frozen=True)
class EmbedRequest:
    """Unique ``texts`` of one dataset role, encoded with ``prompt`` at ``layers`` depth."""

    dataset: str
    texts: tuple[str, ...]
    prompt: str = ""
    layers: int | None = None

    def key(self, fingerprint: str) -> str:
        texts_sha = hashlib.sha256("\x00".join(self.texts).encode()).hexdigest()
        blob = json.dumps([fingerprint, self.dataset, self.prompt, self.layers, texts_sha, len(self.texts)])
        return hashlib.sha256(blob.encode()).hexdigest()[:32]


def model_fingerprint(path_or_id: str) -> str:
    """A short content hash of a model folder (or the hub id itself when it is not a folder).

    Files up to 64 MiB are hashed whole; larger ones (weights) by size plus their first, middle
    and last MiB, which changes whenever training touches the weights and keeps hashing a
    500 MB model to milliseconds.
    """
    root = Path(path_or_id)
    if not root.is_dir():
        return hashlib.sha256(f"hub:{path_or_id}".encode()).hexdigest()[:16]
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file() and not q.name.startswith((".", "_MANIFEST"))):
        size = p.stat().st_size
        h.update(f"{p.relative_to(root).as_posix()}:{size}".encode())
        with p.open("rb") as f:
            if size <= _FULL_HASH_LIMIT:
                h.update(f.read())
            else:
                for offset in (0, size // 2, size - _SAMPLED_HASH_BYTES):
                    f.seek(offset)
                    h.update(f.read(_SAMPLED_HASH_BYTES))
    return h.hexdigest()[:16]


def model_prompts(path_or_id: str) -> dict[str, str]:
    """The ``prompts`` of a sentence-transformers folder's config (empty when it has none)."""
    p = Path(path_or_id, "config_sentence_transformers.json")
    if not p.is_file():
        return {}
    return dict(json.loads(p.read_text()).get("prompts") or {})


class EmbeddingCache:
    """``<cache_dir>/<fingerprint>/<key>.npy`` + ``.json`` marker; ``cache_dir=None`` disables it."""

    def __init__(self, cache_dir: str | None, fingerprint: str):
        self.base = storage.join(cache_dir, fingerprint) if cache_dir else None
        self.fingerprint = fingerprint

    def get(self, req: EmbedRequest) -> np.ndarray | None:
        if self.base is None:
            return None
        key = req.key(self.fingerprint)
        if not storage.exists(storage.join(self.base, f"{key}.json")):
            return None
        emb = np.load(io.BytesIO(storage.read_bytes(storage.join(self.base, f"{key}.npy"))))
        return emb if emb.shape[0] == len(req.texts) else None

    def put(self, req: EmbedRequest, emb: np.ndarray) -> None:
        if self.base is None:
            return
        key = req.key(self.fingerprint)
        buf = io.BytesIO()
        np.save(buf, emb.astype(np.float32))
        storage.write_bytes(storage.join(self.base, f"{key}.npy"), buf.getvalue())
        storage.write_json(storage.join(self.base, f"{key}.json"), {
            "dataset": req.dataset, "prompt": req.prompt, "layers": req.layers, "rows": len(req.texts),
            "dims": int(emb.shape[1]), "fingerprint": self.fingerprint})


class GroupedEmbedder:
    """map_batches callable: one Embedder per actor; rows carry their own prompt and layer count."""

    def __init__(self, config: dict[str, Any]):
        from actors.embedder import Embedder

        self.embedder = Embedder(config)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        require_columns(batch.keys(), [IDX, TEXT, PROMPT, LAYERS], "GroupedEmbedder batch")
        texts, prompts, layers = list(batch[TEXT]), list(batch[PROMPT]), [int(x) for x in batch[LAYERS]]
        out = np.zeros((len(texts), self.embedder.dimension), dtype=np.float32)
        groups: dict[tuple[str, int], list[int]] = {}
        for i, key in enumerate(zip(prompts, layers)):
            groups.setdefault(key, []).append(i)
        for (prompt, depth), rows in groups.items():
            out[rows] = self.embedder.encode([str(texts[i]) for i in rows], prompt=str(prompt),
                                             layers=None if depth == FULL_DEPTH else depth)
        return {IDX: batch[IDX], EMBEDDING: out}


def _flatten(requests: list[EmbedRequest]) -> dict[str, list]:
    cols: dict[str, list] = {IDX: [], TEXT: [], PROMPT: [], LAYERS: []}
    for req in requests:
        for t in req.texts:
            cols[IDX].append(len(cols[IDX]))
            cols[TEXT].append(t)
            cols[PROMPT].append(req.prompt)
            cols[LAYERS].append(FULL_DEPTH if req.layers is None else req.layers)
    return cols


def _split(requests: list[EmbedRequest], emb: np.ndarray) -> list[np.ndarray]:
    out, start = [], 0
    for req in requests:
        out.append(emb[start:start + len(req.texts)])
        start += len(req.texts)
    return out


def embed_ray(requests: list[EmbedRequest], embedder_config: dict[str, Any], actors: int,
              batch_size: int) -> list[np.ndarray]:
    """Encode every request in one Ray Data job over an actor pool of ``GroupedEmbedder``."""
    import pyarrow as pa
    import ray

    cols = _flatten(requests)
    n = len(cols[IDX])
    blocks = max(2 * actors, min(n // max(batch_size, 1), 64), 1)
    ds = ray.data.from_arrow(pa.table(cols)).repartition(blocks)
    ds = ds.map_batches(
        GroupedEmbedder,
        fn_constructor_kwargs={"config": embedder_config},
        compute=ray.data.ActorPoolStrategy(size=actors),
        batch_size=batch_size,
        num_cpus=embedder_config.get("num_cpus", 1),
        num_gpus=embedder_config.get("num_gpus", 0),
    )
    idx_parts, emb_parts = [], []
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        idx_parts.append(np.asarray(batch[IDX]))
        emb_parts.append(np.stack(batch[EMBEDDING]) if batch[EMBEDDING].dtype == object else batch[EMBEDDING])
    idx = np.concatenate(idx_parts)
    emb = np.concatenate(emb_parts).astype(np.float32)
    if len(idx) != n:
        raise RuntimeError(f"Ray Data returned {len(idx)} embeddings for {n} texts")
    ordered = np.empty_like(emb)
    ordered[idx] = emb
    return _split(requests, ordered)


def embed_local(requests: list[EmbedRequest], embedder: Any) -> list[np.ndarray]:
    """Encode in this process with an ``actors.embedder.Embedder``."""
    return [embedder.encode(list(r.texts), prompt=r.prompt, layers=r.layers) for r in requests]


@dataclass
class EmbedStats:
    requests: int = 0
    cache_hits: int = 0
    texts_encoded: int = 0
    mode: str = "none"
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "cache_hits": self.cache_hits, "texts_encoded": self.texts_encoded,
                "mode": self.mode, "seconds": round(self.seconds, 2)}


def embed_requests(requests: list[EmbedRequest], cache: EmbeddingCache, mode: str, local_max_texts: int,
                   local_embedder: Any, ray_embed: Any) -> tuple[list[np.ndarray], EmbedStats]:
    """Serve ``requests`` from ``cache``, encode the misses (locally or via ``ray_embed``), fill the cache.

    ``local_embedder`` is a zero-argument callable returning an Embedder (created only if needed);
    ``ray_embed(requests) -> list[np.ndarray]`` runs the Ray path.
    """
    stats = EmbedStats(requests=len(requests))
    results: list[np.ndarray | None] = [cache.get(r) for r in requests]
    stats.cache_hits = sum(r is not None for r in results)
    missing = [i for i, r in enumerate(results) if r is None]
    if missing:
        todo = [requests[i] for i in missing]
        stats.texts_encoded = sum(len(r.texts) for r in todo)
        use_ray = mode == "ray" or (mode == "auto" and stats.texts_encoded > local_max_texts)
        stats.mode = "ray" if use_ray else "local"
        start = time.perf_counter()
        fresh = ray_embed(todo) if use_ray else embed_local(todo, local_embedder())
        stats.seconds = time.perf_counter() - start
        log.info("encoded %d texts (%d requests) %s in %.1fs", stats.texts_encoded, len(todo), stats.mode,
                 stats.seconds)
        for i, emb in zip(missing, fresh):
            cache.put(requests[i], emb)
            results[i] = emb
    return [r for r in results if r is not None], stats
