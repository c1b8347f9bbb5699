"""Distillation from teacher distributions over candidates (the reward stage's LLM feedback).

For a query ``q`` with candidates ``c_1..c_k`` and a teacher distribution ``p`` over them::

    loss = T^2 * mean_q KL(p || softmax([cos(q, c_1), ..., cos(q, c_k)] / T))

This is sentence-transformers' ``DistillKLDivLoss`` (KL with ``batchmean``, the ``T^2`` factor of
Hinton et al. 2015 that keeps gradient magnitudes independent of ``T``) with cosine similarity.
The only addition: the reward stage stores teacher *probabilities* (``softmax(r / T_teacher)``),
while ``DistillKLDivLoss`` applies a softmax to its labels; passing ``log p`` makes that softmax
return ``p`` exactly, so the teacher's own temperature is not applied twice.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from sentence_transformers.sentence_transformer.losses import DistillKLDivLoss
from sentence_transformers.util import pairwise_cos_sim


class TeacherKLDivLoss(DistillKLDivLoss):
    """``DistillKLDivLoss`` on cosine similarity whose labels are teacher probabilities or logits."""

    def __init__(self, model: Any, temperature: float = 0.05, teacher_format: str = "probs") -> None:
        super().__init__(model, similarity_fct=pairwise_cos_sim, student_temperature=temperature,
                         teacher_temperature=1.0)
        if teacher_format not in ("probs", "logits"):
            raise ValueError(f"teacher_format must be 'probs' or 'logits', got {teacher_format!r}")
        self.teacher_format = teacher_format
        self._checked_teacher_scale = True  # its scale heuristic targets raw scores, not probabilities

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor) -> Tensor:
        if self.teacher_format == "probs":
            if labels.min() < 0 or not torch.allclose(labels.sum(dim=-1), labels.new_ones(labels.shape[0]),
                                                      atol=1e-3):
                raise ValueError("teacher probabilities must be >= 0 and sum to 1 per row; "
                                 "set teacher_format: logits for unnormalized teacher scores")
            labels = torch.log(labels.clamp_min(1e-12))
        return super().compute_loss_from_embeddings(embeddings, labels)

    def get_config_dict(self) -> dict[str, Any]:
        return {**super().get_config_dict(), "teacher_format": self.teacher_format}


def kl_distill_reference(query: Tensor, candidates: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """The formula above written out, for checking: query (B, D), candidates (B, k, D), teacher (B, k)."""
    sims = torch.nn.functional.cosine_similarity(query.unsqueeze(1), candidates, dim=-1) / temperature
    log_student = torch.log_softmax(sims, dim=-1)
    kl = (teacher * (torch.log(teacher.clamp_min(1e-12)) - log_student)).sum(dim=-1)
    return kl.mean() * temperature**2
