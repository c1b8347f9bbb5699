"""``EvaluateConfig``: which model, which tasks on which split, the 2DMSE grid, the gate, where to write.

Example (``configs/evaluate.yaml``)::

    model: all-minilm-l6-v2
    split: test
    tasks:
      - kind: sts
        datasets: [{source: stsb}, {source: stsb_multi_mt, langs: [de]}]
      - kind: bitext
        langs: [de]
    output: outputs/evaluate/minilm

``split: dev`` is for choices (checkpoints, grid cells); ``split: test`` gives final numbers.
Tatoeba and Cranfield exist only as test sets, so they refuse ``split: dev``.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from embedforge.config import StrictModel
from embedforge.data.spec import HUB_PREFIX, is_uri
from embedforge.runtime import RayConfig

STS_SOURCES = ("stsb", "stsb_multi_mt", "sick", "stsb_crosslingual")


class STSDataset(StrictModel):
    """One STS source, expanded to one dataset per language; or one scored-pairs file of your own."""

    source: str = Field(
        description="stsb (en), stsb_multi_mt (11 languages), sick (SICK-R, en), stsb_crosslingual "
                    "(sentence1 in English, sentence2 in each of `langs`); or a dataset URI with the canonical "
                    "scored_pairs columns (sentence1, sentence2, score): a Parquet/JSONL file (local, file://, "
                    "s3://), hf:org/name[:config], or a committed output prefix (its `data` rows with a score)")
    langs: list[str] = Field(["en"], min_length=1,
                             description="languages; for stsb_crosslingual the language of sentence2; for a URI "
                                         "the one language its pairs are in (a label in the report)")
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][\w.-]*$",
                             description="a URI's name in the report (<name>:<lang>); default: the file's stem")
    limit: int | None = Field(None, gt=0, description="first N pairs of each dataset (smoke runs)")

    @property
    def is_named_source(self) -> bool:
        return self.source in STS_SOURCES

    @property
    def label(self) -> str:
        """The dataset's name in metric keys: the source, a URI's ``name``, or the URI's last path part."""
        if self.is_named_source:
            return self.source
        if self.name:
            return self.name
        return _stem(self.source)

    @field_validator("source")
    @classmethod
    def _source(cls, source: str) -> str:
        if source in STS_SOURCES or is_uri(source) or source.startswith(HUB_PREFIX) or "/" in source:
            return source
        raise ValueError(f"use one of {', '.join(STS_SOURCES)} or a dataset URI (.parquet/.jsonl path, file://, "
                         "s3://, hf:org/name, or a committed output prefix)")

    @model_validator(mode="after")
    def _check(self) -> STSDataset:
        if self.is_named_source:
            if self.name is not None:
                raise ValueError(f"name: only for URIs; {self.source!r} is named by its source")
            return self
        if len(self.langs) != 1:
            raise ValueError(f"langs {self.langs}: a URI holds pairs of one language; give exactly one")
        return self


class STSTask(StrictModel):
    """Semantic textual similarity: Spearman of cosine x 100 (EmbeddingSimilarityEvaluator)."""

    kind: Literal["sts"] = "sts"
    datasets: list[STSDataset] = Field(default_factory=lambda: [STSDataset(source="stsb")], min_length=1,
                                       description="STS sources (or URIs) and their languages")

    @model_validator(mode="after")
    def _unique_names(self) -> STSTask:
        names = [f"{d.label}:{lang}" for d in self.datasets for lang in d.langs]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"datasets: {', '.join(repeated)} appear twice; give URIs distinct `name`s")
        return self


def _uri_source(source: str, what: str) -> str:
    if is_uri(source) or source.startswith(HUB_PREFIX) or "/" in source:
        return source
    raise ValueError(f"{what} {source!r}: use a dataset URI (.parquet/.jsonl path, file://, s3://, hf:org/name)")


def _stem(uri: str) -> str:
    stem = uri.rstrip("/").rsplit("/", 1)[-1].split(":")[-1]
    return re.sub(r"\.(parquet|jsonl|json)$", "", stem) or "data"


class BitextFile(StrictModel):
    """A bitext file of your own with the canonical columns (src, tgt, src_lang, tgt_lang)."""

    source: str = Field(description="Parquet/JSONL URI (local, file://, s3://) or hf:org/name, kind bitext")
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][\w.-]*$",
                             description="its name in the report; default: the file's stem")
    limit: int | None = Field(None, gt=0, description="first N sentence pairs")

    @field_validator("source")
    @classmethod
    def _uri(cls, v: str) -> str:
        return _uri_source(v, "source")

    @property
    def label(self) -> str:
        return self.name or _stem(self.source)


class BitextTask(StrictModel):
    """Bitext mining (X <-> English on Tatoeba, or your files): accuracy x 100 in both directions
    (TranslationEvaluator)."""

    kind: Literal["bitext"] = "bitext"
    langs: list[str] = Field(["de"], description="Tatoeba languages (ISO 639-1 or 639-3); [] with only `files`")
    files: list[BitextFile] = Field([], description="bitext files of your own (canonical bitext columns)")
    limit: int | None = Field(None, gt=0, description="first N sentence pairs per Tatoeba language")

    @model_validator(mode="after")
    def _something(self) -> BitextTask:
        if not self.langs and not self.files:
            raise ValueError("bitext: set langs (Tatoeba) or files")
        labels = [f.label for f in self.files]
        if len(set(labels)) != len(labels):
            raise ValueError(f"bitext.files: names {labels} repeat; give each file a distinct `name`")
        return self


class RetrievalCollection(StrictModel):
    """A retrieval collection of your own: queries (qid, text), corpus (doc_id, text), qrels (qid, doc_id,
    relevance), each a Parquet/JSONL URI; judgements with relevance >= min_relevance count as relevant."""

    name: str = Field(pattern=r"^[A-Za-z0-9][\w.-]*$", description="its name in the report")
    queries: str = Field(description="URI of the queries (qid, text)")
    corpus: str = Field(description="URI of the corpus (doc_id, text)")
    qrels: str = Field(description="URI of the judgements (qid, doc_id, relevance)")
    min_relevance: float = Field(1.0, description="smallest relevance that counts as relevant")
    limit: int | None = Field(None, gt=0, description="first N queries (the corpus stays whole)")

    @field_validator("queries", "corpus", "qrels")
    @classmethod
    def _uris(cls, v: str) -> str:
        return _uri_source(v, "retrieval collection file")


class RetrievalTask(StrictModel):
    """Retrieval with InformationRetrievalEvaluator: Cranfield (nDCG@10) and XQuAD question -> paragraph (MRR@10)."""

    kind: Literal["retrieval"] = "retrieval"
    cranfield: bool = Field(True, description="evaluate Cranfield (test collection only)")
    xquad_langs: list[str] = Field(["en"], description="XQuAD monolingual: questions and paragraphs in each language")
    xquad_crosslingual: list[str] = Field(
        [], description="XQuAD cross-lingual: questions in each language, paragraphs in English")
    collections: list[RetrievalCollection] = Field([], description="retrieval collections of your own (nDCG@10)")
    limit: int | None = Field(None, gt=0, description="first N queries per dataset (the corpus stays whole)")

    @model_validator(mode="after")
    def _names(self) -> RetrievalTask:
        names = [c.name for c in self.collections]
        taken = (["cranfield"] if self.cranfield else []) + [n for n in names if n.startswith("xquad")]
        if len(set(names)) != len(names) or set(names) & set(taken):
            raise ValueError(f"retrieval.collections: names {names} must be distinct, not 'cranfield' (with "
                             "cranfield: true) and not start with 'xquad'")
        return self


Task = Annotated[STSTask | BitextTask | RetrievalTask, Field(discriminator="kind")]


class GridConfig(StrictModel):
    """The 2DMSE grid: every task metric for each (layers, dims) cell, plus encode throughput."""

    layers: list[int] | None = Field(None, description="layer counts (early exit); None: the model's recorded grid, "
                                                       "else only the full depth")
    dims: list[int] | None = Field(None, description="Matryoshka dimensions; None: the model's recorded grid, "
                                                     "else only the full width")
    from_model: bool = Field(True, description="fill unset axes from the model's elastic_grid.json when it has one")
    throughput_sentences: int = Field(256, ge=8, description="sentences timed per cell for throughput")

    @model_validator(mode="after")
    def _positive(self) -> GridConfig:
        for name in ("layers", "dims"):
            values = getattr(self, name) or []
            if any(v < 1 for v in values):
                raise ValueError(f"grid.{name} = {values}: every entry must be >= 1")
        return self


class PromptConfig(StrictModel):
    """Which of the model's own prompts (config_sentence_transformers.json ``prompts``) each text role uses.

    A name the model does not define means no prefix (e.g. all-MiniLM-L6-v2 has no prompts).
    """

    symmetric: str | None = Field("query", description="prompt name for STS and bitext (e5: 'query: ' both sides)")
    query: str | None = Field("query", description="prompt name for retrieval queries")
    document: list[str] = Field(["passage", "document"], description="prompt names tried in order for documents")


class EmbedConfig(StrictModel):
    """How embeddings are computed: an actor pool on Ray Data, or in-process for small jobs."""

    mode: Literal["auto", "ray", "local"] = Field(
        "auto", description="ray: map_batches over an Embedder actor pool; local: in this process; "
                            "auto: local when the uncached texts are at most local_max_texts")
    local_max_texts: int = Field(2000, ge=0, description="auto mode: largest job run in-process")
    actors: int = Field(2, ge=1, description="Embedder actors in the pool")
    batch_size: int = Field(64, ge=1, description="sentences per forward pass (and per Ray Data batch)")
    num_cpus: float = Field(1, gt=0, description="CPUs per actor")
    num_gpus: float = Field(0, ge=0, description="GPUs per actor")
    max_seq_length: int | None = Field(None, ge=8, description="truncate inputs to this many tokens; None: the model's")
    cache_dir: str | None = Field(".cache/embeddings", description="embedding cache (local path or s3://); None: off")


class GateRule(StrictModel):
    """Promotion rule: candidate vs baseline, in metric points (x 100 scale)."""

    max_drop: float = Field(1.0, ge=0, description="reject when any task's mean falls more than this")
    max_drop_per_task: dict[Literal["sts", "bitext", "retrieval"], float] = Field(
        {}, description="per-task overrides of max_drop, e.g. {bitext: 0.5}; each key must be a configured task")
    main_metric: str = Field("mean", description="'mean' (of task means), a task name (sts), or a dataset "
                                                 "metric key (sts/stsb:en)")
    min_rise: float = Field(0.0, description="the main metric must rise at least this much (may be negative)")


class BaselineConfig(StrictModel):
    """The model currently served: evaluated in the same run, or read from an earlier report."""

    model: str | None = Field(None, description="model to evaluate with the same tasks (cache makes reruns cheap)")
    report: str | None = Field(None, description="URI of an earlier report.json (same split and tasks)")

    @model_validator(mode="after")
    def _one(self) -> BaselineConfig:
        if (self.model is None) == (self.report is None):
            raise ValueError("baseline: set exactly one of model or report")
        return self


class EvaluateConfig(StrictModel):
    """Evaluate one sentence-transformers model on STS, bitext and retrieval, over a 2DMSE grid."""

    model: str = Field(description="packaged short name, local folder, s3:// model folder or hub id")
    baseline: BaselineConfig | None = Field(None, description="baseline for deltas and the gate")
    split: Literal["dev", "test"] = Field("test", description="dev for choices, test for final numbers")
    tasks: list[Task] = Field(default_factory=lambda: [STSTask()], min_length=1, description="tasks to run")
    grid: GridConfig | None = Field(None, description="2DMSE grid; None: only the full model")
    prompts: PromptConfig = PromptConfig()
    embed: EmbedConfig = EmbedConfig()
    gate: GateRule | None = Field(None, description="promotion rule; needs a baseline")
    ray: RayConfig = RayConfig()
    output: str = Field(description="report prefix (local path or s3://): report.json, report.md, plots/")

    @model_validator(mode="after")
    def _check(self) -> EvaluateConfig:
        if self.gate is not None and self.baseline is None:
            raise ValueError("gate is set but baseline is not: the gate compares against a baseline "
                             "(set baseline.model or baseline.report)")
        kinds = [t.kind for t in self.tasks]
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"tasks: each kind at most once, got {kinds}; merge their datasets")
        if self.gate is not None:
            self._check_gate(kinds)
        if self.split == "dev":
            for t in self.tasks:
                if isinstance(t, BitextTask) and t.langs:
                    raise ValueError("split dev: tatoeba has only a test split; set bitext.langs: [] (keeping "
                                     "your own files), remove the bitext task, or use split: test")
                if isinstance(t, RetrievalTask) and t.cranfield:
                    raise ValueError("split dev: cranfield has only a test split; set cranfield: false "
                                     "or use split: test")
        return self

    def _check_gate(self, kinds: list[str]) -> None:
        """Names in the gate must be tasks (or dataset keys) this config evaluates, or they never apply."""
        gate = self.gate
        unknown = sorted(set(gate.max_drop_per_task) - set(kinds))
        if unknown:
            raise ValueError(f"gate.max_drop_per_task: {', '.join(unknown)} is not among the configured tasks "
                             f"({', '.join(kinds)}), so its limit would never apply; remove it or add the task")
        bad = [k for k, v in gate.max_drop_per_task.items() if v < 0]
        if bad:
            raise ValueError(f"gate.max_drop_per_task.{bad[0]}: a drop limit must be >= 0")
        main = gate.main_metric
        if main != "mean" and main.split("/", 1)[0] not in kinds:
            raise ValueError(f"gate.main_metric {main!r}: use 'mean', a configured task ({', '.join(kinds)}) "
                             "or a dataset key of one (e.g. sts/stsb:en)")
