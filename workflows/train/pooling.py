"""Choose a model's pooling: mean, CLS, last token (sentence-transformers' ``Pooling``) or the
trainable multi-layer attention pooling (:class:`embedforge.st_modules.MultiLayerAttentionPooling`).

    model = set_pooling(SentenceTransformer(path), "multilayer_attention")

The pooling module is replaced in place of the old one; modules after it (``Dense``,
``Normalize``) are kept. The multi-layer pooling needs every layer's output, so this turns on
``output_hidden_states`` in the transformer config, which is saved with the model and makes a
plain ``SentenceTransformer(path)`` produce them too.
"""

from __future__ import annotations

from typing import Any, Literal

from embedforge.st_modules import MultiLayerAttentionPooling, MultiLayerTrainablePooling

PoolingChoice = Literal["keep", "mean", "cls", "lasttoken", "multilayer_attention", "multilayer_trainable"]


def set_pooling(model: Any, mode: PoolingChoice, layer_summary: str = "mean", num_heads: int = 4,
                multilayer: Any = None) -> Any:
    """Return ``model`` with its pooling replaced by ``mode`` (``keep``: unchanged).

    ``multilayer``: a ``MultiLayerPoolingSettings`` for ``multilayer_trainable`` (None: its defaults).
    """
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    from embedforge.elastic import num_layers

    if mode == "keep":
        return model
    modules = list(model.children())
    idx = next((i for i, m in enumerate(modules) if isinstance(m, (Pooling, MultiLayerAttentionPooling, MultiLayerTrainablePooling))), None)
    dim = modules[0].get_embedding_dimension()
    if mode == "multilayer_attention":
        heads = num_heads if dim % num_heads == 0 else 1
        pooling = MultiLayerAttentionPooling(dim, num_layers(model), layer_summary=layer_summary, num_heads=heads)
        modules[0].auto_model.config.output_hidden_states = True
    elif mode == "multilayer_trainable":
        settings = {} if multilayer is None else multilayer.model_dump()
        pooling = MultiLayerTrainablePooling(dim, num_layers(model), **settings)
        modules[0].auto_model.config.output_hidden_states = True
    elif mode in ("mean", "cls", "lasttoken"):
        pooling = Pooling(dim, pooling_mode=mode)
        modules[0].auto_model.config.output_hidden_states = False
    else:
        raise ValueError(f"pooling {mode!r}: expected keep, mean, cls, lasttoken, multilayer_attention or "
                         "multilayer_trainable")
    if idx is None:
        modules.insert(1, pooling)
    else:
        modules[idx] = pooling
    new = SentenceTransformer(modules=modules, device=str(model.device))
    new.prompts = dict(model.prompts)
    new.default_prompt_name = model.default_prompt_name
    return new


__all__ = ["MultiLayerAttentionPooling", "MultiLayerTrainablePooling", "PoolingChoice", "set_pooling"]
