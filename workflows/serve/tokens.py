"""Inputs to token ids, and token ids to embeddings: the two halves of an embedding request.

Text and token-id requests meet at token ids: texts are tokenized once, when the request
arrives (so over-long inputs are answered with 400 before they queue, and usage counts the
ids that are embedded); token-id requests are checked against the vocabulary. Batches of ids
from many requests are then padded and run through the sentence-transformers model in one
forward pass (:func:`forward_ids`): the same modules ``SentenceTransformer.encode`` runs, fed
the features its tokenizer would have produced (``tokenizer.pad``), longest inputs first so
each sub-batch pads little.

Over-length policy (``limits.long_inputs``): ``reject`` (default; OpenAI answers 400, TEI 413)
names the input and the limit; ``truncate`` (TEI's ``auto_truncate``) keeps the first
``max_tokens`` tokens of a text (the tokenizer keeps its closing special token) or the first
``max_tokens`` ids of a token-id input.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from workflows.serve.limits import check_token_ids, check_token_lengths


@dataclass
class Tokenized:
    ids: list[list[int]]
    tokens: int  # ids embedded (usage.prompt_tokens)
    seconds: float


def text_prompt(st_model: Any) -> str:
    """The prompt ``SentenceTransformer.encode`` prepends by default (the model's default prompt), or ''."""
    name = getattr(st_model, "default_prompt_name", None)
    return (getattr(st_model, "prompts", None) or {}).get(name, "") if name else ""


def to_token_ids(tokenizer: Any, inputs: Sequence[str] | Sequence[Sequence[int]], max_tokens: int,
                 long_inputs: str, vocab_size: int, prompt: str = "", model: str = "this model") -> Tokenized:
    """Token ids for ``inputs`` (texts or token-id lists) under the over-length policy."""
    started = time.perf_counter()
    if inputs and isinstance(inputs[0], str):
        texts = [prompt + t for t in inputs] if prompt else list(inputs)
        if long_inputs == "reject":
            ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
            check_token_lengths([len(x) for x in ids], max_tokens)
        else:
            ids = tokenizer(texts, add_special_tokens=True, truncation=True, max_length=max_tokens)["input_ids"]
    else:
        ids = [list(row) for row in inputs]
        check_token_ids(ids, vocab_size, f"model {model!r}")
        if long_inputs == "reject":
            check_token_lengths([len(x) for x in ids], max_tokens)
        else:
            ids = [row[:max_tokens] for row in ids]
    return Tokenized(ids, sum(len(x) for x in ids), time.perf_counter() - started)


def forward_ids(st_model: Any, rows: Sequence[Sequence[int]], batch_size: int, layers: int | None = None,
                threads: int | None = None) -> np.ndarray:
    """Sentence embeddings float32 [n, dim] (not normalized) of token-id rows, ``layers`` = early exit."""
    import torch

    from embedforge.elastic import truncated_layers

    if threads and torch.get_num_threads() != threads:  # per calling thread (OpenMP)
        torch.set_num_threads(threads)
    tokenizer = st_model.tokenizer
    device = st_model.device
    order = np.argsort([-len(r) for r in rows], kind="stable")
    out: np.ndarray | None = None
    with torch.inference_mode(), truncated_layers(st_model, layers):
        for start in range(0, len(rows), batch_size):
            idx = order[start:start + batch_size]
            features = tokenizer.pad({"input_ids": [list(rows[i]) for i in idx]}, padding=True, return_tensors="pt")
            features = {k: v.to(device) for k, v in features.items()}
            emb = st_model(features)["sentence_embedding"].float().cpu().numpy()
            if out is None:
                out = np.empty((len(rows), emb.shape[1]), dtype=np.float32)
            out[idx] = emb
    assert out is not None, "forward_ids needs at least one row"
    return out
