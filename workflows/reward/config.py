"""``RewardConfig``: what the reward job reads, how it mines, scores and where it writes.

Example (``configs/reward.yaml``)::

    output: /tmp/embedforge/reward
    llm_feedback:
      data: {source: xquad, split: train, lang: en, limit: 40}
    mining: {top_k: 3}
    cross_encoder:
      eval_data: {source: stsb, split: dev, limit: 100}
"""

from __future__ import annotations

from pydantic import Field, model_validator

from actors.embedder import EmbedderConfig
from actors.llm_engine import LLMEngineConfig
from actors.reward_scorer import CrossEncoderPromptConfig, FeedbackPromptConfig
from embedforge.config import StrictModel
from embedforge.data.spec import DatasetSpec, is_test_split
from embedforge.runtime import RayConfig

class MiningConfig(StrictModel):
    """Hard-negative mining: embed, search, keep the top-k non-positives."""

    embedder: EmbedderConfig = Field(EmbedderConfig(batch_size=32), description="Embedder of the actor pool")
    num_actors: int = Field(1, ge=1, le=64, description="Embedder actors in the Ray Data pool")
    batch_size: int = Field(64, ge=1, description="Rows per map_batches call")
    top_k: int = Field(3, ge=1, le=100, description="Hard negatives kept per query")
    query_prompt: str = Field("", description="Prefix added to queries before embedding (e.g. 'query: ' for e5)")
    passage_prompt: str = Field("", description="Prefix added to passages before embedding ('passage: ' for e5)")
    false_negative_margin: float | None = Field(
        None, ge=0.0, le=2.0,
        description="Drop candidates whose similarity exceeds the lowest positive similarity minus this margin; "
                    "None: no guard",
    )


class LLMFeedbackConfig(FeedbackPromptConfig):
    """LLM-Embedder rewards: r = mean log p(answer | prompt(candidate, query)); the prompt fields are
    :class:`actors.reward_scorer.FeedbackPromptConfig`'s (``template``, ``chat_template``, ``answer_prefix``)."""

    enabled: bool = Field(True, description="Mine candidates and score them with the LLM")
    data: DatasetSpec = Field(
        DatasetSpec(source="xquad", split="train", lang="en"),
        description="QA data (qid, question, context, answer, lang, article); xquad is split by article",
    )
    temperature: float = Field(1.0, gt=0.0, description="T of the per-query teacher distribution softmax(r / T)")
    batch_size: int = Field(32, ge=1, description="(query, candidate) pairs per vLLM call")
    shard_queries: int = Field(64, ge=1, description="Queries per output shard (the unit of resume)")

    @model_validator(mode="after")
    def _no_test(self) -> LLMFeedbackConfig:
        if self.enabled and is_test_split(self.data):
            raise ValueError(f"llm_feedback.data split {self.data.split!r} reads test data; rewards train the "
                             "embedder, so use split=train (xquad test articles are held out)")
        return self


class CrossEncoderConfig(CrossEncoderPromptConfig):
    """The LLM as a cross-encoder; the prompt and score fields are
    :class:`actors.reward_scorer.CrossEncoderPromptConfig`'s (``method``, ``template``, ``max_score`` ...)."""

    enabled: bool = Field(True, description="Score sentence pairs with the LLM")
    eval_data: DatasetSpec | None = Field(
        DatasetSpec(source="stsb", split="dev", limit=200),
        description="Scored pairs to measure Spearman(teacher, gold) on (a dev split, never test); None: skip",
    )
    pairs: DatasetSpec | None = Field(
        None,
        description="Scored pairs to add teacher_score to, e.g. the synthesize output (a committed prefix or a "
                    "Parquet/JSONL file, kind scored_pairs); None: skip",
    )
    batch_size: int = Field(32, ge=1, description="Pairs per vLLM call")
    shard_pairs: int = Field(256, ge=1, description="Pairs per output shard (the unit of resume)")

    @model_validator(mode="after")
    def _check(self) -> CrossEncoderConfig:
        if self.eval_data is not None and is_test_split(self.eval_data):
            raise ValueError("cross_encoder.eval_data reads a test split; measure the teacher on dev "
                             "(test splits are for final numbers of the trained embedder)")
        return self


class ScorerConfig(StrictModel):
    """The LLM actors that score (one vLLM engine each)."""

    engine: LLMEngineConfig = Field(LLMEngineConfig(), description="vLLM engine of each scorer actor")
    num_actors: int = Field(1, ge=1, le=64, description="Scorer actors in the Ray Data pool")


class RewardConfig(StrictModel):
    """Mine hard negatives, compute LLM-feedback rewards and cross-encoder teacher scores."""

    output: str = Field(description="Output prefix (local path or s3://); a committed manifest marks it complete")
    ray: RayConfig = Field(RayConfig(), description="How to reach or start Ray")
    mining: MiningConfig = Field(MiningConfig(), description="Hard-negative mining")
    llm_feedback: LLMFeedbackConfig = Field(LLMFeedbackConfig(), description="LLM-feedback rewards")
    cross_encoder: CrossEncoderConfig = Field(CrossEncoderConfig(), description="LLM cross-encoder teacher")
    scorer: ScorerConfig = Field(ScorerConfig(), description="LLM scorer actors")
    max_bad_fraction: float = Field(0.05, ge=0.0, le=1.0,
                                    description="Fail when more than this share of rows is quarantined")
    report: bool = Field(True, description="Write the reward histogram and teacher-vs-gold scatter PNGs")
    overwrite: bool = Field(False, description="Delete a committed output and recompute (default: resume/skip)")

    def content_hash(self) -> str:
        """Hash of what determines the output rows: not where they go, nor how many actors score them."""
        body = self.model_copy(update={"mining": self.mining.model_copy(update={"num_actors": 1}),
                                       "scorer": self.scorer.model_copy(update={"num_actors": 1})})
        return StrictModel.content_hash(body)

    @model_validator(mode="after")
    def _something_to_do(self) -> RewardConfig:
        ce = self.cross_encoder
        if not self.llm_feedback.enabled and not (ce.enabled and (ce.eval_data or ce.pairs)):
            raise ValueError("nothing to do: enable llm_feedback, or cross_encoder with eval_data or pairs")
        return self
