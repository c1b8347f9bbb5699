"""Decoder LLMs as sentence embedders: a causal-LM folder wrapped in sentence-transformers modules.

``build_decoder_embedder(path, model_config)`` returns a ``SentenceTransformer`` of
``Transformer`` (the decoder without its LM head, weights in float32 for training) and the
configured pooling:

* ``lasttoken``: the EOS token appended to every input (E5-Mistral, "LLMs are Also Effective
  Embedding Models"); sentence-transformers' ``Pooling`` finds the last real token for right or
  left padding. The EOS rule is written into the tokenizer (``add_eos_token``), so the saved
  folder appends it in ``SentenceTransformer.encode`` and in vLLM alike;
* ``mean``: sentence-transformers' masked mean;
* ``multilayer_trainable``: :class:`embedforge.st_modules.MultiLayerTrainablePooling`.

LoRA (``model.decoder.lora``) wraps the decoder in a peft ``PeftModel``; only the adapters and
the pooling train. :func:`save_embedder` writes a plain folder with the adapters merged
(``merge_and_unload`` on a copy), so ``SentenceTransformer(folder)`` and vLLM load it without
peft; :func:`trainable_state` / :func:`load_trainable_state` carry the adapters (and the
pooling) across a resume, rebuilt on the original base model.

Hand-written glue (sentence-transformers has no decoder-LLM builder): each step uses the
libraries' own pieces (``Transformer``, ``Pooling``, peft's ``get_peft_model``).
"""

from __future__ import annotations

import copy
import logging
from typing import Any

log = logging.getLogger(__name__)


def append_eos(tokenizer: Any) -> None:
    """Make ``tokenizer`` end every encoded input with its EOS token, keeping its BOS rule."""
    if tokenizer.eos_token_id is None:
        raise ValueError("model.decoder.append_eos: the tokenizer has no eos_token; set append_eos: false")
    probe = tokenizer("x")["input_ids"]
    starts_with_bos = tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id]
    if probe[-1:] == [tokenizer.eos_token_id]:
        return
    if not hasattr(type(tokenizer), "add_eos_token"):
        raise ValueError(f"model.decoder.append_eos: tokenizer {type(tokenizer).__name__} cannot be told to append "
                         "EOS (needs a fast tokenizer); set append_eos: false")
    tokenizer.add_bos_token = starts_with_bos
    tokenizer.add_eos_token = True
    ids = tokenizer("x")["input_ids"]
    if ids[-1:] != [tokenizer.eos_token_id] or (ids[:1] == [tokenizer.bos_token_id]) != starts_with_bos:
        raise ValueError(f"model.decoder.append_eos: the tokenizer still encodes 'x' as {ids}")


def build_decoder_embedder(path: str, config: Any, device: str = "cpu") -> Any:
    """The SentenceTransformer of a causal LM at ``path`` for a ``ModelConfig`` with ``decoder`` set."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    from embedforge.st_modules import MultiLayerTrainablePooling

    dec = config.decoder
    # Plain-text modality only: a tokenizer with a chat template otherwise makes sentence-transformers 6
    # render every input as a chat (SmolLM2's template adds a system prompt), which vLLM's embed does not do.
    transformer = Transformer(path, model_kwargs={"dtype": torch.float32},
                              modality_config={"text": {"method": "forward", "method_output_name": "last_hidden_state"}},
                              module_output_name="token_embeddings", max_seq_length=config.max_seq_length or 512)
    tok = transformer.tokenizer
    tok.padding_side = dec.padding_side
    if tok.pad_token is None:  # decoders often have none; padded positions are masked out anyway
        tok.pad_token = tok.eos_token
    if dec.append_eos:
        append_eos(tok)
    dim = transformer.get_embedding_dimension()
    if config.pooling in ("lasttoken", "mean"):
        pooling = Pooling(dim, pooling_mode=config.pooling)
    elif config.pooling == "multilayer_trainable":
        m = config.multilayer
        pooling = MultiLayerTrainablePooling(dim, transformer.auto_model.config.num_hidden_layers,
                                             layer_summary=m.layer_summary, num_latents=m.num_latents,
                                             num_heads=m.num_heads, head_dim=m.head_dim, ff_mult=m.ff_mult)
        transformer.auto_model.config.output_hidden_states = True
    else:
        raise ValueError(f"model.pooling {config.pooling!r}: a decoder embedder takes lasttoken, mean or "
                         "multilayer_trainable")
    if dec.gradient_checkpointing:
        transformer.auto_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if dec.lora is not None:
        from peft import LoraConfig, get_peft_model

        lora = dec.lora
        transformer.model = get_peft_model(transformer.auto_model, LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
            bias="none"))
    model = SentenceTransformer(modules=[transformer, pooling], device=device)
    model.prompts = dict(config.prompts)
    model.default_prompt_name = config.default_prompt_name
    return model


def is_lora(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model[0].auto_model, PeftModel)


def save_embedder(model: Any, path: str) -> None:
    """``model.save(path)``; a LoRA model is saved with its adapters merged (a plain transformers folder)."""
    if not is_lora(model):
        model.save(path)
        return
    transformer = model[0]
    peft_model = transformer.model
    merged = copy.deepcopy(peft_model).merge_and_unload()
    merged.config.use_cache = False
    transformer.model = merged
    try:
        model.save(path)
    finally:
        transformer.model = peft_model


def trainable_state(model: Any) -> dict[str, Any]:
    """The trainable tensors by name (adapters and pooling), to resume a LoRA run on its base model."""
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: Any, state: dict[str, Any]) -> None:
    """Put :func:`trainable_state` back; every trainable tensor must be there."""
    import torch

    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    unknown = [n for n in state if n not in params]
    if missing or unknown:
        raise ValueError(f"checkpoint's trainable state does not fit the model: missing {missing[:3]}, "
                         f"unknown {unknown[:3]}")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
