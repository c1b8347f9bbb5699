"""sentence-transformers modules that saved models reference by import path (``modules.json``).

They live in ``embedforge`` (an installed package) so a consumer can load a model trained here
without the training code on its path. sentence-transformers 6.2 imports a module class outside
its own namespace only with ``trust_remote_code=True``; :func:`load_sentence_transformer` passes
it exactly when every such class is one of ours (installed code, nothing from the model folder).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from sentence_transformers.base.modules.module import Module


def summarize_layer(hidden: Tensor, mask: Tensor, how: str) -> Tensor:
    """One vector per sequence from a ``(batch, seq, dim)`` layer output."""
    if how == "cls":
        return hidden[:, 0]
    if how == "lasttoken":
        # the last non-padding token, for right or left padding alike
        last = mask.shape[1] - 1 - mask.flip(1).float().argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


class _SavedPooling(Module):
    """What both pooling modules share: their width, and sentence-transformers' config + weights files."""

    embedding_dimension: int

    def get_embedding_dimension(self) -> int:
        return self.embedding_dimension

    def save(self, output_path: str, *args: Any, safe_serialization: bool = True, **kwargs: Any) -> None:
        self.save_config(output_path)
        self.save_torch_weights(output_path, safe_serialization=safe_serialization)

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", token: bool | str | None = None,
             cache_folder: str | None = None, revision: str | None = None, local_files_only: bool = False,
             **kwargs: Any) -> Module:
        hub = dict(subfolder=subfolder, token=token, cache_folder=cache_folder, revision=revision,
                   local_files_only=local_files_only)
        model = cls(**cls.load_config(model_name_or_path=model_name_or_path, **hub))
        return cls.load_torch_weights(model_name_or_path=model_name_or_path, model=model, **hub)


class MultiLayerAttentionPooling(_SavedPooling):
    """Multi-Layers Trainable Pooling: a learned query cross-attends over every layer's output.

    Tang & Yang 2024, "Pooling And Attention: What Are Effective Designs For LLM-Based Embedding
    Models?" (arXiv:2409.02727), Multi-Layers Trainable Pooling: take each layer's representation
    of the sequence (the paper uses the last (EOS) token of every layer of a decoder; encoders here
    may use ``cls`` or ``mean`` per layer), add a trainable per-layer embedding, and let a trainable
    query attend over the ``L + 1`` layer vectors (embedding output included) with multi-head
    cross-attention, followed by an MLP::

        h_l = summary(hidden_l) + E_layer[l]          l = 0..L
        z   = MLP(MHA(Q, [h_0..h_L], [h_0..h_L]))     Q: num_queries learned vectors, z averaged over them
        e   = summary(hidden_L) + z

    One deliberate difference: the residual ``summary(hidden_L) + z`` with the MLP's last layer
    initialized to zero, so fine-tuning starts from exactly the base model's own pooling instead of
    a random projection (the paper trains a fresh LLM embedder, where there is nothing to keep).

    Needs ``all_layer_embeddings`` from the Transformer module (``output_hidden_states=True`` in the
    transformer config, saved with the model). With fewer layers than at training (early exit, a
    2DMSE depth) it attends over the layers it gets.
    """

    config_keys: list[str] = ["embedding_dimension", "num_layers", "layer_summary", "num_heads", "num_queries"]

    def __init__(self, embedding_dimension: int, num_layers: int,
                 layer_summary: Literal["mean", "cls", "lasttoken"] = "mean",
                 num_heads: int = 4, num_queries: int = 1) -> None:
        super().__init__()
        if layer_summary not in ("mean", "cls", "lasttoken"):
            raise ValueError(f"layer_summary must be mean, cls or lasttoken, got {layer_summary!r}")
        if embedding_dimension % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide embedding_dimension={embedding_dimension}")
        self.embedding_dimension = embedding_dimension
        self.num_layers = num_layers
        self.layer_summary = layer_summary
        self.num_heads = num_heads
        self.num_queries = num_queries
        d = embedding_dimension
        self.layer_embeddings = nn.Parameter(torch.zeros(num_layers + 1, d))
        self.queries = nn.Parameter(torch.randn(num_queries, d) * d**-0.5)
        self.attention = nn.MultiheadAttention(d, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, features: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        layers = features.get("all_layer_embeddings")
        if layers is None:
            raise ValueError("MultiLayerAttentionPooling needs all layers' outputs: set output_hidden_states=True "
                             "in the transformer config (embedforge's set_pooling does)")
        if len(layers) > self.num_layers + 1:
            raise ValueError(f"got {len(layers)} hidden states, but this pooling was built for "
                             f"{self.num_layers} layers (+ the embedding output)")
        mask = features["attention_mask"]
        h = torch.stack([summarize_layer(x, mask, self.layer_summary) for x in layers], dim=1)  # (B, L+1, d)
        h = h + self.layer_embeddings[: h.shape[1]].to(h.dtype)
        q = self.queries.to(h.dtype).unsqueeze(0).expand(h.shape[0], -1, -1)
        z, _ = self.attention(q, h, h, need_weights=False)
        z = self.mlp(self.norm(z)).mean(dim=1)
        features["sentence_embedding"] = summarize_layer(layers[-1], mask, self.layer_summary) + z
        return features


class GEGLU(nn.Module):
    """GELU-gated linear unit: ``x * gelu(gate)`` over the two halves of the last dimension."""

    def forward(self, x: Tensor) -> Tensor:
        x, gate = x.chunk(2, dim=-1)
        return x * torch.nn.functional.gelu(gate)


def latent_cross_attention(latents: Tensor, context: Tensor, to_q: nn.Linear, to_kv: nn.Linear, to_out: nn.Linear,
                           num_heads: int) -> Tensor:
    """Multi-head attention of ``latents`` (B, n, d) over ``context`` (B, L, d), no mask: ``to_out(softmax(QK^T /
    sqrt(head_dim)) V)`` with Q from the latents and K, V from the context."""
    q = to_q(latents)
    k, v = to_kv(context).chunk(2, dim=-1)
    b = q.shape[0]
    q, k, v = (t.reshape(b, t.shape[1], num_heads, -1).transpose(1, 2) for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return to_out(out.transpose(1, 2).reshape(b, latents.shape[1], -1))


class MultiLayerTrainablePooling(_SavedPooling):
    """Multi-Layers Trainable Pooling as the paper's official code computes it.

    Tang & Yang 2024, "Pooling And Attention: What Are Effective Designs For LLM-Based Embedding
    Models?" (arXiv:2409.02727); code: yixuantt/PoolingAndAttn, ``pooling_layers/
    MultiLayersTrainablePooling.py`` (``PerceiverResampler``) fed by ``model3_trainer.py``::

        h_l = summary(hidden_l) + P[l]                        l = 1..L (the embedding output is left out)
        x   = latents                                          (n, d) learned, N(0, 1) at init
        x   = Attn(q = LN_q(x), k = v = LN_h([h_1..h_L])) + x   multi-head, no bias, no mask
        x   = FF(LN_f(x)) + x                                  FF: Linear(d, 2 m d) -> GEGLU -> Linear(m d, d)
        e   = normalize(mean over the n latents of x)

    ``summary`` is the last token of each layer (``hidden_states[l][:, -1]`` in the official code,
    which relies on left padding; here the last non-padding token, right or left padding alike),
    or, as an option that is **not** the paper's, the masked mean over the layer's tokens.
    ``P`` is the official code's trainable layer-position embedding (``pos_emb``).

    Deviation, for CPU-sized models: the official module hard-codes 32 heads of 2048 dimensions
    (an inner width of 65,536: about 150M parameters on a 576-wide model, more than SmolLM2-135M
    itself). Here ``num_heads`` x ``head_dim`` defaults to 8 x 64, the official ``Attention``
    class's own defaults; pass ``num_heads=32, head_dim=2048`` for the resampler's values.
    ``num_latents`` defaults to the official 768.

    Needs ``all_layer_embeddings`` (``output_hidden_states=True`` in the transformer config, which
    embedforge's ``set_pooling`` sets and the saved config keeps). vLLM's pooling runner cannot
    run this module: the serving app says so and serves such a model with sentence-transformers.
    """

    config_keys: list[str] = ["embedding_dimension", "num_layers", "layer_summary", "num_latents", "num_heads",
                              "head_dim", "ff_mult", "normalize"]

    def __init__(self, embedding_dimension: int, num_layers: int,
                 layer_summary: Literal["lasttoken", "mean"] = "lasttoken", num_latents: int = 768,
                 num_heads: int = 8, head_dim: int = 64, ff_mult: int = 4, normalize: bool = True) -> None:
        super().__init__()
        if layer_summary not in ("lasttoken", "mean"):
            raise ValueError(f"layer_summary must be lasttoken (the paper's) or mean, got {layer_summary!r}")
        for name, value in (("num_layers", num_layers), ("num_latents", num_latents), ("num_heads", num_heads),
                            ("head_dim", head_dim), ("ff_mult", ff_mult)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.embedding_dimension, self.num_layers, self.layer_summary = embedding_dimension, num_layers, layer_summary
        self.num_latents, self.num_heads, self.head_dim = num_latents, num_heads, head_dim
        self.ff_mult, self.normalize = ff_mult, normalize
        d, inner = embedding_dimension, num_heads * head_dim
        self.latents = nn.Parameter(torch.randn(num_latents, d))
        self.layer_embeddings = nn.Embedding(num_layers, d)
        self.norm_latents = nn.LayerNorm(d)
        self.norm_layers = nn.LayerNorm(d)
        self.to_q = nn.Linear(d, inner, bias=False)
        self.to_kv = nn.Linear(d, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, d, bias=False)
        self.norm_ff = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, d * ff_mult * 2), GEGLU(), nn.Linear(d * ff_mult, d))

    def pool(self, layers: list[Tensor] | tuple[Tensor, ...], mask: Tensor) -> Tensor:
        """Sentence embeddings (B, d) from the hidden states of layers 1..L (each (B, seq, d))."""
        if len(layers) > self.num_layers:
            raise ValueError(f"got {len(layers)} layer outputs, but this pooling was built for {self.num_layers}")
        h = torch.stack([summarize_layer(x, mask, self.layer_summary) for x in layers], dim=1)  # (B, L, d)
        h = h + self.layer_embeddings.weight[: h.shape[1]].to(h.dtype)
        x = self.latents.to(h.dtype).unsqueeze(0).expand(h.shape[0], -1, -1)
        x = latent_cross_attention(self.norm_latents(x), self.norm_layers(h), self.to_q, self.to_kv, self.to_out,
                                   self.num_heads) + x
        x = self.ff(self.norm_ff(x)) + x
        x = x.mean(dim=1)
        return torch.nn.functional.normalize(x, p=2, dim=-1) if self.normalize else x

    def forward(self, features: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        layers = features.get("all_layer_embeddings")
        if layers is None:
            raise ValueError("MultiLayerTrainablePooling needs all layers' outputs: set output_hidden_states=True "
                             "in the transformer config (embedforge's set_pooling does)")
        features["sentence_embedding"] = self.pool(list(layers)[1:], features["attention_mask"])
        return features


def module_types(model_dir: str | Path) -> list[str]:
    """The module classes a saved sentence-transformers folder names in ``modules.json``."""
    p = Path(model_dir, "modules.json")
    return [m["type"] for m in json.loads(p.read_text())] if p.is_file() else []


def load_sentence_transformer(model_dir: str | Path, **kwargs: Any) -> Any:
    """``SentenceTransformer(model_dir, **kwargs)``, allowing this package's module classes.

    ``trust_remote_code`` is set only when the folder uses one of our classes and nothing outside
    sentence-transformers and this module, so no code is ever imported from the folder itself.
    """
    from sentence_transformers import SentenceTransformer

    if "trust_remote_code" not in kwargs:
        types = module_types(model_dir) if Path(model_dir).is_dir() else []
        ours = any(t.startswith(f"{__name__}.") for t in types)
        kwargs["trust_remote_code"] = ours and all(
            t.startswith(("sentence_transformers.", f"{__name__}.")) for t in types)
    return SentenceTransformer(str(model_dir), **kwargs)
