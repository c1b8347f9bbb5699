"""``DatasetSpec``: which dataset, split and language a job reads, and :func:`load_dataset`.

``source`` is one of :data:`SOURCES` (the offline datasets), ``hf:org/name[:config]`` (hub, needs
``datasets``), or a Parquet/JSONL URI (local path, ``file://``, ``s3://``) whose ``kind`` says
which canonical table it holds. The split is checked per source, and test splits are final
evaluation only: training and tuning code calls :func:`forbid_test_split`.

Example::

    >>> spec = DatasetSpec(source="stsb_multi_mt", split="dev", lang="de", limit=100)
    >>> load_dataset(spec).height
    100
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import polars as pl
from pydantic import Field, model_validator

from embedforge import schemas as S
from embedforge.config import StrictModel
from embedforge.data.bitext import load_tatoeba
from embedforge.data.hub import HUB_PREFIX, load_hub
from embedforge.data.nli import XNLI_LANGS, load_nli_triplets
from embedforge.data.qa import XQUAD_LANGS, load_gsm8k, load_xquad_crosslingual
from embedforge.data.retrieval import RetrievalData, load_cranfield
from embedforge.data.sts import STSB_MULTI_MT_LANGS, load_sick_relatedness, load_stsb, load_stsb_crosslingual, \
    load_stsb_multi_mt
from embedforge.data.table import JSONL_SUFFIXES, PARQUET_SUFFIXES, LoadResult, load_table
from embedforge.errors import ConfigError, InputError

Split = Literal["train", "dev", "test", "all"]
Kind = Literal["scored_pairs", "nli_triplets", "bitext", "qa", "retrieval", "math_qa",
               "queries", "corpus", "qrels"]


@dataclass(frozen=True)
class SourceInfo:
    kinds: tuple[str, ...]            # the first is the default
    splits: tuple[str, ...]
    langs: tuple[str, ...] | None     # None: checked when loading (tatoeba's codes come from its files)
    default_lang: str | None          # None: lang is required
    lang2: Literal["no", "optional", "required"] = "no"


SOURCES: dict[str, SourceInfo] = {
    "stsb": SourceInfo(("scored_pairs",), ("train", "dev", "test"), ("en",), "en"),
    "stsb_multi_mt": SourceInfo(("scored_pairs",), ("train", "dev", "test"), STSB_MULTI_MT_LANGS, "en"),
    "stsb_crosslingual": SourceInfo(("scored_pairs",), ("train", "dev", "test"), STSB_MULTI_MT_LANGS, "en",
                                    "required"),
    "sick": SourceInfo(("scored_pairs", "nli_triplets"), ("train", "dev", "test"), ("en",), "en"),
    "snli": SourceInfo(("nli_triplets",), ("dev", "test"), ("en",), "en"),
    "xnli": SourceInfo(("nli_triplets",), ("dev", "test"), XNLI_LANGS, "en"),
    "xglue_nli": SourceInfo(("nli_triplets",), ("train", "dev", "test"), ("de",), "de"),
    "tatoeba": SourceInfo(("bitext",), ("test",), None, None),
    "xquad": SourceInfo(("qa",), ("train", "test"), XQUAD_LANGS, "en", "optional"),
    "cranfield": SourceInfo(("retrieval",), ("test",), ("en",), "en"),
    "gsm8k": SourceInfo(("math_qa",), ("train", "test"), ("en",), "en"),
}


def is_uri(source: str) -> bool:
    return "://" in source or source.lower().endswith(PARQUET_SUFFIXES + JSONL_SUFFIXES) or \
        source.startswith(("/", "./", "../", "~"))


class DatasetSpec(StrictModel):
    """One dataset split to load."""

    source: str = Field(description="an offline dataset name (see SOURCES), hf:org/name[:config], "
                                     "or a Parquet/JSONL path or URI (file://, s3://)")
    split: Split = Field("train", description="train, dev, test or all (the source's splits concatenated, "
                                              "with a `split` column); for a URI, the split the file holds")
    lang: str | None = Field(None, description="language (ISO 639-1; tatoeba also takes ISO 639-3); "
                                               "default: the source's, required for tatoeba")
    lang2: str | None = Field(None, description="stsb_crosslingual: language of sentence2 (sentence1 is `lang`); "
                                                "xquad: language of contexts/answers (questions are `lang`)")
    limit: int | None = Field(None, gt=0, description="keep the first N rows (queries for retrieval)")
    kind: Kind | None = Field(None, description="canonical table: required for URIs and hf:, "
                                                "selects scored_pairs or nli_triplets for sick")
    pairing: Literal["all", "first"] = Field("all", description="NLI triplets: every entailed x contradicted "
                                                                "hypothesis of a premise, or the first of each")
    test_fraction: float = Field(0.5, gt=0.0, lt=1.0, description="xquad: share of articles held out as test")
    max_bad_fraction: float = Field(0.0, ge=0.0, le=1.0, description="URI/hub sources: share of bad rows "
                                                                     "tolerated (use load_table to inspect them)")

    @model_validator(mode="after")
    def _check_source(self) -> DatasetSpec:
        if self.source.startswith(HUB_PREFIX) or is_uri(self.source):
            if self.kind is None:
                raise ValueError(f"source {self.source!r} is a URI or hub dataset: set kind to one of "
                                 f"{', '.join(S.KINDS)}")
            if self.kind == "retrieval":
                raise ValueError("kind 'retrieval' is only for cranfield; load queries, corpus and qrels "
                                 "files separately with kind queries/corpus/qrels")
            return self
        info = SOURCES.get(self.source)
        if info is None:
            raise ValueError(f"unknown source {self.source!r}; use one of {', '.join(SOURCES)}, "
                             "hf:org/name, or a .parquet/.jsonl path or URI")
        if self.split != "all" and self.split not in info.splits:
            raise ValueError(f"source {self.source!r} has no split {self.split!r}; allowed splits: "
                             f"{', '.join(info.splits)}, all")
        if self.kind is not None and self.kind not in info.kinds:
            raise ValueError(f"source {self.source!r} provides kind {' or '.join(info.kinds)}, not {self.kind!r}")
        if self.lang is None and info.default_lang is None:
            raise ValueError(f"source {self.source!r} needs lang (e.g. de or deu)")
        if info.lang2 == "no" and self.lang2 is not None:
            users = [n for n, i in SOURCES.items() if i.lang2 != "no"]
            raise ValueError(f"lang2 is only used by {', '.join(users)}; remove it for {self.source!r}")
        if info.lang2 == "required" and self.lang2 is None:
            raise ValueError(f"source {self.source!r} needs lang2 (the language of sentence2)")
        if info.langs is not None:
            for name, value in (("lang", self.lang), ("lang2", self.lang2)):
                if value is not None and value not in info.langs:
                    raise ValueError(f"source {self.source!r} has no {name} {value!r}; "
                                     f"available: {', '.join(info.langs)}")
        return self

    @property
    def resolved_kind(self) -> str:
        return self.kind or SOURCES[self.source].kinds[0]

    @property
    def resolved_lang(self) -> str:
        if self.lang is not None:
            return self.lang
        info = SOURCES.get(self.source)
        return (info.default_lang if info else None) or "en"


def splits_of(spec: DatasetSpec) -> tuple[str, ...]:
    """The concrete splits ``spec`` reads (``all`` expanded)."""
    info = SOURCES.get(spec.source)
    if spec.split != "all":
        return (spec.split,)
    return info.splits if info else ("train", "dev", "test")


def is_test_split(spec: DatasetSpec) -> bool:
    """True when ``spec`` reads any test data (``test``, or ``all`` of a source that has a test split)."""
    return "test" in splits_of(spec)


def forbid_test_split(spec: DatasetSpec, purpose: str) -> None:
    """Raise ConfigError if ``spec`` reads test data; call it wherever data trains or tunes something."""
    if is_test_split(spec):
        raise ConfigError(f"dataset {spec.source!r} split {spec.split!r}: test splits are for final evaluation "
                          f"only; use train or dev for {purpose}")


def _load_named(spec: DatasetSpec, split: str) -> pl.DataFrame | RetrievalData:
    source, lang, kind = spec.source, spec.resolved_lang, spec.resolved_kind
    if source == "stsb":
        return load_stsb(split)
    if source == "stsb_multi_mt":
        return load_stsb_multi_mt(lang, split)
    if source == "stsb_crosslingual":
        return load_stsb_crosslingual(lang, spec.lang2, split)
    if source == "sick" and kind == "scored_pairs":
        return load_sick_relatedness(split)
    if kind == "nli_triplets":
        return load_nli_triplets(source, lang, split, spec.pairing)
    if source == "tatoeba":
        return load_tatoeba(lang)
    if source == "xquad":
        return load_xquad_crosslingual(lang, spec.lang2 or lang, split, spec.test_fraction)
    if source == "cranfield":
        return load_cranfield()
    if source == "gsm8k":
        return load_gsm8k(split)
    raise InputError(f"no loader for source {source!r} kind {kind!r}")


def _checked(spec: DatasetSpec, result: LoadResult) -> pl.DataFrame:
    if result.bad.height and result.bad_fraction > spec.max_bad_fraction:
        first = result.bad.row(0, named=True)
        raise InputError(f"{spec.source}: {result.bad.height} of {result.bad.height + result.rows.height} rows "
                         f"are bad (more than max_bad_fraction={spec.max_bad_fraction}); first at line "
                         f"{first[S.LINE]}: {first[S.REASON]}. Fix the rows or inspect them with load_table")
    return result.rows


def load_dataset(spec: DatasetSpec) -> pl.DataFrame | RetrievalData:
    """Load ``spec`` into its canonical table (RetrievalData for cranfield)."""
    if spec.source.startswith(HUB_PREFIX):
        lang = spec.resolved_lang
        parts = [_checked(spec, load_hub(spec.source, spec.kind, s, (lang, spec.lang2 or lang)))
                 for s in splits_of(spec)]
    elif is_uri(spec.source):
        df = _checked(spec, load_table(spec.source, spec.kind))
        return df.head(spec.limit) if spec.limit else df
    else:
        parts = [_load_named(spec, s) for s in splits_of(spec)]
    if isinstance(parts[0], RetrievalData):
        data = parts[0]
        return data.head(spec.limit) if spec.limit else data
    if spec.split == "all":
        df = pl.concat([p.with_columns(pl.lit(s).alias(S.SPLIT)) for p, s in zip(parts, splits_of(spec))])
    else:
        df = parts[0]
    return df.head(spec.limit) if spec.limit else df
