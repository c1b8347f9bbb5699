"""Hard-negative mining: embed queries and passages with an embedder actor pool, search with faiss.

Stage contract: queries (``qid, text``), a corpus (``doc_id, text``) and the known positives
(``qid -> {doc_id}``) in; one row per kept candidate out: ``qid, doc_id, rank, similarity``.
Known positives are never returned. With ``false_negative_margin = m`` a candidate is also dropped
when its similarity exceeds ``min(sim(q, positives)) - m`` (NV-Retriever's "TopK-MarginPos":
passages that look at least as relevant as the gold one are likely unlabeled positives).

Embedding runs in Ray Data (``map_batches(Embedder, compute=ActorPoolStrategy)``); the search
runs on the driver with an exact ``faiss.IndexFlatIP`` over normalized embeddings (cosine),
which is right for corpora up to a few hundred thousand passages.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import polars as pl

from actors.embedder import EMBEDDING_COLUMN, TEXT_COLUMN, Embedder
from embedforge.errors import InputError
from embedforge.schemas import DOC_ID, QID
from workflows.reward.config import MiningConfig

log = logging.getLogger(__name__)

RANK, SIMILARITY = "rank", "similarity"
_ROLE, _KEY = "_role", "_key"


def embed_texts(texts: Sequence[str], keys: Sequence[str], roles: Sequence[str], config: MiningConfig) -> dict:
    """Embed ``texts`` through a Ray Data embedder actor pool; returns ``{(role, key): vector}``."""
    import ray

    emb_cfg = config.embedder
    ds = ray.data.from_items(
        [{TEXT_COLUMN: t, _KEY: k, _ROLE: r} for t, k, r in zip(texts, keys, roles)],
        override_num_blocks=max(1, min(len(texts) // max(1, config.batch_size), 4 * config.num_actors)),
    )
    ds = ds.map_batches(
        Embedder,
        fn_constructor_kwargs={"config": emb_cfg},
        compute=ray.data.ActorPoolStrategy(size=config.num_actors),
        batch_size=config.batch_size,
        num_cpus=emb_cfg.num_cpus,
        num_gpus=emb_cfg.num_gpus,
    )
    out = {}
    for batch in ds.iter_batches(batch_size=1024, batch_format="numpy"):
        for key, role, vec in zip(batch[_KEY], batch[_ROLE], batch[EMBEDDING_COLUMN]):
            out[(str(role), str(key))] = np.asarray(vec, dtype=np.float32)
    return out


def select_candidates(
    scores: np.ndarray,
    indices: np.ndarray,
    qids: Sequence[str],
    doc_ids: Sequence[str],
    positives: Mapping[str, set[str]],
    top_k: int,
    positive_similarity: Mapping[str, float] | None = None,
    margin: float | None = None,
) -> pl.DataFrame:
    """Pure selection from a search result ``(scores, indices)`` of shape [queries, depth].

    Keeps, per query, the first ``top_k`` hits that are not positives (and, with ``margin``, not
    above the positive's similarity minus the margin). Rank starts at 1 among kept candidates.
    """
    rows: list[tuple[str, str, int, float]] = []
    for qi, qid in enumerate(qids):
        pos = positives.get(qid, set())
        limit = None
        if margin is not None and positive_similarity is not None and qid in positive_similarity:
            limit = positive_similarity[qid] - margin
        kept = 0
        for s, j in zip(scores[qi], indices[qi]):
            if j < 0 or kept >= top_k:
                continue
            doc = doc_ids[j]
            if doc in pos or (limit is not None and s > limit):
                continue
            kept += 1
            rows.append((qid, doc, kept, float(s)))
    return pl.DataFrame(rows, schema={QID: pl.String, DOC_ID: pl.String, RANK: pl.Int32, SIMILARITY: pl.Float32},
                        orient="row")


def mine_hard_negatives(
    queries: pl.DataFrame,
    corpus: pl.DataFrame,
    positives: Mapping[str, set[str]],
    config: MiningConfig,
) -> tuple[pl.DataFrame, dict[str, float]]:
    """Top-k hard negatives per query, and each query's lowest positive similarity."""
    import faiss

    for name, df, cols in (("queries", queries, [QID, TEXT_COLUMN]), ("corpus", corpus, [DOC_ID, TEXT_COLUMN])):
        missing = [c for c in cols if c not in df.columns]
        if missing:
            raise InputError(f"mining {name}: missing columns {missing}; received columns {df.columns}")
    if corpus.height == 0 or queries.height == 0:
        raise InputError(f"mining needs queries and passages; got {queries.height} queries, {corpus.height} passages")
    qids, q_texts = queries[QID].to_list(), queries[TEXT_COLUMN].to_list()
    doc_ids, d_texts = corpus[DOC_ID].to_list(), corpus[TEXT_COLUMN].to_list()
    vectors = embed_texts(
        [config.query_prompt + t for t in q_texts] + [config.passage_prompt + t for t in d_texts],
        qids + doc_ids, ["q"] * len(qids) + ["d"] * len(doc_ids), config,
    )
    q = np.stack([vectors[("q", k)] for k in qids])
    d = np.stack([vectors[("d", k)] for k in doc_ids])
    faiss.normalize_L2(q)
    faiss.normalize_L2(d)
    index = faiss.IndexFlatIP(d.shape[1])
    index.add(d)
    most_positives = max((len(positives.get(k, ())) for k in qids), default=0)
    depth = min(len(doc_ids), config.top_k + most_positives + 64)
    scores, indices = index.search(q, depth)
    row_of = {k: i for i, k in enumerate(doc_ids)}
    pos_sim = {}
    for qi, qid in enumerate(qids):
        rows = [row_of[p] for p in positives.get(qid, ()) if p in row_of]
        if rows:
            pos_sim[qid] = float(min(q[qi] @ d[r] for r in rows))
    picked = select_candidates(scores, indices, qids, doc_ids, positives, config.top_k, pos_sim,
                               config.false_negative_margin)
    log.info("mined %d hard negatives for %d queries over %d passages", picked.height, len(qids), len(doc_ids))
    return picked, pos_sim
