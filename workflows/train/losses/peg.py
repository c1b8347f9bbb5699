"""PEG's progressive learning (Wu et al. 2023, "Towards Robust Text Retrieval with Progressive
Learning", arXiv 2311.11691) on MultipleNegativesRankingLoss.

PEG trains InfoNCE over a very large batch (in-batch negatives gathered across devices) plus five
mined hard negatives per query, and "progressively adjusts the weights of samples contributing to
the loss ... based on the difficulty levels of negative samples", so the model attends to easy
samples first and hard ones later. The authors published weights but no training code, and the
paper's weighting formula is not reproduced here from its text; this module implements that
description as a focal-style schedule (hand-written, no library has it)::

    l_i   = CE([s(a_i, p_j) for all j] ++ [s(a_i, n_j) for all hard negatives], i)    (MNRL, scale s)
    d_i   = 1 - softmax(...)_i[positive]          the query's difficulty, detached, in [0, 1]
    lam   = strength * (2 t - 1),  t = step / (total_steps - 1)   from -strength to +strength
    w_i   = B * softmax_i(lam * d)                 detached; mean 1 over the batch
    loss  = mean_i w_i * l_i

At ``lam = 0`` (the middle of training, or ``strength = 0``) this is exactly sentence-transformers'
MNRL; early on easy queries (small ``d_i``) weigh more, late the hard ones. Negatives are gathered
across workers like ``MultipleNegativesRankingLoss(gather_across_devices=True)`` (the anchor stays
local, candidate order positives then negatives column by column); the weights' softmax runs over
the worker's own queries.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def progress_lambda(step: int, total_steps: int, strength: float) -> float:
    """``strength * (2t - 1)`` with ``t = step / (total_steps - 1)``: -strength at the first step, +strength at the last."""
    t = step / (total_steps - 1) if total_steps > 1 else 1.0
    return strength * (2.0 * min(max(t, 0.0), 1.0) - 1.0)


def progressive_infonce(anchors: Tensor, docs: list[Tensor], *, scale: float, lam: float,
                        offset: int = 0) -> tuple[Tensor, Tensor]:
    """PEG-weighted InfoNCE. anchors (B, D) local; ``docs`` = [positives, negatives_1, ...], each (N, D)
    over the global batch (N = B x workers), this worker's rows at ``offset``. Returns (loss, weights)."""
    B = anchors.shape[0]
    a = F.normalize(anchors, dim=-1)
    pool = F.normalize(torch.cat(docs, dim=0), dim=-1)
    logits = scale * a @ pool.T  # (B, N * (1 + n_neg))
    labels = offset + torch.arange(B, device=a.device)
    per_query = F.cross_entropy(logits, labels, reduction="none")
    with torch.no_grad():
        difficulty = 1.0 - torch.exp(-per_query)  # 1 - p(positive)
        weights = B * torch.softmax(lam * difficulty, dim=0)
    return (weights * per_query).mean(), weights


class ProgressiveMNRLLoss(nn.Module):
    """MNRL with PEG's easy-to-hard sample weighting; columns ``anchor, positive[, negative_1..n]``."""

    def __init__(self, model: Any, scale: float = 20.0, strength: float = 1.0,
                 gather_across_workers: bool = True) -> None:
        super().__init__()
        self.model = model
        self.scale = scale
        self.strength = strength
        self.gather_across_workers = gather_across_workers
        self.lam = -strength  # before the loop's first begin_step: the start of the schedule
        self.last_weights: Tensor | None = None

    def begin_step(self, step: int, total_steps: int, seed: int) -> None:
        del seed
        self.lam = progress_lambda(step, total_steps, self.strength)

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor | None = None) -> Tensor:
        from sentence_transformers.util.distributed import all_gather_with_grad, get_rank, is_dist_initialized

        anchors, docs = embeddings[0], list(embeddings[1:])
        offset = 0
        if self.gather_across_workers and is_dist_initialized():
            docs = [all_gather_with_grad(d) for d in docs]
            offset = get_rank() * anchors.shape[0]
        loss, self.last_weights = progressive_infonce(anchors, docs, scale=self.scale, lam=self.lam, offset=offset)
        return loss

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        embeddings = [self.model(f)["sentence_embedding"] for f in sentence_features]
        return self.compute_loss_from_embeddings(embeddings, labels)

    def get_config_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "strength": self.strength, "gather_across_workers": self.gather_across_workers}
