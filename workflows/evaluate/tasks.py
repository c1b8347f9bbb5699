"""Evaluation tasks: dataset -> texts to embed -> metrics, with sentence-transformers' evaluators.

Each dataset becomes an :class:`EvalItem`: the unique texts of each role ("text" for STS and
bitext, "query"/"document" for retrieval), the prompt role of each, and an evaluator. Metrics
are computed by sentence-transformers' own evaluators (EmbeddingSimilarityEvaluator,
TranslationEvaluator, InformationRetrievalEvaluator) so formulas, tie handling and metric names
are theirs. Those evaluators call ``model.encode``/``encode_query``/``encode_document``; they
are given a :class:`CachedEmbeddingModel` that serves the embeddings our embedding step
computed (on Ray Data, cached), truncated to the grid cell's width. All metrics are x 100.

Main metric per dataset: STS Spearman of cosine; Tatoeba mean accuracy of both directions;
Cranfield nDCG@10 (binary relevance: judgement codes 1-4 are relevant); XQuAD MRR@10.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import polars as pl

from embedforge import schemas as S
from embedforge.data import DatasetSpec, load_dataset, relevant_docs
from embedforge.elastic import truncate_dims
from embedforge.errors import InputError
from workflows.evaluate.config import BitextTask, RetrievalCollection, RetrievalTask, STSDataset, STSTask
from workflows.evaluate.embed import EmbedRequest

log = logging.getLogger(__name__)

SYMMETRIC, QUERY, DOCUMENT = "symmetric", "query", "document"


class _NoModelCard:
    """Evaluators record metrics on ``model.model_card_data``; an evaluation report has no model card."""

    def set_evaluation_metrics(self, *args: Any, **kwargs: Any) -> None:
        return None


class CachedEmbeddingModel:
    """Stands in for a SentenceTransformer inside ST evaluators: returns precomputed embeddings.

    ``roles`` maps a role ("text", "query", "document") to ``(texts, embeddings)``; ``encode``
    serves role "text", ``encode_query``/``encode_document`` their roles. Prompts were applied
    when the embeddings were computed, so a prompt passed here is an error, not ignored.
    """

    similarity_fn_name = "cosine"

    def __init__(self, roles: dict[str, tuple[Sequence[str], np.ndarray]], dims: int | None = None):
        self.model_card_data = _NoModelCard()
        self._rows: dict[str, tuple[dict[str, int], np.ndarray]] = {}
        for role, (texts, emb) in roles.items():
            if len(texts) != emb.shape[0]:
                raise ValueError(f"role {role!r}: {len(texts)} texts but {emb.shape[0]} embeddings")
            self._rows[role] = ({t: i for i, t in enumerate(texts)}, truncate_dims(emb, dims, normalize=True))

    def similarity(self, a: Any, b: Any) -> Any:
        from sentence_transformers.util import cos_sim

        return cos_sim(a, b)

    def _lookup(self, role: str, sentences: Sequence[str] | str, prompt: str | None = None,
                prompt_name: str | None = None, convert_to_tensor: bool = False, convert_to_numpy: bool = True,
                **_: Any) -> Any:
        if prompt or prompt_name:
            raise ValueError("CachedEmbeddingModel serves embeddings computed with their prompts already; "
                             f"got prompt={prompt!r} prompt_name={prompt_name!r}")
        index, emb = self._rows[role]
        single = isinstance(sentences, str)
        texts = [sentences] if single else list(sentences)
        try:
            out = emb[[index[t] for t in texts]]
        except KeyError as e:
            raise KeyError(f"role {role!r}: no embedding for text {e.args[0][:80]!r}") from None
        if convert_to_tensor or not convert_to_numpy:
            import torch

            tensor = torch.from_numpy(np.ascontiguousarray(out))
            if convert_to_tensor:
                return tensor[0] if single else tensor
            return list(tensor)
        return out[0] if single else out

    def encode(self, sentences: Sequence[str] | str, **kwargs: Any) -> Any:
        return self._lookup("text", sentences, **kwargs)

    def encode_query(self, sentences: Sequence[str] | str, **kwargs: Any) -> Any:
        return self._lookup("query", sentences, **kwargs)

    def encode_document(self, sentences: Sequence[str] | str, **kwargs: Any) -> Any:
        return self._lookup("document", sentences, **kwargs)


@dataclass
class EvalItem:
    """One dataset of one task: texts per role, prompt role per role, and how to score it."""

    task: str
    name: str                                   # e.g. "stsb:en", "tatoeba:de", "xquad:de-en"
    texts: dict[str, tuple[str, ...]]           # role -> unique texts
    prompt_roles: dict[str, str]                # role -> SYMMETRIC / QUERY / DOCUMENT
    main: str                                   # the main metric's name
    score: Callable[[CachedEmbeddingModel], dict[str, float]]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.task}/{self.name}"

    def requests(self, prompts: dict[str, str], layers: int | None, data_key: str) -> dict[str, EmbedRequest]:
        return {role: EmbedRequest(f"{data_key}/{self.key}/{role}", texts, prompts[self.prompt_roles[role]], layers)
                for role, texts in self.texts.items()}

    def evaluate(self, embeddings: dict[str, np.ndarray], dims: int | None) -> dict[str, float]:
        model = CachedEmbeddingModel({r: (self.texts[r], embeddings[r]) for r in self.texts}, dims)
        return {k: round(float(v) * 100.0, 4) for k, v in self.score(model).items()}


def _unprefix(metrics: dict[str, float], name: str) -> dict[str, float]:
    return {k[len(name) + 1:] if k.startswith(name + "_") else k: v for k, v in metrics.items()}


def _unique(*columns: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(t for col in columns for t in col))


def _nonempty(df: pl.DataFrame, what: str) -> pl.DataFrame:
    if df.height == 0:
        raise InputError(f"{what}: the dataset is empty; check the split, language and limit")
    return df


def sts_items(task: STSTask, split: str) -> list[EvalItem]:
    from sentence_transformers.evaluation import EmbeddingSimilarityEvaluator

    items = []
    for entry in task.datasets:
        for lang in entry.langs:
            if not entry.is_named_source:
                name = f"{entry.label}:{lang}"
                df = _nonempty(load_sts_uri(entry, split), name)
                items.append(_sts_item(EmbeddingSimilarityEvaluator, name, df, entry.source))
                continue
            if entry.source == "stsb_crosslingual":
                spec = DatasetSpec(source=entry.source, split=split, lang="en", lang2=lang, limit=entry.limit)
                name = f"{entry.source}:en-{lang}"
            else:
                spec = DatasetSpec(source=entry.source, split=split, lang=lang, limit=entry.limit)
                name = f"{entry.source}:{lang}"
            df = _nonempty(load_dataset(spec), name)
            items.append(_sts_item(EmbeddingSimilarityEvaluator, name, df, entry.source))
    return items


def _sts_item(evaluator_cls: Any, name: str, df: pl.DataFrame, source: str) -> EvalItem:
    s1, s2 = df[S.SENTENCE1].to_list(), df[S.SENTENCE2].to_list()
    evaluator = evaluator_cls(s1, s2, df[S.SCORE].to_list(), name=name, write_csv=False,
                              similarity_fn_names=["cosine"])
    return EvalItem("sts", name, {"text": _unique(s1, s2)}, {"text": SYMMETRIC}, "spearman_cosine",
                    lambda m, ev=evaluator, n=name: _unprefix(ev(m), n), {"rows": df.height, "source": source})


def load_sts_uri(entry: STSDataset, split: str) -> pl.DataFrame:
    """Scored pairs of a URI: a committed output prefix (its ``data`` rows that carry a score), or a
    Parquet/JSONL file or hub dataset read with the canonical ``scored_pairs`` columns (bad rows
    counted against the spec's ``max_bad_fraction``, 0 by default, so a malformed file fails loudly)."""
    from embedforge import storage

    if storage.is_committed(entry.source):
        df = pl.from_arrow(storage.read_output(entry.source, "data"))
        S.require_columns(df.columns, [S.SENTENCE1, S.SENTENCE2, S.SCORE], f"{entry.source} (data output)")
        df = df.filter(pl.col(S.SCORE).is_not_null()).select(S.SENTENCE1, S.SENTENCE2, S.SCORE)
        return df.head(entry.limit) if entry.limit else df
    if "://" not in entry.source and not entry.source.startswith("hf:") and not storage.exists(entry.source):
        raise InputError(f"STS dataset {entry.source!r}: no such file, and not a committed output prefix")
    df = load_dataset(DatasetSpec(source=entry.source, split=split, kind="scored_pairs", limit=entry.limit))
    return df.select(S.SENTENCE1, S.SENTENCE2, S.SCORE)


def bitext_items(task: BitextTask, split: str) -> list[EvalItem]:
    from sentence_transformers.evaluation import TranslationEvaluator

    items = []
    for lang in task.langs:
        name = f"tatoeba:{lang}"
        df = _nonempty(load_dataset(DatasetSpec(source="tatoeba", split="test", lang=lang, limit=task.limit)), name)
        src, tgt = df[S.SRC].to_list(), df[S.TGT].to_list()
        evaluator = TranslationEvaluator(src, tgt, name=name, write_csv=False)
        items.append(EvalItem(
            "bitext", name, {"text": _unique(src, tgt)}, {"text": SYMMETRIC}, "mean_accuracy",
            lambda m, ev=evaluator, n=name: _unprefix(ev(m), n), {"rows": df.height}))
    for f in task.files:
        name = f.label
        df = _nonempty(load_dataset(DatasetSpec(source=f.source, split=split, kind="bitext", limit=f.limit)), name)
        src, tgt = df[S.SRC].to_list(), df[S.TGT].to_list()
        evaluator = TranslationEvaluator(src, tgt, name=name, write_csv=False)
        items.append(EvalItem(
            "bitext", name, {"text": _unique(src, tgt)}, {"text": SYMMETRIC}, "mean_accuracy",
            lambda m, ev=evaluator, n=name: _unprefix(ev(m), n), {"rows": df.height, "source": f.source}))
    return items


def collection_item(c: RetrievalCollection, split: str) -> EvalItem:
    """A retrieval collection of your own (queries, corpus, qrels URIs with the canonical columns)."""
    def read(uri: str, kind: str) -> pl.DataFrame:
        return _nonempty(load_dataset(DatasetSpec(source=uri, split=split, kind=kind)), f"{c.name} {kind}")

    queries, corpus, qrels = read(c.queries, "queries"), read(c.corpus, "corpus"), read(c.qrels, "qrels")
    if c.limit:
        queries = queries.head(c.limit)
    return _ir_item(c.name, dict(queries.select(S.QID, S.TEXT).iter_rows()),
                    dict(corpus.select(S.DOC_ID, S.TEXT).iter_rows()), relevant_docs(qrels, c.min_relevance),
                    "ndcg@10")


def _ir_item(name: str, queries: dict[str, str], corpus: dict[str, str], relevant: dict[str, set[str]],
             main: str) -> EvalItem:
    from sentence_transformers.evaluation import InformationRetrievalEvaluator
    from sentence_transformers.util import cos_sim

    evaluator = InformationRetrievalEvaluator(
        queries, corpus, relevant, name=name, write_csv=False, mrr_at_k=[10], ndcg_at_k=[10],
        accuracy_at_k=[1, 10], precision_recall_at_k=[10, 100], map_at_k=[100],
        score_functions={"cosine": cos_sim}, main_score_function="cosine")
    if not evaluator.queries:
        raise InputError(f"{name}: no query has a relevant document; check the split and limit")
    keep = ("cosine_ndcg@10", "cosine_mrr@10", "cosine_recall@10", "cosine_recall@100", "cosine_accuracy@1",
            "cosine_map@100")

    def score(model: CachedEmbeddingModel) -> dict[str, float]:
        metrics = _unprefix(evaluator(model), name)
        return {k.removeprefix("cosine_"): metrics[k] for k in keep}

    return EvalItem("retrieval", name, {"query": _unique(evaluator.queries), "document": _unique(evaluator.corpus)},
                    {"query": QUERY, "document": DOCUMENT}, main, score,
                    {"queries": len(evaluator.queries), "documents": len(evaluator.corpus)})


def cranfield_item(limit: int | None) -> EvalItem:
    data = load_dataset(DatasetSpec(source="cranfield", split="test", limit=limit))
    queries = dict(data.queries.select(S.QID, S.TEXT).iter_rows())
    corpus = dict(data.corpus.select(S.DOC_ID, S.TEXT).iter_rows())
    return _ir_item("cranfield", queries, corpus, relevant_docs(data.qrels), "ndcg@10")


def xquad_item(question_lang: str, context_lang: str, split: str, limit: int | None) -> EvalItem:
    """Questions of the split's articles against every paragraph of those articles."""
    xquad_split = "test" if split == "test" else "train"  # XQuAD's non-test articles serve as dev
    name = f"xquad:{question_lang}" if question_lang == context_lang else f"xquad:{question_lang}-{context_lang}"
    df = _nonempty(load_dataset(DatasetSpec(source="xquad", split=xquad_split, lang=question_lang,
                                            lang2=context_lang)), name)
    contexts = _unique(df[S.CONTEXT].to_list())
    doc_ids = {c: f"p{i}" for i, c in enumerate(contexts)}
    rows = df.head(limit) if limit else df
    queries = dict(rows.select(S.QID, S.QUESTION).iter_rows())
    relevant = {qid: {doc_ids[c]} for qid, c in rows.select(S.QID, S.CONTEXT).iter_rows()}
    return _ir_item(name, queries, {d: c for c, d in doc_ids.items()}, relevant, "mrr@10")


def retrieval_items(task: RetrievalTask, split: str) -> list[EvalItem]:
    items = [cranfield_item(task.limit)] if task.cranfield else []
    items += [xquad_item(lang, lang, split, task.limit) for lang in task.xquad_langs]
    items += [xquad_item(lang, "en", split, task.limit) for lang in task.xquad_crosslingual]
    items += [collection_item(c, split) for c in task.collections]
    return items


def build_items(tasks: Sequence[STSTask | BitextTask | RetrievalTask], split: str) -> list[EvalItem]:
    """Load every dataset of every task (fails early, before any model work, on missing data)."""
    items: list[EvalItem] = []
    for task in tasks:
        if isinstance(task, STSTask):
            items += sts_items(task, split)
        elif isinstance(task, BitextTask):
            items += bitext_items(task, split)
        else:
            items += retrieval_items(task, split)
    return items


def resolve_prompts(model_prompts: dict[str, str], symmetric: str | None, query: str | None,
                    document: Sequence[str]) -> dict[str, str]:
    """Prefix text per prompt role from the model's own prompts; a name it lacks means no prefix."""
    doc = next((model_prompts[n] for n in document if n in model_prompts), "")
    return {SYMMETRIC: model_prompts.get(symmetric, "") if symmetric else "",
            QUERY: model_prompts.get(query, "") if query else "", DOCUMENT: doc}


def at_depth(requests: dict[str, EmbedRequest], layers: int | None) -> dict[str, EmbedRequest]:
    return {role: replace(r, layers=layers) for role, r in requests.items()}
