"""LLM-Embedder's distillation from LLM feedback (Zhang et al. 2023, "Retrieve Anything To Augment
Large Language Models"), as FlagEmbedding's ``research/llm_embedder`` computes it.

For a query ``q`` with candidates ``c_1..c_k`` (``c_1`` the gold passage), teacher scores ``r``
(the reward stage's rewards; it stores ``p = softmax(r / T_r)``, and ``log p`` gives back the same
softmax) and ``s_j = cos(q, c_j) / tau`` (``tau`` = FlagEmbedding's ``cos_temperature``, 0.01)::

    kl:      L_d = KL(softmax(r / T_t) || softmax(s / T_s))                    (batchmean, own k only)
    stable:  L_d = mean_q sum_i softmax(r)_i * CE(S_q + M_i, i)                (rank-based)
    contrastive: L_c = mean_q CE(S_q, c_1)                                     (InfoNCE)
    loss = w_c * L_c + w_d * L_d   when both are on; L_d or L_c alone otherwise

``S_q`` are ``q``'s scores against every candidate of every query of the global batch (in-batch
and cross-worker negatives: candidates are all-gathered with gradient, as FlagEmbedding's
``negative_cross_device``); ``M_i`` masks (to the dtype's minimum) ``q``'s own candidates
``c_1..c_{i-1}``, so rank ``i``'s cross-entropy competes against the lower-ranked candidates and
every other query's candidates. For the stable form FlagEmbedding's data loader sorts the
negatives ``c_2..c_k`` by teacher score, descending, keeping the gold passage first; this loss does
that sort itself. The stable form's teacher weights carry no temperature, as in FlagEmbedding.

No ``T^2`` factor (Hinton et al.'s gradient correction, used by sentence-transformers'
``DistillKLDivLoss``): FlagEmbedding has none, and with ``tau`` = 0.01 it would shrink the
gradient ~10^4-fold. Hand-written because no sentence-transformers loss has the rank-based form
or the gathered candidate pool; the formulas are checked against hand computations in
``tests/test_fidelity_losses.py``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def teacher_logits(labels: Tensor, teacher_format: str) -> Tensor:
    """Teacher scores whose softmax is the teacher distribution (probabilities -> their log)."""
    if teacher_format == "probs":
        if labels.min() < 0 or not torch.allclose(labels.sum(dim=-1), labels.new_ones(labels.shape[0]), atol=1e-3):
            raise ValueError("teacher probabilities must be >= 0 and sum to 1 per row; "
                             "set teacher_format: logits for unnormalized teacher scores")
        return torch.log(labels.clamp_min(1e-12))
    if teacher_format == "logits":
        return labels
    raise ValueError(f"teacher_format must be 'probs' or 'logits', got {teacher_format!r}")


def sort_negatives_by_teacher(candidates: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """Reorder ``c_2..c_k`` of each row by teacher score, descending (``c_1``, the gold, stays first).

    candidates (B, k, D), teacher (B, k) -> both reordered the same way.
    """
    order = torch.argsort(teacher[:, 1:], dim=1, descending=True, stable=True) + 1
    order = torch.cat([torch.zeros_like(order[:, :1]), order], dim=1)
    return (torch.gather(candidates, 1, order.unsqueeze(-1).expand_as(candidates)),
            torch.gather(teacher, 1, order))


def llm_embedder_loss(query: Tensor, candidates: Tensor, teacher: Tensor, *, cos_temperature: float = 0.01,
                      student_temperature: float = 1.0, teacher_temperature: float = 1.0, distill: str = "kl",
                      distill_weight: float = 1.0, contrastive_weight: float = 0.0,
                      pool: Tensor | None = None, offset: int = 0) -> Tensor:
    """The loss above. query (B, D), candidates (B, k, D), teacher (B, k) scores (softmax = teacher).

    ``pool`` (M, D): every candidate of the global batch, query-major (default: this batch's own,
    ``candidates.reshape(B * k, D)``); ``offset``: index in ``pool`` of this batch's first candidate.
    ``distill``: ``kl``, ``stable`` or ``none``; candidates must already be in the order the loss
    reads (for ``stable``: gold first, then by teacher score, see :func:`sort_negatives_by_teacher`).
    """
    B, k, _ = candidates.shape
    q = F.normalize(query, dim=-1)
    c = F.normalize(candidates, dim=-1)
    keys = c.reshape(B * k, -1) if pool is None else F.normalize(pool, dim=-1)
    own = offset + torch.arange(B, device=q.device) * k  # index of each query's c_1 in the pool
    do_distill = distill != "none" and distill_weight > 0
    do_contrastive = contrastive_weight > 0
    if not (do_distill or do_contrastive):
        raise ValueError("kl_distill: neither distillation nor the contrastive term is on; "
                         "set distill_weight > 0 (with distill kl or stable) or contrastive_weight > 0")
    scores = q @ keys.T / cos_temperature  # (B, M)
    distill_loss = scores.new_zeros(())
    if do_distill and distill == "kl":
        own_scores = torch.einsum("bd,bkd->bk", q, c) / cos_temperature
        log_student = F.log_softmax(own_scores / student_temperature, dim=-1)
        target = F.softmax(teacher / teacher_temperature, dim=-1)
        distill_loss = F.kl_div(log_student, target, reduction="batchmean")
    elif do_distill and distill == "stable":
        target = F.softmax(teacher, dim=-1)
        mask = torch.zeros_like(scores)
        for i in range(k):
            ce = F.cross_entropy(scores + mask, own + i, reduction="none")
            distill_loss = distill_loss + (target[:, i] * ce).mean()
            mask = mask.scatter(1, (own + i).unsqueeze(1), torch.finfo(scores.dtype).min)
    elif do_distill:
        raise ValueError(f"distill must be 'kl', 'stable' or 'none', got {distill!r}")
    if not do_contrastive:
        return distill_loss
    contrastive_loss = F.cross_entropy(scores, own)
    if not do_distill:
        return contrastive_loss
    return contrastive_weight * contrastive_loss + distill_weight * distill_loss


class TeacherKLDivLoss(nn.Module):
    """LLM-Embedder's distillation loss on a SentenceTransformer: columns ``query, candidate_1..k``,
    labels the ``(B, k)`` teacher values (probabilities or logits)."""

    def __init__(self, model: Any, temperature: float = 0.01, teacher_format: str = "probs", *,
                 distill: str = "kl", student_temperature: float = 1.0, teacher_temperature: float = 1.0,
                 distill_weight: float = 1.0, contrastive_weight: float = 0.0,
                 gather_across_workers: bool = True) -> None:
        super().__init__()
        if teacher_format not in ("probs", "logits"):
            raise ValueError(f"teacher_format must be 'probs' or 'logits', got {teacher_format!r}")
        if distill not in ("kl", "stable", "none"):
            raise ValueError(f"distill must be 'kl', 'stable' or 'none', got {distill!r}")
        self.model = model
        self.temperature = temperature
        self.teacher_format = teacher_format
        self.distill = distill
        self.student_temperature = student_temperature
        self.teacher_temperature = teacher_temperature
        self.distill_weight = distill_weight
        self.contrastive_weight = contrastive_weight
        self.gather_across_workers = gather_across_workers

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor) -> Tensor:
        from sentence_transformers.util.distributed import all_gather_with_grad, get_rank, is_dist_initialized

        query, candidates = embeddings[0], torch.stack(embeddings[1:], dim=1)
        if labels.shape != candidates.shape[:2]:
            raise ValueError(f"kl_distill: {candidates.shape[1]} candidate columns but teacher values of shape "
                             f"{tuple(labels.shape)}; give one teacher value per candidate")
        teacher = teacher_logits(labels, self.teacher_format)
        if self.distill == "stable":
            candidates, teacher = sort_negatives_by_teacher(candidates, teacher)
        pool, offset = None, 0
        uses_pool = self.distill == "stable" or self.contrastive_weight > 0
        if uses_pool and self.gather_across_workers and is_dist_initialized():
            B, k, D = candidates.shape
            pool = all_gather_with_grad(candidates.reshape(B * k, D))
            offset = get_rank() * B * k
        return llm_embedder_loss(query, candidates, teacher, cos_temperature=self.temperature,
                                 student_temperature=self.student_temperature,
                                 teacher_temperature=self.teacher_temperature, distill=self.distill,
                                 distill_weight=self.distill_weight, contrastive_weight=self.contrastive_weight,
                                 pool=pool, offset=offset)

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor) -> Tensor:
        embeddings = [self.model(f)["sentence_embedding"] for f in sentence_features]
        return self.compute_loss_from_embeddings(embeddings, labels)

    def get_config_dict(self) -> dict[str, Any]:
        return {"cos_temperature": self.temperature, "teacher_format": self.teacher_format, "distill": self.distill,
                "student_temperature": self.student_temperature, "teacher_temperature": self.teacher_temperature,
                "distill_weight": self.distill_weight, "contrastive_weight": self.contrastive_weight,
                "gather_across_workers": self.gather_across_workers}


def kl_distill_reference(query: Tensor, candidates: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """The ``kl`` form written out with loops, for checking: query (B, D), candidates (B, k, D), teacher (B, k)
    probabilities; student and teacher temperatures 1 (FlagEmbedding's defaults)."""
    total = 0.0
    for b in range(query.shape[0]):
        sims = torch.stack([F.cosine_similarity(query[b], cand, dim=0) for cand in candidates[b]]) / temperature
        log_student = sims - torch.logsumexp(sims, dim=0)
        total = total + (teacher[b] * (torch.log(teacher[b].clamp_min(1e-12)) - log_student)).sum()
    return total / query.shape[0]
