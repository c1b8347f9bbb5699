"""Build the loss module of an objective config (sentence-transformers losses, plus 2DMSE and KL)."""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

log = logging.getLogger(__name__)


def base_loss(objective: Any, st: Any) -> nn.Module:
    """The sentence-transformers loss of ``objective`` on the unwrapped model (no 2DMSE)."""
    from sentence_transformers.sentence_transformer import losses as L

    kind = objective.kind
    if kind == "mnrl" and objective.progressive > 0:
        from workflows.train.losses.peg import ProgressiveMNRLLoss

        return ProgressiveMNRLLoss(st, scale=objective.scale, strength=objective.progressive,
                                   gather_across_workers=objective.gather_across_workers)
    if kind == "mnrl":
        return L.MultipleNegativesRankingLoss(st, scale=objective.scale,
                                              gather_across_devices=objective.gather_across_workers)
    if kind == "cached_mnrl":
        return L.CachedMultipleNegativesRankingLoss(st, scale=objective.scale,
                                                    mini_batch_size=objective.mini_batch_size,
                                                    gather_across_devices=objective.gather_across_workers)
    if kind == "cosent":
        return L.CoSENTLoss(st, scale=objective.scale)
    if kind == "angle":
        return L.AnglELoss(st, scale=objective.scale)
    if kind == "kl_distill":
        from workflows.train.losses.distill import TeacherKLDivLoss

        return TeacherKLDivLoss(st, temperature=objective.temperature, teacher_format=objective.teacher_format,
                                distill=objective.distill, student_temperature=objective.student_temperature,
                                teacher_temperature=objective.teacher_temperature,
                                distill_weight=objective.distill_weight,
                                contrastive_weight=objective.contrastive_weight,
                                gather_across_workers=objective.gather_across_workers)
    if kind == "score_distill":
        base = L.CosineSimilarityLoss(st) if objective.loss == "mse" else L.CoSENTLoss(st, scale=objective.scale)
        if objective.alpha < 1:
            from workflows.train.losses.dse import MixedScoreDistillLoss

            return MixedScoreDistillLoss(st, base, objective.alpha)
        return base
    if kind == "multilingual_distill":
        from workflows.train.losses.multilingual import (MultilingualDistillLoss, SimilarityDistillLoss,
                                                         TranslationRankingLoss)

        distill = SimilarityDistillLoss(st) if objective.loss == "similarity" else MultilingualDistillLoss(st)
        if objective.ranking_weight > 0:
            return TranslationRankingLoss(st, distill, weight=objective.ranking_weight, scale=objective.ranking_scale,
                                          target=objective.ranking_target,
                                          gather_across_workers=objective.gather_across_workers)
        return distill
    raise ValueError(f"unknown objective kind {kind!r}")


def _use_model(loss: nn.Module, st: nn.Module, model: nn.Module) -> None:
    """Point every (nested) loss at ``model`` (e.g. the DDP wrapper), bypassing nn.Module registration.

    Registering the wrapper as a submodule would make ``loss.state_dict()`` hold the weights twice;
    the losses only call it.
    """
    stack = [loss]
    while stack:
        module = stack.pop()
        stack.extend(child for child in module._modules.values()
                     if child is not None and child is not st and child is not model)
        if "model" in module._modules or "model" in module.__dict__:
            module._modules.pop("model", None)
            object.__setattr__(module, "model", model)


def build(objective: Any, model: nn.Module) -> nn.Module:
    from workflows.train.losses import unwrap_model
    from workflows.train.losses.grid import CachedMatryoshka2dGridLoss, Matryoshka2dGridLoss

    st = unwrap_model(model)
    grid = objective.matryoshka2d
    if grid is None:
        loss = base_loss(objective, st)
    else:
        kwargs = dict(dim_weights=grid.dim_weights, n_layers_per_step=grid.n_layers_per_step,
                      n_dims_per_step=grid.n_dims_per_step, last_layer_weight=grid.last_layer_weight,
                      prior_layers_weight=grid.prior_layers_weight, kl_div_weight=grid.kl_div_weight,
                      kl_temperature=grid.kl_temperature, layer_weights=grid.layer_weights)
        if objective.kind == "cached_mnrl":
            loss = CachedMatryoshka2dGridLoss(st, base_loss(_as_mnrl(objective), st), grid.layers, grid.dims,
                                              mini_batch_size=objective.mini_batch_size, **kwargs)
        else:
            loss = Matryoshka2dGridLoss(st, base_loss(objective, st), grid.layers, grid.dims, **kwargs)
    if model is not st:
        _use_model(loss, st, model)
    log.info("loss for %s: %s", objective.kind, type(loss).__name__)
    return loss


def _as_mnrl(objective: Any) -> Any:
    """The uncached MNRL config with the same settings (the per-cell loss inside cached 2DMSE)."""
    from workflows.train.losses import MNRLConfig

    return MNRLConfig(scale=objective.scale, num_negatives=objective.num_negatives,
                      gather_across_workers=objective.gather_across_workers)
