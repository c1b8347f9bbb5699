"""2D Matryoshka (2DMSE) over any embedding loss, with or without GradCache.

For a batch, with ``e_k`` the embeddings after running the first ``k`` transformer layers (the
full depth ``L`` included) and ``shrink(e, d)`` the first ``d`` dimensions re-normalized::

    loss = w_last * M(e_L) + (w_prior / |S|) * sum_{k in S} [ M(e_k) + w_kl * T * KL(softmax(e_L / T) || softmax(e_k / T)) ]
    M(e) = sum_{d in dims} w_d * base(shrink(e, d))

``S`` is a sample of ``n_layers_per_step`` depths from the configured grid (all when -1) and the
full-depth side of the KL is detached (it is the self-distillation teacher). This follows
sentence-transformers' ``Matryoshka2dLoss`` (= ``AdaptiveLayerLoss`` around ``MatryoshkaLoss``)
term for term; ``tests/test_losses.py`` checks equality with it when every layer is trained.

Sampling is reproducible and identical on every rank: the depths (and dims, when sampled) of
step ``s`` come from a generator seeded by ``(seed, s)`` (:func:`step_rng`), which the training
loop sets before each step (:func:`workflows.train.losses.steps.begin_step`). sentence-transformers
draws them from Python's global ``random``, which differs per process, so with gathered negatives
each rank's embeddings would come from a different depth in the same step.

``layer_weights="ese"`` (AnglE's Espresso Sentence Embeddings, Li et al. 2024, ``AngleESETrainer``
in SeanLee97/AnglE) trains every configured depth each step and weights depth ``k`` (layers run,
``0`` = the embedding output, the index AnglE uses into the hidden states) by
``1 / (1 + ln(1 + k))`` inside the mean over depths. AnglE's PCA alignment term is not included
(the KL self-distillation above takes its place), and the shallow depths train every dim of the
grid instead of one compression size.

Why hand-written: sentence-transformers implements depth by patching the Transformer module's
``forward`` during the loss call and rejects cached (GradCache) inner losses, whose second,
gradient-carrying forward pass runs later, inside ``backward()``, after the patch is gone. Here
depth is part of what one embedding pass returns: a single forward with hidden states yields the
pooled embedding of every sampled depth, stacked ``(batch, 1 + |S|, dim)``. GradCache then caches
gradients for that stacked tensor and its replay recomputes the same tensor, so both of its passes
stay correct; it also allows an explicit list of depths (the grid recorded in the model folder)
instead of "any layer".
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sentence_transformers.base.losses.gradcache import CachedLossMixin, RandContext, _create_minibatch


@contextlib.contextmanager
def hidden_states_on(st: Any) -> Iterator[None]:
    """Within the block the Transformer module also returns ``all_layer_embeddings``."""
    config = st[0].auto_model.config
    before = config.output_hidden_states
    config.output_hidden_states = True
    try:
        yield
    finally:
        config.output_hidden_states = before


def embed_depths(model: nn.Module, st: Any, features: dict[str, Tensor], depths: list[int]) -> Tensor:
    """Embeddings at the full depth and at each of ``depths``, stacked to ``(batch, 1 + len, dim)``.

    One forward pass through ``model`` (the DDP wrapper when there is one, so gradients sync);
    the modules after the Transformer (pooling, dense, normalize) then run again on layer ``k``'s
    hidden states, exactly what running only the first ``k`` layers would give them.
    """
    with hidden_states_on(st):
        out = model(features)
    full = out["sentence_embedding"]
    if not depths:
        return full.unsqueeze(1)
    hidden = out["all_layer_embeddings"]
    rest = list(st.children())[1:]
    embs = [full]
    for k in depths:
        feats = {key: v for key, v in out.items() if key not in ("sentence_embedding", "token_embeddings")}
        feats["token_embeddings"] = hidden[k]
        feats["all_layer_embeddings"] = hidden[: k + 1]
        for module in rest:
            feats = module(feats)
        embs.append(feats["sentence_embedding"])
    return torch.stack(embs, dim=1)


def step_rng(seed: int, step: int) -> random.Random:
    """The generator of step ``step``: a pure function of ``(seed, step)``, the same in every process.

    ``random.Random`` seeded with a string hashes it with SHA-512 (independent of PYTHONHASHSEED).
    """
    return random.Random(f"2dmse:{int(seed)}:{int(step)}")


def ese_weight(depth: int) -> float:
    """AnglE ESE's weight of the layer at hidden-state index ``depth``: ``1 / (1 + ln(1 + depth))``."""
    return 1.0 / (1.0 + math.log(1.0 + depth))


def shrink(emb: Tensor, dim: int) -> Tensor:
    return F.normalize(emb[..., :dim], p=2, dim=-1)


class Matryoshka2dGridLoss(nn.Module):
    """2DMSE around ``base`` (a sentence-transformers loss with ``compute_loss_from_embeddings``).

    ``depths`` are layer counts ``k < L`` (``0`` = the embedding layer's output); the full depth is
    always trained. ``dims`` are truncations.
    """

    def __init__(
        self,
        model: nn.Module,
        base: nn.Module,
        depths: list[int],
        dims: list[int],
        dim_weights: list[float] | None = None,
        n_layers_per_step: int = 1,
        n_dims_per_step: int = -1,
        last_layer_weight: float = 1.0,
        prior_layers_weight: float = 1.0,
        kl_div_weight: float = 1.0,
        kl_temperature: float = 0.3,
        layer_weights: str = "uniform",
        seed: int = 0,
    ) -> None:
        super().__init__()
        from workflows.train.losses import unwrap_model
        from embedforge.elastic import num_layers

        self.model = model
        self.base = base
        st = unwrap_model(model)
        full_depth, full_dim = num_layers(st), st.get_embedding_dimension()
        bad = [k for k in depths if not 0 <= k <= full_depth]
        if bad:
            raise ValueError(f"matryoshka2d.layers {bad} out of range: the model has {full_depth} layers")
        if full_dim is not None and any(d > full_dim for d in dims):
            raise ValueError(f"matryoshka2d.dims {dims} exceed the model's embedding dimension {full_dim}")
        self.depths = sorted(k for k in set(depths) if k != full_depth)
        weights = dim_weights or [1.0] * len(dims)
        self.dims, self.dim_weights = zip(*sorted(zip(dims, weights), reverse=True))
        self.n_layers_per_step = n_layers_per_step
        self.n_dims_per_step = n_dims_per_step
        self.last_layer_weight = last_layer_weight
        self.prior_layers_weight = prior_layers_weight
        self.kl_div_weight = kl_div_weight
        self.kl_temperature = kl_temperature
        if layer_weights not in ("uniform", "ese"):
            raise ValueError(f"matryoshka2d.layer_weights must be 'uniform' or 'ese', got {layer_weights!r}")
        if layer_weights == "ese" and 0 < n_layers_per_step < len(self.depths):
            raise ValueError("matryoshka2d.layer_weights 'ese' trains every depth each step; "
                             "set n_layers_per_step: -1")
        self.layer_weights = layer_weights
        self.seed = seed
        self.step = 0

    def begin_step(self, step: int, total_steps: int, seed: int) -> None:
        """Set the step (and run seed) whose generator the next forward pass samples from."""
        del total_steps
        self.step, self.seed = int(step), int(seed)

    @property
    def st(self) -> Any:
        from workflows.train.losses import unwrap_model

        return unwrap_model(self.model)

    def sample(self) -> tuple[list[int], list[int]]:
        """Depths and dim indices of the current step, from :func:`step_rng` (then the step advances,
        so a loss used without the loop's ``begin_step`` still draws a new sample per call)."""
        rng = step_rng(self.seed, self.step)
        self.step += 1
        n = self.n_layers_per_step
        depths = sorted(rng.sample(self.depths, n)) if 0 < n < len(self.depths) else list(self.depths)
        dim_idx = list(range(len(self.dims)))
        if 0 < self.n_dims_per_step < len(dim_idx):
            dim_idx = sorted(rng.sample(dim_idx, self.n_dims_per_step))
        return depths, dim_idx

    def depth_weight(self, depth: int, n_depths: int) -> float:
        """Weight of one sampled depth's terms: the mean over depths, times ESE's decay when set."""
        w = self.prior_layers_weight / n_depths
        return w * ese_weight(depth) if self.layer_weights == "ese" else w

    def _matryoshka(self, columns: list[Tensor], labels: Tensor | None, dim_idx: list[int]) -> Tensor:
        loss = 0.0
        for i in dim_idx:
            loss = loss + self.dim_weights[i] * self.base.compute_loss_from_embeddings(
                [shrink(c, self.dims[i]) for c in columns], labels)
        return loss

    def grid_loss(self, embs: list[Tensor], labels: Tensor | None, depths: list[int],
                  dim_idx: list[int] | None = None) -> Tensor:
        """The 2DMSE loss from per-column ``(batch, 1 + len(depths), dim)`` embeddings."""
        dim_idx = list(range(len(self.dims))) if dim_idx is None else dim_idx
        loss = self.last_layer_weight * self._matryoshka([e[:, 0] for e in embs], labels, dim_idx)
        if not depths:
            return loss
        T = self.kl_temperature
        if T > 0:
            teacher = F.softmax(torch.cat([e[:, 0] for e in embs]) / T, dim=-1).detach()
        for j, depth in enumerate(depths, start=1):
            layer = [e[:, j] for e in embs]
            # the KL keeps sentence-transformers' weighting (not divided by the number of depths);
            # ESE scales it by the layer's decay like AnglE scales its alignment term
            decay = ese_weight(depth) if self.layer_weights == "ese" else 1.0
            loss = loss + self._matryoshka(layer, labels, dim_idx) * self.depth_weight(depth, len(depths))
            if T > 0:
                kl = F.kl_div(F.log_softmax(torch.cat(layer) / T, dim=-1), teacher, reduction="batchmean")
                loss = loss + kl * T * self.kl_div_weight * decay
        return loss

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None) -> Tensor:
        depths, dim_idx = self.sample()
        embs = [embed_depths(self.model, self.st, f, depths) for f in sentence_features]
        return self.grid_loss(embs, labels, depths, dim_idx)

    def get_config_dict(self) -> dict[str, Any]:
        return {"base": type(self.base).__name__, "depths": self.depths, "dims": list(self.dims),
                "dim_weights": list(self.dim_weights), "n_layers_per_step": self.n_layers_per_step,
                "n_dims_per_step": self.n_dims_per_step, "last_layer_weight": self.last_layer_weight,
                "prior_layers_weight": self.prior_layers_weight, "kl_div_weight": self.kl_div_weight,
                "kl_temperature": self.kl_temperature, "layer_weights": self.layer_weights, "seed": self.seed}


class CachedMatryoshka2dGridLoss(CachedLossMixin, Matryoshka2dGridLoss):
    """:class:`Matryoshka2dGridLoss` with GradCache (Gao et al. 2021): memory bounded by ``mini_batch_size``.

    Step (1) embeds each mini-batch without gradients at all sampled depths at once; step (2)
    computes the grid loss over the whole batch and caches d loss / d embeddings; step (3), inside
    ``backward()``, re-embeds each mini-batch with the same depths and RNG state and back-propagates
    the cached gradients (sentence-transformers' ``CachedLossMixin`` does steps 1-3). The loss over
    the embeddings is not chunked like ``CachedMultipleNegativesRankingLoss`` does: its graph is
    ``O(batch^2)`` per grid cell, small next to the encoder activations GradCache removes.
    """

    def __init__(self, model: nn.Module, base: nn.Module, depths: list[int], dims: list[int],
                 mini_batch_size: int = 32, **kwargs: Any) -> None:
        Matryoshka2dGridLoss.__init__(self, model, base, depths, dims, **kwargs)
        self.mini_batch_size = mini_batch_size
        self.mini_batch_num_tokens = None
        self._depths: list[int] = []
        self._dim_idx: list[int] = []

    def embed_minibatch(self, sentence_feature: dict[str, Tensor], begin: int, end: int, with_grad: bool,
                        copy_random_state: bool, random_state: RandContext | None = None,
                        ) -> tuple[Tensor, RandContext | None]:
        grad_context = contextlib.nullcontext if with_grad else torch.no_grad
        rand_context = contextlib.nullcontext() if random_state is None else random_state
        mini = _create_minibatch(sentence_feature, begin, end)
        with rand_context, grad_context():
            random_state = RandContext(*mini.values()) if copy_random_state else None
            reps = embed_depths(self.model, self.st, mini, self._depths)
        return reps, random_state

    def calculate_loss(self, reps: list[list[Tensor]], labels: Tensor | None = None, *,
                       with_backward: bool = False) -> Tensor:
        embs = [torch.cat(column) for column in reps]
        loss = self.grid_loss(embs, labels, self._depths, self._dim_idx)
        if with_backward:
            loss.backward()
            loss = loss.detach()
        return loss

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None) -> Tensor:
        # The depths of this step are fixed before step (1); the replay in backward() reads them too.
        self._depths, self._dim_idx = self.sample()
        return self.forward_cached(list(sentence_features), labels)

    def get_config_dict(self) -> dict[str, Any]:
        return {**super().get_config_dict(), "mini_batch_size": self.mini_batch_size}
