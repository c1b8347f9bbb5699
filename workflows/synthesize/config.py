"""``SynthesizeConfig``: which training data to translate, into which languages, with which model and filters."""

from __future__ import annotations

import hashlib
from typing import Literal

from pydantic import Field, field_validator, model_validator

from actors.llm_engine import LLMEngineConfig
from embedforge.config import StrictModel, forbid_keys
from embedforge.data import DatasetSpec, forbid_test_split
from embedforge.errors import ConfigError
from embedforge.runtime import RayConfig

TRANSLATABLE_KINDS = ("scored_pairs", "nli_triplets")
# 2: each shard also writes `parallel` (the sentences that passed their own checks).
OUTPUT_LAYOUT = 2

class FewShotExample(StrictModel):
    """One English sentence and its reference translation, shown to base models before the input."""

    source: str = Field(min_length=1, description="English sentence (from training data, never test)")
    target: str = Field(min_length=1, description="Its translation into the target language")


class TranslationConfig(LLMEngineConfig):
    """The translation engine, prompting and decoding; ``concurrency/batch_size/num_gpus`` scale it out.

    The engine fields are :class:`actors.llm_engine.LLMEngineConfig`'s (every one reaches the
    engine: ``tensor_parallel_size``, ``gpu_memory_utilization``, ``kv_cache_gb`` ...); this class
    adds prompting, decoding and scale-out, and its own defaults for ``model`` and ``max_model_len``.
    """

    model: str = Field("gemma-3-270m", description="Packaged short name, local folder, s3:// folder or hub id")
    prompt_style: Literal["auto", "chat", "few_shot"] = Field(
        "auto", description="chat: the model's chat template (instruct models); few_shot: two-example "
                            "completion prompt (base models); auto: chat when the tokenizer has a chat template")
    few_shot: dict[str, list[FewShotExample]] = Field(
        default_factory=dict, description="Per target language, few-shot examples replacing the built-in ones "
                                          "(needed for languages without built-in examples)")
    backend: Literal["engine", "ray_data_llm"] = Field(
        "engine", description="engine: map_batches over actors.translator.Translator (vLLM in the actor); "
                              "ray_data_llm: ray.data.llm.build_processor with vLLMEngineProcessorConfig")
    max_tokens_factor: float = Field(2.0, gt=0, description="max_tokens = ceil(factor x source tokens) + floor")
    max_tokens_floor: int = Field(16, ge=1, description="Tokens added to every max_tokens (short sentences, punctuation)")
    max_model_len: int = Field(1024, ge=64, description="vLLM context length (prompt + generation)")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="vLLM dtype; auto: bfloat16 on GPUs and CPUs with native bf16, float32 elsewhere "
                            "(resolved on a worker, recorded in the manifest as engine_dtype)")
    concurrency: int = Field(1, ge=1, description="Engine replicas (Ray actors), one model copy each")
    batch_size: int = Field(64, ge=1, description="Sentences per engine call")

    @model_validator(mode="after")
    def _backend_fields(self) -> TranslationConfig:
        if self.backend == "ray_data_llm":
            forbid_keys(self, ["num_threads", "in_process", "enable_prompt_embeds"], "translation",
                        "the ray_data_llm backend's vLLM stage runs its own engine process, which these do not reach")
        return self

    def engine_config(self) -> LLMEngineConfig:
        """The engine part, as the engine takes it."""
        return LLMEngineConfig.model_validate(self.model_dump(include=set(LLMEngineConfig.model_fields)))


class QEConfig(StrictModel):
    """Quality-estimation thresholds; a row failing any enabled check is quarantined with each failure.

    Defaults checked on the tuning half of stsb_multi_mt dev (de, fr, es, zh; docs/synthesize.md):
    each length and embedding bound rejects at most about 5% of the DeepL references.
    """

    length_unit: Literal["tokens", "chars"] = Field(
        "tokens", description="Unit of the length ratio: tokens of the translation model's tokenizer (fair to "
                              "scripts such as Chinese that pack more per character) or characters")
    min_length_ratio: float = Field(0.5, gt=0, description="Smallest translation/source length, in length_unit")
    max_length_ratio: float = Field(2.0, gt=0, description="Largest translation/source length, in length_unit")
    max_copy_similarity: float = Field(
        0.9, gt=0, le=1, description="Reject as 'copy' when the normalized translation is at least this "
                                     "similar to the source (difflib ratio)")
    min_lang_prob: float = Field(0.5, ge=0, le=1, description="Smallest py3langid probability of the target language")
    langid_candidates: list[str] | None = Field(
        None, description="Restrict language identification to these ISO codes; None: all 97 languages")
    max_repeated_ngram: int = Field(3, ge=2, description="Reject as 'runaway' when a word 3-gram occurs this often")
    cosine: bool = Field(True, description="Run the embedding checks: cosine floor, margin, pair consistency "
                                           "(needs the encoder)")
    min_cosine: float = Field(0.8, ge=-1, le=1, description="Smallest cosine(source, translation) with the encoder")
    margin: bool = Field(True, description="Run the ratio-margin check (LASER-style, within each shard)")
    min_margin: float = Field(1.0, gt=0, description="Smallest ratio margin of cosine(source, translation) against "
                                                     "the k nearest neighbours of both sides in the shard (p5 of "
                                                     "DeepL references on dev: 1.000)")
    margin_k: int = Field(4, ge=1, description="Neighbours per side in the margin (LASER's default 4)")
    margin_min_pool: int = Field(
        16, ge=2, description="Shards with fewer sentences of a language skip the margin (too few neighbours); "
                              "the cosine floor still applies")
    pair_consistency: bool = Field(True, description="Quarantine scored pairs whose translated pair cosine departs "
                                                     "from the source pair's by more than max_pair_delta")
    max_pair_delta: float = Field(0.1, gt=0, le=2, description="Largest |cos(t1, t2) - cos(s1, s2)| of a kept pair "
                                                             "(p95 of DeepL reference pairs on dev: 0.096)")
    round_trip: bool = Field(False, description="Back-translate with the same engine and check chrF against the "
                                                "source (doubles the translation work)")
    min_round_trip_chrf: float = Field(30.0, ge=0, le=100, description="Smallest chrF of the back-translation")
    encoder: str = Field("multilingual-e5-small", description="Multilingual sentence encoder for the cosine check")
    encoder_prompt: str = Field("query: ", description="Text prefix of the encoder (e5 expects 'query: ')")
    encoder_batch_size: int = Field(64, ge=1, description="Sentences per encoder batch")
    encoder_concurrency: int = Field(1, ge=1, description="Encoder replicas")
    encoder_num_gpus: float = Field(0, ge=0, description="GPUs per encoder replica")

    @model_validator(mode="after")
    def _check_ratio(self) -> QEConfig:
        if self.min_length_ratio >= self.max_length_ratio:
            raise ValueError(f"min_length_ratio ({self.min_length_ratio}) must be below max_length_ratio "
                             f"({self.max_length_ratio})")
        return self


class SynthesizeConfig(StrictModel):
    """Translate English NLI triplets and STS pairs into target languages, filter them, write shards."""

    inputs: list[DatasetSpec] = Field(
        min_length=1, description="Training datasets (scored_pairs or nli_triplets; no test splits)")
    target_langs: list[str] = Field(min_length=1, description="ISO 639-1 codes to translate into, e.g. [de, fr]")
    source_lang: str = Field("en", description="Language of the input sentences")
    translation: TranslationConfig = TranslationConfig()
    qe: QEConfig = QEConfig()
    shard_rows: int = Field(256, ge=1, description="Input rows per output shard (a shard = row range x language)")
    max_bad_fraction: float = Field(
        0.05, ge=0, le=1, description="Fail when more than this share of input rows is malformed")
    max_rejected_fraction: float = Field(
        1.0, ge=0, le=1, description="Fail when more than this share of rows of a language is quarantined")
    output: str = Field(description="Output prefix (local path or s3://bucket/prefix)")
    ray: RayConfig = RayConfig()

    @field_validator("inputs")
    @classmethod
    def _training_only(cls, inputs: list[DatasetSpec]) -> list[DatasetSpec]:
        for i, spec in enumerate(inputs):
            if spec.resolved_kind not in TRANSLATABLE_KINDS:
                raise ValueError(f"inputs[{i}] ({spec.source}) is kind {spec.resolved_kind!r}; "
                                 f"translate one of {', '.join(TRANSLATABLE_KINDS)}")
            try:
                forbid_test_split(spec, f"synthesizing training data (inputs[{i}])")
            except ConfigError as e:
                raise ValueError(str(e)) from None
        return inputs

    @field_validator("target_langs")
    @classmethod
    def _langs(cls, langs: list[str]) -> list[str]:
        bad = [x for x in langs if not (len(x) == 2 and x.isalpha() and x.islower())]
        if bad:
            raise ValueError(f"target_langs {bad}: use lower-case ISO 639-1 codes such as de, es, fr")
        if len(set(langs)) != len(langs):
            raise ValueError(f"target_langs {langs} has duplicates")
        return langs

    def content_hash(self) -> str:
        """Hash of what determines the output rows (not how many replicas produce them)."""
        scale = {"concurrency", "batch_size", "num_cpus", "num_gpus", "backend"}
        qe_scale = {"encoder_batch_size", "encoder_concurrency", "encoder_num_gpus"}
        body = self.model_copy(update={
            "ray": RayConfig(), "output": "",
            "translation": self.translation.model_copy(update={k: None for k in scale}),
            "qe": self.qe.model_copy(update={k: None for k in qe_scale}),
        })
        # The layout of the shards is part of what a config produces: shards written before the
        # `parallel` sub-output existed must not be resumed into an output that lists it.
        return hashlib.sha256(f"{body.config_hash()}/layout-{OUTPUT_LAYOUT}".encode()).hexdigest()[:16]
