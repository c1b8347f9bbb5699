"""Distilled Sentence Embedding (DSE; Barkan et al. 2020, "Scalable Attentive Sentence-Pair Modeling
via Distilled Sentence Embedding", AAAI): teacher scores mixed with the gold labels.

DSE trains a siamese student on a cross-encoder teacher's outputs and the gold labels at once::

    loss = (1 - alpha) * L(student, gold) + alpha * L(student, teacher)

with ``L`` the same pair loss for both (here sentence-transformers' ``CosineSimilarityLoss``, an MSE
on cosine similarity, or ``CoSENTLoss``), labels ``(B, 2)`` = ``[teacher_score, gold]`` per pair.
Deviation, and why: the paper's student scores a pair with an MLP over ``[u, v, u*v, |u-v|]`` and
matches the teacher's logits; this student is the embedding model itself (a pair's score is the
cosine of its two embeddings, the quantity that is served), so teacher scores must be on the
gold's scale (in [0, 1] for MSE; any monotone scale for CoSENT). ``alpha = 1`` is pure distillation.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn


class MixedScoreDistillLoss(nn.Module):
    """``(1 - alpha) * base(pairs, gold) + alpha * base(pairs, teacher)``; labels (B, 2) or (B,) (teacher only)."""

    def __init__(self, model: Any, base: nn.Module, alpha: float) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"score_distill.alpha must be in [0, 1], got {alpha}")
        self.model = model
        self.base = base
        self.alpha = alpha

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor) -> Tensor:
        if labels.ndim == 1:
            if self.alpha < 1.0:
                raise ValueError("score_distill with alpha < 1 needs the gold labels too: set gold_column")
            return self.base.compute_loss_from_embeddings(embeddings, labels)
        if labels.ndim != 2 or labels.shape[1] != 2:
            raise ValueError(f"score_distill: labels must be (B, 2) = [teacher, gold], got {tuple(labels.shape)}")
        teacher, gold = labels[:, 0], labels[:, 1]
        loss = self.alpha * self.base.compute_loss_from_embeddings(embeddings, teacher) if self.alpha > 0 else 0.0
        if self.alpha < 1.0:
            loss = loss + (1.0 - self.alpha) * self.base.compute_loss_from_embeddings(embeddings, gold)
        return loss

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor) -> Tensor:
        embeddings = [self.model(f)["sentence_embedding"] for f in sentence_features]
        return self.compute_loss_from_embeddings(embeddings, labels)

    def get_config_dict(self) -> dict[str, Any]:
        return {"base": type(self.base).__name__, "alpha": self.alpha}
