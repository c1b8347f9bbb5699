"""Multilingual knowledge distillation (Reimers & Gurevych 2020): sentence-transformers' ``MSELoss``.

For a parallel pair (source ``s``, translation ``t``) and the teacher's embedding ``T(s)``::

    loss = 1/2 * ( mean_d (S(s) - T(s))^2 + mean_d (S(t) - T(s))^2 )      (means over batch and dims)

The student ``S`` learns to place the translation where the teacher places the source, and keeps
the source where it was. This is exactly ``sentence_transformers...losses.MSELoss`` (the mean over
the input columns of ``torch.nn.functional.mse_loss``), the loss of sentence-transformers'
``make_multilingual`` example; the subclass only checks, before the loss runs, that the teacher's
width matches the student's, so a mismatch names the objective's ``teacher`` field instead of
failing inside a broadcast.

Inputs: features of the ``source_sentence`` and ``translation`` columns; labels (B, D) float32 =
the teacher's embeddings of the sources (:mod:`workflows.train.teacher`).

Example::

    from sentence_transformers import SentenceTransformer
    student = SentenceTransformer("all-MiniLM-L6-v2")
    loss = MultilingualDistillLoss(student)
    teacher = torch.from_numpy(student.encode(["A man plays."]))
    features = [student.preprocess(["A man plays."]), student.preprocess(["Ein Mann spielt."])]
    loss(features, teacher).backward()
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn

from sentence_transformers.sentence_transformer.losses import MSELoss


class MultilingualDistillLoss(MSELoss):
    """``MSELoss`` (student embeddings of every input column vs the teacher's embedding of the source)."""

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None) -> Tensor:
        check_teacher_width(self.model, labels)
        return super().forward(sentence_features, labels)

    def distill_from_embeddings(self, source: Tensor, translation: Tensor, labels: Tensor) -> Tensor:
        """The same loss on embeddings already computed (B, D) each."""
        check_teacher_width(self.model, labels)
        return self.compute_loss_from_embeddings([source, translation], [labels, labels])


def check_teacher_width(model: Any, labels: Tensor | None) -> None:
    """Name the objective's ``teacher`` field when the teacher's width differs from the student's."""
    if labels is not None and labels.dim() == 2:
        from workflows.train.losses import unwrap_model

        student_dim = unwrap_model(model).get_embedding_dimension()
        if labels.shape[1] != student_dim:
            raise ValueError(f"multilingual_distill: the teacher's embeddings have {labels.shape[1]} dims but "
                             f"the student's have {student_dim}; set objective.teacher to a model of the "
                             f"student's width (or leave it unset: the base model)")


def similarity_distill_loss(source: Tensor, translation: Tensor, teacher: Tensor) -> Tensor:
    """Pure form of :class:`SimilarityDistillLoss` on embeddings (B, D): see its docstring."""
    import torch.nn.functional as F

    s, t, g = (F.normalize(x, dim=-1) for x in (source, translation, teacher.detach()))
    target = g @ g.T
    return F.mse_loss(t @ s.T, target) + F.mse_loss(t @ t.T, target) + F.mse_loss(s @ s.T, target)


class SimilarityDistillLoss(MSELoss):
    """Distil the teacher's in-batch cosine structure instead of its coordinates (written here:
    sentence-transformers has no batch-relational distillation loss).

    With ``G`` the teacher's L2-normalized embeddings of the sources, ``s`` and ``t`` the student's
    normalized embeddings of sources and translations in the batch::

        loss = mse(t s^T, G G^T) + mse(t t^T, G G^T) + mse(s s^T, G G^T)

    The cross-lingual term asks cos(translation_i, source_j) to equal the teacher's cos(source_i,
    source_j), the monolingual terms keep both languages' similarity structure the teacher's. It
    follows similarity-preserving distillation (Tung & Mori, ICCV 2019: match the batch Gram
    matrices of teacher and student) applied to parallel data; it is not the loss of Reimers &
    Gurevych 2020. Why it exists: on a few hundred parallel sentences the coordinate MSE above pulled
    German embeddings toward the teacher's centroid (all-MiniLM-L6-v2, 500 STS-B train sentences with
    DeepL German, STS-B dev German Spearman fell from 74.0 to 47.0 in 2 epochs; docs/train.md), while
    matching the B x B similarity matrix gives each sentence B constraints instead of one target.
    Inputs and labels are those of ``multilingual_distill``.
    """

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None) -> Tensor:
        from sentence_transformers.sentence_transformer.losses.embed_distill import embed_columns

        source, translation = embed_columns(self.model, sentence_features)
        return self.distill_from_embeddings(source, translation, labels)

    def distill_from_embeddings(self, source: Tensor, translation: Tensor, labels: Tensor | None) -> Tensor:
        """The same loss on embeddings already computed (B, D) each."""
        if labels is None or labels.dim() != 2:
            raise ValueError("multilingual_distill (loss: similarity) needs the teacher's source embeddings "
                             "(B, D) as labels")
        return similarity_distill_loss(source, translation, labels)


class TranslationRankingLoss(nn.Module):
    """A multilingual distillation loss plus a weighted translation-ranking term (written here as the sum;
    the ranking term itself is sentence-transformers' ``MultipleNegativesRankingLoss``)::

        loss = distill(S(s), S(t); T(s)) + w * 1/2 * ( CE_i[ c * cos(t_i, s_j) ]_j  +  CE_i[ c * cos(s_i, t_j) ]_j )

    The ranking term is the bidirectional in-batch translation ranking of LaBSE (Feng et al. 2022,
    "Language-agnostic BERT Sentence Embedding") without LaBSE's additive margin (the paper subtracts
    m = 0.3 from the positive's cosine; sentence-transformers' loss has no margin, and none was tried),
    here ``MultipleNegativesRankingLoss(directions=("query_to_doc", "doc_to_query"), partition_mode=
    "per_direction")`` with the translation as query and its source as document, the batch gathered
    across workers. It is not part of Reimers & Gurevych 2020: the distillation terms say where a
    translation should lie relative to the teacher, the ranking term says that it must lie nearer its
    own source than any other sentence of the batch. Why it exists: on the quickstart's 622 Gemma
    translations it raised English-German dev STS from +4.3 to +10.7 over the distillation terms alone
    in one process, and in the quickstart's pipeline (weight 0.05, teacher targets) from +5.6 to +8.5
    on the whole dev split, at a cost in German (docs/train.md). Both terms share one forward pass over the two columns. With ``target: teacher``
    the documents are the teacher's embeddings of the sources ``T(s_j)`` instead of ``S(s_j)``: the
    ranking term then moves only the translations, and the English side is left to the distillation
    terms.

    Inputs and labels are those of ``multilingual_distill``.
    """

    def __init__(self, model: Any, distill: MultilingualDistillLoss | SimilarityDistillLoss, *, weight: float, scale: float = 20.0,
                 target: str = "student", gather_across_workers: bool = True) -> None:
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

        super().__init__()
        self.model = model
        self.distill = distill
        self.weight = weight
        self.target = target
        self.ranking = MultipleNegativesRankingLoss(model, scale=scale, directions=("query_to_doc", "doc_to_query"),
                                                    partition_mode="per_direction",
                                                    gather_across_devices=gather_across_workers)

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None) -> Tensor:
        from sentence_transformers.sentence_transformer.losses.embed_distill import embed_columns

        source, translation = embed_columns(self.model, sentence_features)
        distill = self.distill.distill_from_embeddings(source, translation, labels)
        docs = source if self.target == "student" else labels.to(translation.dtype)
        return distill + self.weight * self.ranking.compute_loss_from_embeddings([translation, docs], None)
