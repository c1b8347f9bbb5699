"""Training objectives: typed configs, the dataset columns each needs, and the loss built from them.

Public API (pure config code imports fast; torch and sentence-transformers load in ``build_loss``)::

    ObjectiveConfig                      # union of the configs below, tagged by `kind`
    build_loss(objective, model) -> torch.nn.Module
    required_columns(objective) -> list[str]   # every column the rows need: inputs, then label
    input_columns(objective) -> list[str]      # text columns, in the order the loss reads them
    label_column(objective) -> str | None      # the label column (None: no labels)
    labels_from_batch(objective, batch) -> torch.Tensor | None   # float32 labels for one batch
    trained_grid(objectives, num_layers=None, dim=None) -> dict | None   # {"layers": [...], "dims": [...]}
    record_grid(model_dir, objectives, model) -> dict | None       # writes elastic_grid.json

Objectives (``kind``), their columns (in order) and labels:

===============  ==========================================================  ==========================
kind             input columns                                               label column (float32)
===============  ==========================================================  ==========================
``mnrl``         ``anchor, positive`` [+ ``negative`` | ``negative_1..n``]   none
``cached_mnrl``  same as ``mnrl``                                            none
``cosent``       ``sentence1, sentence2``                                    ``score`` (B,)
``angle``        ``sentence1, sentence2``                                    ``score`` (B,)
``kl_distill``   ``query, candidate_1 .. candidate_k``                       ``teacher_probs`` (B, k)
``score_distill`` ``sentence1, sentence2``                                   ``teacher_score`` (B,)
``multilingual_distill`` ``source_sentence, translation``                    ``teacher_embedding`` (B, D)
===============  ==========================================================  ==========================

(``mnrl``/``cached_mnrl``: ``num_negatives=0`` -> no negative column, ``1`` -> ``negative`` (the NLI
triplet schema), ``n>1`` -> ``negative_1..negative_n``. ``kl_distill``/``score_distill`` take the
label column name from ``teacher_column``; ``kl_distill`` rows are wide: one row per query with its
``k`` candidates and a list column of ``k`` teacher probabilities, e.g. pivoted from the reward
stage's per-(query, candidate) ``teacher_prob`` rows. ``multilingual_distill`` rows are made by the
mixture loader: it melts each row's (source, translation) column pairs, e.g. a synthesize output's
``source_sentence1``/``sentence1``, into one row per distinct pair, and adds the teacher's embedding
of the source (:mod:`workflows.train.teacher`, computed once on Ray Data and stored).)

Every objective accepts ``matryoshka2d: {layers: [...], dims: [...], ...}`` (2DMSE): the loss is
summed over transformer depths ``layers`` (number of layers run; the full depth is always trained)
and Matryoshka truncations ``dims``. With ``cached_mnrl`` this is a GradCache loss whose mini-batch
pass embeds every sampled depth at once (:mod:`.grid`), which sentence-transformers itself forbids.

How the training loop calls a loss (the sentence-transformers loss protocol)::

    loss_fn = build_loss(objective, model)          # model: SentenceTransformer, or its DDP wrapper
    features = [model.preprocess(batch[c]) for c in input_columns(objective)]   # (moved to device)
    loss = loss_fn(features, labels_from_batch(objective, batch))
    loss.backward()                                  # cached losses re-embed inside this call

``build_loss`` accepts the DDP-wrapped model (``ray.train.torch.prepare_model``): the losses are
built on the unwrapped SentenceTransformer and then run their forward passes through the wrapper,
so gradients synchronize. With ``gather_across_workers`` the in-batch negatives of ``mnrl`` and
``cached_mnrl`` are all-gathered with gradient from every worker (sentence-transformers'
``gather_across_devices``): the negative pool is the global batch, and the mean over workers of the
per-worker losses equals the single-process loss over the concatenated batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

from pydantic import Field, model_validator

from embedforge.config import StrictModel

if TYPE_CHECKING:
    import torch

# column names (anchor/positive/negative and sentence1/sentence2/score follow embedforge.schemas)
ANCHOR, POSITIVE, NEGATIVE = "anchor", "positive", "negative"
SENTENCE1, SENTENCE2, SCORE = "sentence1", "sentence2", "score"
QUERY, CANDIDATE = "query", "candidate"
TEACHER_PROBS, TEACHER_SCORE = "teacher_probs", "teacher_score"
# multilingual distillation rows (built by workflows.train.mixture from the data's column pairs)
SOURCE_SENTENCE, TRANSLATION, TEACHER_EMBEDDING = "source_sentence", "translation", "teacher_embedding"


class Matryoshka2dConfig(StrictModel):
    """2D Matryoshka (2DMSE, Li et al. 2024, "2D Matryoshka Sentence Embeddings"): depth x width."""

    layers: list[Annotated[int, Field(ge=1)]] = Field(
        min_length=1, description="Transformer depths (layers run) trained besides the full depth, e.g. [2, 4]")
    dims: list[Annotated[int, Field(ge=1)]] = Field(
        min_length=1, description="Matryoshka truncations (include the full dimension), e.g. [384, 128, 64]")
    dim_weights: list[Annotated[float, Field(gt=0)]] | None = Field(
        None, description="Loss weight per entry of `dims`; None: all 1")
    n_layers_per_step: int = Field(
        1, ge=-1, description="Depths of `layers` sampled per step (besides the full depth); -1 or 0: all")
    n_dims_per_step: int = Field(-1, ge=-1, description="Dims sampled per step; -1 or 0: all")
    last_layer_weight: float = Field(1.0, ge=0, description="Weight of the full-depth loss")
    prior_layers_weight: float = Field(1.0, ge=0, description="Weight of the mean loss over the sampled depths")
    kl_div_weight: float = Field(1.0, ge=0, description="Weight of KL(full-depth || shallow) self-distillation")
    kl_temperature: float = Field(0.3, ge=0, description="Temperature of that KL; 0 turns it off")
    layer_weights: Literal["uniform", "ese"] = Field(
        "uniform", description="uniform: mean over the sampled depths (2DMSE); ese: AnglE's Espresso, every depth "
                               "each step weighted 1 / (1 + ln(1 + k)) (needs n_layers_per_step: -1)")

    @model_validator(mode="after")
    def _check(self) -> Matryoshka2dConfig:
        if self.layer_weights == "ese" and 0 < self.n_layers_per_step < len(self.layers):
            raise ValueError("matryoshka2d.layer_weights 'ese' trains every depth each step; "
                             "set matryoshka2d.n_layers_per_step: -1")
        if self.dim_weights is not None and len(self.dim_weights) != len(self.dims):
            raise ValueError(f"matryoshka2d.dim_weights has {len(self.dim_weights)} entries but dims has "
                             f"{len(self.dims)}; give one weight per dim or leave it out")
        if len(set(self.layers)) != len(self.layers) or len(set(self.dims)) != len(self.dims):
            raise ValueError("matryoshka2d.layers and matryoshka2d.dims must not repeat values")
        return self


class _Objective(StrictModel):
    matryoshka2d: Matryoshka2dConfig | None = Field(None, description="Wrap the loss in 2D Matryoshka (2DMSE)")


class MNRLConfig(_Objective):
    """In-batch negatives plus hard negatives (MultipleNegativesRankingLoss, InfoNCE)."""

    kind: Literal["mnrl"] = "mnrl"
    scale: float = Field(20.0, gt=0, description="Similarity scale (1 / temperature)")
    num_negatives: int = Field(1, ge=0, le=64, description="Hard-negative columns per row (0: pairs only)")
    gather_across_workers: bool = Field(
        True, description="All-gather candidates from every worker, so negatives come from the global batch")
    progressive: float = Field(
        0.0, ge=0, le=20, description="PEG progressive learning strength: per-query weights move from easy to hard "
                                      "queries over training (workflows.train.losses.peg); 0: plain MNRL")


class CachedMNRLConfig(MNRLConfig):
    """MNRL with GradCache (CachedMultipleNegativesRankingLoss): batches larger than memory."""

    kind: Literal["cached_mnrl"] = "cached_mnrl"  # type: ignore[assignment]
    mini_batch_size: int = Field(32, ge=1, description="Rows embedded per forward pass")

    @model_validator(mode="after")
    def _no_progressive(self) -> CachedMNRLConfig:
        if self.progressive:
            raise ValueError("cached_mnrl.progressive: PEG weighting is implemented for kind mnrl only; "
                             "use kind: mnrl or set progressive: 0")
        return self


class CoSENTConfig(_Objective):
    """Scored pairs, CoSENT (Su 2022): ranking loss over pairs of pairs by cosine similarity."""

    kind: Literal["cosent"] = "cosent"
    scale: float = Field(20.0, gt=0, description="Similarity scale (1 / temperature)")


class AnglEConfig(_Objective):
    """Scored pairs, AnglE (Li & Li 2023): CoSENT on angle differences in complex space."""

    kind: Literal["angle"] = "angle"
    scale: float = Field(20.0, gt=0, description="Similarity scale (1 / temperature)")


class KLDistillConfig(_Objective):
    """KL(teacher || softmax(cos_sim(query, candidate_i) / T)) over each query's candidates."""

    kind: Literal["kl_distill"] = "kl_distill"
    num_candidates: int = Field(ge=2, le=256, description="Candidate columns candidate_1..candidate_k")
    temperature: float = Field(0.01, gt=0, description="Cosine temperature tau: scores are cos / tau "
                                                       "(FlagEmbedding's cos_temperature; no T^2 factor)")
    distill: Literal["kl", "stable", "none"] = Field(
        "kl", description="kl: KL over each query's own candidates; stable: LLM-Embedder's rank-based "
                          "distillation over the global candidate pool; none: contrastive term only")
    student_temperature: float = Field(1.0, gt=0, description="kl: extra temperature on the student scores")
    teacher_temperature: float = Field(1.0, gt=0, description="kl: temperature on the teacher scores")
    distill_weight: float = Field(1.0, ge=0, description="Weight of the distillation term (with the contrastive)")
    contrastive_weight: float = Field(
        0.0, ge=0, description="Weight of InfoNCE with candidate_1 as the positive against every candidate of "
                               "the global batch; 0: off")
    gather_across_workers: bool = Field(
        True, description="stable and contrastive: candidates of every worker join the pool (cross-worker negatives)")
    teacher_column: str = Field(TEACHER_PROBS, description="List column of k teacher values per row")
    teacher_format: Literal["probs", "logits"] = Field(
        "probs", description="probs: a distribution per row (e.g. softmax(r / T) of the reward stage); "
                             "logits: softmax is applied")


class ScoreDistillConfig(_Objective):
    """Teacher scores (a cross-encoder's, in [0, 1]) as the regression/ranking target of pairs."""

    kind: Literal["score_distill"] = "score_distill"
    loss: Literal["mse", "cosent"] = Field(
        "mse", description="mse: (cos_sim - teacher)^2 (CosineSimilarityLoss); cosent: rank pairs by teacher")
    scale: float = Field(20.0, gt=0, description="CoSENT similarity scale (ignored for mse)")
    teacher_column: str = Field(TEACHER_SCORE, description="Column with the teacher score")
    alpha: float = Field(1.0, ge=0, le=1, description="DSE mix: (1 - alpha) * loss(gold) + alpha * loss(teacher); "
                                                      "1: teacher only")
    gold_column: str | None = Field(None, description="Column with the gold score (needed when alpha < 1)")

    @model_validator(mode="after")
    def _gold(self) -> ScoreDistillConfig:
        if self.alpha < 1 and self.gold_column is None:
            raise ValueError("score_distill.alpha < 1 mixes in the gold labels: set score_distill.gold_column "
                             "(e.g. score)")
        return self


class MultilingualDistillConfig(_Objective):
    """Multilingual knowledge distillation (Reimers & Gurevych 2020, "Making Monolingual Sentence
    Embeddings Multilingual using Knowledge Distillation"): for each parallel pair (s, t) the student's
    embeddings of the source s and of its translation t both regress onto the teacher's embedding of s::

        loss = mean over columns c in (s, t) of mean((student(c) - teacher(s))^2)

    This is sentence-transformers' ``MSELoss`` (the loss of its ``make_multilingual`` example). The
    teacher embeds every distinct source sentence once, before training, on Ray Data; the result is a
    committed output keyed by the teacher's weights and the sentences, so reruns reuse it.
    """

    kind: Literal["multilingual_distill"] = "multilingual_distill"
    teacher: str | None = Field(
        None, description="Teacher model (packaged name, local folder, s3:// folder or hub id); None: the base "
                          "model being trained, as it is before training (its initial weights)")
    pairs: list[Annotated[list[str], Field(min_length=2, max_length=2)]] | None = Field(
        None, description="[source column, translation column] pairs read from each row, e.g. "
                          "[[source_sentence1, sentence1]]; None: every source_<c> / <c> pair in the data "
                          "(a synthesize output: source_sentence1/sentence1, source_sentence2/sentence2, ...)")
    loss: Literal["mse", "similarity"] = Field(
        "mse", description="mse: the paper's loss (sentence-transformers' MSELoss on coordinates); similarity: "
                           "match the teacher's in-batch cosine matrix (SimilarityDistillLoss; steadier on a few "
                           "hundred pairs, see docs/train.md)")
    ranking_weight: float = Field(
        0.0, ge=0, description="Weight of a translation-ranking term added to `loss`: symmetric in-batch InfoNCE "
                               "between each translation and its source (sentence-transformers' "
                               "MultipleNegativesRankingLoss, both directions), the other sentences of the batch as "
                               "negatives; 0: off. The quickstart uses 0.05 with ranking_target teacher (chosen on dev: "
                               "docs/train.md)")
    ranking_scale: float = Field(20.0, gt=0, description="Similarity scale (1 / temperature) of the ranking term")
    ranking_target: Literal["student", "teacher"] = Field(
        "student", description="What each translation is ranked against: the student's embeddings of the sources "
                               "(both languages move), or the teacher's (fixed targets: only translations move)")
    gather_across_workers: bool = Field(
        True, description="Ranking term: all-gather the batch from every worker, so negatives come from the global "
                          "batch")
    teacher_batch_size: int = Field(64, ge=1, le=4096, description="Sentences per teacher forward pass")
    teacher_store: str | None = Field(
        None, description="URI under which teacher embeddings are stored and looked up; None: beside the data "
                          "(<data URI>/teacher_embeddings) or, for a named dataset, <train output>/teacher_embeddings")

    @model_validator(mode="after")
    def _check(self) -> MultilingualDistillConfig:
        if self.matryoshka2d is not None:
            raise ValueError("multilingual_distill: matryoshka2d is not supported (the teacher targets are "
                             "full-width, full-depth embeddings); remove matryoshka2d from this objective")
        return self


ObjectiveConfig = Annotated[
    Union[MNRLConfig, CachedMNRLConfig, CoSENTConfig, AnglEConfig, KLDistillConfig, ScoreDistillConfig,
          MultilingualDistillConfig],
    Field(discriminator="kind"),
]
KINDS = ("mnrl", "cached_mnrl", "cosent", "angle", "kl_distill", "score_distill", "multilingual_distill")


def input_columns(objective: Any) -> list[str]:
    """Text columns the loss embeds, in the order it reads them."""
    if objective.kind in ("mnrl", "cached_mnrl"):
        n = objective.num_negatives
        negs = [] if n == 0 else [NEGATIVE] if n == 1 else [f"{NEGATIVE}_{i}" for i in range(1, n + 1)]
        return [ANCHOR, POSITIVE, *negs]
    if objective.kind in ("cosent", "angle", "score_distill"):
        return [SENTENCE1, SENTENCE2]
    if objective.kind == "kl_distill":
        return [QUERY, *[f"{CANDIDATE}_{i}" for i in range(1, objective.num_candidates + 1)]]
    if objective.kind == "multilingual_distill":
        return [SOURCE_SENTENCE, TRANSLATION]
    raise ValueError(f"unknown objective kind {objective.kind!r}; expected one of {KINDS}")


def label_column(objective: Any) -> str | None:
    """The label column (None for objectives without labels)."""
    if objective.kind in ("cosent", "angle"):
        return SCORE
    if objective.kind in ("kl_distill", "score_distill"):
        return objective.teacher_column
    if objective.kind == "multilingual_distill":
        return TEACHER_EMBEDDING
    return None


def required_columns(objective: Any) -> list[str]:
    """Every column a dataset needs for ``objective``: the inputs in order, then the label."""
    label = label_column(objective)
    gold = [objective.gold_column] if objective.kind == "score_distill" and objective.alpha < 1 else []
    return input_columns(objective) + ([label] if label else []) + gold


def labels_from_batch(objective: Any, batch: Mapping[str, Sequence[Any]]) -> torch.Tensor | None:
    """float32 labels for a batch of rows (column -> values); None when the objective has none."""
    import numpy as np
    import torch

    col = label_column(objective)
    if col is None:
        return None
    values = np.asarray(list(batch[col]) if not hasattr(batch[col], "to_numpy") else batch[col].to_numpy(),
                        dtype=object)
    arr = np.asarray([np.asarray(v, dtype=np.float32) for v in values], dtype=np.float32)
    if objective.kind == "kl_distill" and arr.shape[1:] != (objective.num_candidates,):
        raise ValueError(f"column {col!r}: expected {objective.num_candidates} teacher values per row "
                         f"(one per candidate column), got shape {arr.shape}")
    if objective.kind == "score_distill" and objective.alpha < 1:  # DSE: (B, 2) = [teacher, gold]
        gold = np.asarray(list(batch[objective.gold_column]), dtype=np.float32)
        arr = np.stack([arr, gold], axis=1)
    return torch.from_numpy(arr)


def trained_grid(objectives: Iterable[Any], num_layers: int | None = None,
                 dim: int | None = None) -> dict[str, list[int]] | None:
    """The (layers, dims) grid the 2DMSE objectives train; None when none uses 2DMSE.

    ``num_layers``/``dim`` (the model's full depth and width) are added when given: the full depth
    is always trained, and the full width is part of every sensible grid.
    """
    layers: set[int] = set()
    dims: set[int] = set()
    for objective in objectives:
        if objective.matryoshka2d is not None:
            layers.update(objective.matryoshka2d.layers)
            dims.update(objective.matryoshka2d.dims)
    if not layers:
        return None
    if num_layers is not None:
        layers = {k for k in layers if k <= num_layers} | {num_layers}
    if dim is not None:
        dims = {d for d in dims if d <= dim} | {dim}
    return {"layers": sorted(layers), "dims": sorted(dims)}


def record_grid(model_dir: str | Path, objectives: Iterable[Any], model: Any) -> dict[str, list[int]] | None:
    """Write the trained grid into a saved model folder (``elastic_grid.json``); return it."""
    from embedforge.elastic import num_layers, write_grid

    st = unwrap_model(model)
    grid = trained_grid(objectives, num_layers=num_layers(st), dim=st.get_embedding_dimension())
    if grid is not None:
        write_grid(model_dir, grid["layers"], grid["dims"])
    return grid


def unwrap_model(model: Any) -> Any:
    """The SentenceTransformer inside a DDP / torch.compile wrapper (or the model itself)."""
    while not hasattr(model, "get_embedding_dimension"):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            raise TypeError(f"expected a SentenceTransformer or a wrapper of one, got {type(model).__name__}")
        model = inner
    return model


def build_loss(objective: Any, model: Any) -> torch.nn.Module:
    """The loss module for ``objective`` on ``model`` (a SentenceTransformer or its DDP wrapper)."""
    from workflows.train.losses.factory import build

    return build(objective, model)


__all__ = [
    "AnglEConfig", "CachedMNRLConfig", "CoSENTConfig", "KLDistillConfig", "MNRLConfig", "Matryoshka2dConfig",
    "MultilingualDistillConfig", "ObjectiveConfig", "ScoreDistillConfig", "build_loss", "input_columns", "label_column", "labels_from_batch",
    "record_grid", "required_columns", "trained_grid", "unwrap_model",
]
