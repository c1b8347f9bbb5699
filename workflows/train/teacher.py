"""Parallel rows for multilingual distillation, and the teacher's embeddings of their sources.

:func:`parallel_pairs` melts a table's (source column, translation column) pairs into one row per
distinct ``(source_sentence, translation)``; a synthesize output carries the English original of
each translated column as ``source_<column>`` (``source_sentence1`` beside ``sentence1``, ...), so
its pairs are found without configuration. Pure pyarrow.

:func:`teacher_embeddings` embeds the distinct source sentences once with the teacher on Ray Data
(an actor pool of ``actors.embedder.Embedder``, through ``workflows.evaluate.embed.embed_ray``) and
stores them as a committed output::

    <store>/<key>/teacher.parquet     source_sentence: string, teacher_embedding: list<float32>
    <store>/<key>/_MANIFEST.json      teacher, its fingerprint, sentence count and hash, dims

``key`` hashes the teacher's weights (``model_fingerprint``), its max sequence length and the
sentences, so a rerun on the same data and teacher reads the stored embeddings instead of
encoding again, and a changed teacher or changed data gets a new key. The teacher embeds exactly
as the training loop embeds the student's inputs (no prompt, the model's own modules, e.g. its
Normalize, and no extra normalization), so a teacher equal to the base model gives zero loss on the
sources at step 0.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import numpy as np
import pyarrow as pa

from embedforge import storage
from embedforge.errors import InputError
from workflows.train.losses import SOURCE_SENTENCE, TEACHER_EMBEDDING, TRANSLATION

log = logging.getLogger(__name__)

SOURCE_PREFIX = "source_"
TEACHER_FILE = "teacher.parquet"
STORE_DIR = "teacher_embeddings"


def column_pairs(columns: list[str], pairs: list[list[str]] | None, label: str) -> list[tuple[str, str]]:
    """The configured pairs, checked against ``columns``; or every ``source_<c>`` / ``<c>`` pair found."""
    if pairs is None:
        found = [(c, c[len(SOURCE_PREFIX):]) for c in columns
                 if c.startswith(SOURCE_PREFIX) and c[len(SOURCE_PREFIX):] in columns]
        if not found:
            raise InputError(f"dataset {label} (objective multilingual_distill): no parallel columns found: "
                             f"expected source_<c> beside <c> (as a synthesize output has), received columns "
                             f"{columns}; set objective.pairs: [[source column, translation column], ...]")
        return found
    missing = sorted({c for pair in pairs for c in pair} - set(columns))
    if missing:
        raise InputError(f"dataset {label} (objective multilingual_distill): objective.pairs names missing "
                         f"columns {missing}; received columns {columns}")
    return [(s, t) for s, t in pairs]


def parallel_pairs(table: pa.Table, pairs: list[list[str]] | None, label: str) -> tuple[pa.Table, dict[str, Any]]:
    """One row per distinct (source_sentence, translation) over all column pairs.

    A pair whose source and translation are both null does not apply to that row (a synthesize
    output mixes scored pairs and NLI triplets, each with its own columns) and is skipped; one null
    side is an error naming the column.
    """
    chosen = column_pairs(table.column_names, pairs, label)
    sources: list[str] = []
    translations: list[str] = []
    for s, t in chosen:
        src, tgt = table.column(s).to_pylist(), table.column(t).to_pylist()
        for name, values, other in ((s, src, tgt), (t, tgt, src)):
            half = sum(a is None and b is not None for a, b in zip(values, other))
            if half:
                raise InputError(f"dataset {label}: column {name!r} is null in {half} rows where {other is tgt and t or s!r} "
                                 "is not; filter them out or quarantine them upstream")
        kept = [(a, b) for a, b in zip(src, tgt) if a is not None]
        sources += [a for a, _ in kept]
        translations += [b for _, b in kept]
    seen: dict[tuple[str, str], None] = dict.fromkeys(zip(sources, translations))
    out = pa.table({SOURCE_SENTENCE: [p[0] for p in seen], TRANSLATION: [p[1] for p in seen]})
    info = {"pairs": [list(p) for p in chosen], "parallel_rows": out.num_rows,
            "duplicates_merged": len(sources) - out.num_rows}
    return out, info


def _texts_sha(texts: list[str]) -> str:
    return hashlib.sha256("\x00".join(texts).encode()).hexdigest()


def store_key(fingerprint: str, max_seq_length: int | None, texts: list[str]) -> str:
    blob = json.dumps([fingerprint, max_seq_length, _texts_sha(texts), len(texts)])
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def default_store(data_uri: str | None, train_output: str) -> str:
    """Beside a committed input (``<data>/teacher_embeddings``), else under the training run's output."""
    return storage.join(data_uri if data_uri else train_output, STORE_DIR)


def embed_on_ray(texts: list[str], teacher_path: str, max_seq_length: int | None, batch_size: int,
                 actors: int, cpus: float, use_gpu: bool) -> np.ndarray:
    """The teacher's embeddings of ``texts`` (float32 [n, D]) from one Ray Data job over an actor pool."""
    from workflows.evaluate.embed import EmbedRequest, embed_ray

    # float32 targets on every machine (dtype auto would round them to bf16 where bf16 is native)
    embedder = {"model": teacher_path, "batch_size": batch_size, "normalize": False, "dtype": "float32",
                "max_seq_length": max_seq_length, "num_cpus": cpus, "torch_threads": max(1, int(cpus)),
                "num_gpus": 1 if use_gpu else 0, "device": "cuda" if use_gpu else "cpu"}
    # prompt "" (not None): the student trains on unprompted text, so the teacher embeds it the same way
    request = EmbedRequest("teacher", tuple(texts), prompt="")
    return embed_ray([request], embedder, actors=actors, batch_size=batch_size)[0]


def teacher_embeddings(sources: list[str], teacher: str, store: str, max_seq_length: int | None,
                       batch_size: int, actors: int, cpus: float, use_gpu: bool,
                       embed=embed_on_ray) -> tuple[np.ndarray, dict[str, Any]]:
    """Embeddings of the distinct ``sources`` by ``teacher`` (row i for ``sources[i]``) and the store's manifest.

    Reads ``<store>/<key>`` when committed; otherwise embeds (``embed``, default Ray Data) and commits it.
    """
    from embedforge.models import resolve_model
    from workflows.evaluate.embed import model_fingerprint

    teacher_path = resolve_model(teacher)
    fingerprint = model_fingerprint(teacher_path)
    key = store_key(fingerprint, max_seq_length, sources)
    prefix = storage.join(store, key)
    if storage.is_committed(prefix):
        manifest = storage.read_manifest(prefix)
        table = storage.read_committed_table(prefix)
        if table.column(SOURCE_SENTENCE).to_pylist() == sources:
            log.info("teacher %s: %d stored embeddings reused from %s", teacher, len(sources), prefix)
            return np.asarray(table.column(TEACHER_EMBEDDING).to_pylist(), dtype=np.float32), {
                **manifest, "uri": prefix, "reused": True}
        log.warning("teacher store %s holds other sentences than its key says; embedding again", prefix)
    emb = np.asarray(embed(sources, teacher_path, max_seq_length, batch_size, actors, cpus, use_gpu),
                     dtype=np.float32)
    if emb.shape[0] != len(sources) or not np.isfinite(emb).all():
        raise InputError(f"teacher {teacher}: expected {len(sources)} finite embeddings, got shape {emb.shape}")
    dims = int(emb.shape[1])
    table = pa.table({SOURCE_SENTENCE: sources,
                      TEACHER_EMBEDDING: pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), dims)})
    storage.write_parquet(storage.join(prefix, TEACHER_FILE), table)
    manifest = storage.commit(prefix, {
        "kind": "teacher_embeddings", "teacher": teacher, "teacher_path": teacher_path, "fingerprint": fingerprint,
        "max_seq_length": max_seq_length, "rows": len(sources), "dims": dims,
        "sources_sha256": _texts_sha(sources), "files": [TEACHER_FILE]})
    log.info("teacher %s: embedded %d source sentences (%d dims) into %s", teacher, len(sources), dims, prefix)
    return emb, {**manifest, "uri": prefix, "reused": False}


def distillation_table(table: pa.Table, objective: Any, label: str, teacher: str, store: str,
                       max_seq_length: int | None, actors: int, cpus: float, use_gpu: bool,
                       embed=embed_on_ray) -> tuple[pa.Table, dict[str, Any]]:
    """``source_sentence, translation, teacher_embedding`` rows for ``objective``, and what was done."""
    pairs, info = parallel_pairs(table, objective.pairs, label)
    if pairs.num_rows == 0:
        raise InputError(f"dataset {label}: it is empty; check its source, split, filters or limit")
    sources = list(dict.fromkeys(pairs.column(SOURCE_SENTENCE).to_pylist()))
    emb, manifest = teacher_embeddings(sources, teacher, store, max_seq_length, objective.teacher_batch_size,
                                       actors, cpus, use_gpu, embed=embed)
    index = {s: i for i, s in enumerate(sources)}
    rows = np.fromiter((index[s] for s in pairs.column(SOURCE_SENTENCE).to_pylist()), dtype=np.int64,
                       count=pairs.num_rows)
    picked = emb[rows]
    column = pa.FixedSizeListArray.from_arrays(pa.array(picked.reshape(-1)), picked.shape[1])
    info = {**info, "teacher": {k: manifest.get(k) for k in ("teacher", "fingerprint", "uri", "rows", "dims",
                                                             "reused")}}
    return pairs.append_column(TEACHER_EMBEDDING, column), info
