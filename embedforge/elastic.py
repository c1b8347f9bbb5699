"""The two elastic axes of a 2D Matryoshka (2DMSE) embedder: depth (layers) and width (dims).

* depth: run only the first ``k`` transformer layers and pool their output (early exit);
* width: keep the first ``d`` dimensions and L2-renormalize.

A trained model records its grid in ``elastic_grid.json`` beside its weights; servers and
evaluators read it with :func:`read_grid`. Hand-written because sentence-transformers only
truncates layers inside its AdaptiveLayerLoss during training, not at inference.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

GRID_FILE = "elastic_grid.json"


def layer_list(st_model: Any):
    """The ``nn.ModuleList`` of transformer blocks inside a SentenceTransformer."""
    import torch

    auto = st_model[0].auto_model
    n = getattr(auto.config, "num_hidden_layers", None)
    for candidate in ("encoder.layer", "layers", "model.layers", "transformer.layer", "h"):
        obj = auto
        for part in candidate.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, torch.nn.ModuleList) and (n is None or len(obj) == n):
            return obj, candidate
    raise ValueError(f"cannot find the transformer layer list of {type(auto).__name__}")


def num_layers(st_model: Any) -> int:
    return len(layer_list(st_model)[0])


@contextlib.contextmanager
def truncated_layers(st_model: Any, k: int | None) -> Iterator[None]:
    """Within the block, the model runs only its first ``k`` layers (None or full: unchanged)."""
    import torch

    layers, path = layer_list(st_model)
    if k is None or k >= len(layers):
        yield
        return
    if k < 1:
        raise ValueError(f"layers must be >= 1, got {k}")
    parent = st_model[0].auto_model
    *head, last = path.split(".")
    for part in head:
        parent = getattr(parent, part)
    setattr(parent, last, torch.nn.ModuleList(list(layers)[:k]))
    try:
        yield
    finally:
        setattr(parent, last, layers)


def truncate_dims(emb: np.ndarray, dims: int | None, normalize: bool = True) -> np.ndarray:
    """Matryoshka truncation to the first ``dims`` dimensions, then L2 renormalization."""
    if dims is not None and dims < emb.shape[-1]:
        emb = emb[..., :dims]
    if normalize:
        norm = np.linalg.norm(emb, axis=-1, keepdims=True)
        emb = emb / np.clip(norm, 1e-12, None)
    return emb


def write_grid(model_dir: str | Path, layers: list[int], dims: list[int]) -> None:
    Path(model_dir, GRID_FILE).write_text(json.dumps({"layers": sorted(layers), "dims": sorted(dims)}, indent=2))


def read_grid(model_dir: str | Path) -> dict[str, list[int]] | None:
    p = Path(model_dir, GRID_FILE)
    return json.loads(p.read_text()) if p.is_file() else None
