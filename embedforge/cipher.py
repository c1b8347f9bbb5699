"""CIPHER's math as pure torch functions (Pham et al., "Let Models Speak Ciphers", ICLR 2024).

* Expected embedding: instead of sampling a token, emit
  ``e_t = sum_v softmax(logits_t / T)_v * E[v] = softmax(logits_t / T) @ E`` (``T = 0``: the
  argmax row, i.e. greedy decoding in embedding space).
* Nearest-vocabulary decode: the token whose embedding row has the highest cosine similarity
  with ``e_t`` (for transcripts and answer extraction).
* Stop rule: generation stops when the nearest token of ``e_t`` is an end-of-sequence token
  (the EOS vector itself is not part of the message), or at the token limit.
* Receiver-matrix rule: agents must share a tokenizer (same vocabulary, same ids); when the
  receiver's embedding matrix differs from the sender's, the sender averages its distribution
  over the *receiver's* matrix, ``softmax(logits / T) @ E_receiver``, so the receiver gets
  vectors in its own input space.

Everything here takes tensors and returns tensors; the agent (``actors/cipher_agent.py``)
calls these functions step by step. It sits in ``embedforge`` because the agent (actors) and the
debate workflow both use it, and actors import nothing from workflows.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from embedforge.errors import ConfigError


class TokenizerMismatchError(ConfigError):
    """Two agents do not share a tokenizer, so vectors cannot be exchanged."""


def token_distribution(logits: Any, temperature: Any) -> Any:
    """softmax(logits / T) over the last dim, in float32; ``T = 0`` gives the argmax one-hot.

    ``temperature`` is a float or, for a batch [batch, vocab], one temperature per row (a sequence
    or a [batch] tensor), so agents at different temperatures can decode in one batch.
    """
    import torch

    logits = logits.float()
    if not isinstance(temperature, (int, float)):
        t = torch.as_tensor(temperature, dtype=torch.float32, device=logits.device).reshape(-1)
        if t.shape[0] != logits.shape[0] or logits.ndim != 2:
            raise ValueError(f"{t.shape[0]} temperatures for logits of shape {tuple(logits.shape)}")
        if bool((t < 0).any()):
            raise ValueError(f"temperatures must be >= 0, got {t.tolist()}")
        probs = torch.softmax(logits / t.clamp(min=1e-6)[:, None], dim=-1)
        greedy = t == 0
        if bool(greedy.any()):
            one_hot = torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
            probs = torch.where(greedy[:, None], one_hot, probs)
        return probs
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
    return torch.softmax(logits / temperature, dim=-1)


def expected_embedding(logits: Any, embedding_matrix: Any, temperature: Any) -> Any:
    """``softmax(logits / T) @ E``: [..., vocab] x [vocab, hidden] -> [..., hidden]."""
    probs = token_distribution(logits, temperature)
    if probs.shape[-1] != embedding_matrix.shape[0]:
        raise ValueError(f"logits have {probs.shape[-1]} entries but the embedding matrix has "
                         f"{embedding_matrix.shape[0]} rows; the agents do not share a vocabulary")
    return probs @ embedding_matrix.float()


def normalized_rows(embedding_matrix: Any) -> Any:
    """Unit-norm rows (for repeated cosine decoding against the same matrix)."""
    import torch

    return torch.nn.functional.normalize(embedding_matrix.float(), dim=-1)


def nearest_tokens(vectors: Any, embedding_matrix: Any, unit_rows: Any | None = None) -> Any:
    """Ids of the vocabulary rows nearest (cosine) to each vector: [..., hidden] -> [...]."""
    import torch

    rows = unit_rows if unit_rows is not None else normalized_rows(embedding_matrix)
    v = torch.nn.functional.normalize(vectors.float(), dim=-1)
    return (v @ rows.T).argmax(-1)


def is_stop(token_ids: Any, eos_ids: Iterable[int]) -> Any:
    """Boolean mask: which nearest tokens are end-of-sequence tokens."""
    import torch

    eos = torch.tensor(sorted(set(eos_ids)), dtype=token_ids.dtype, device=token_ids.device)
    return torch.isin(token_ids, eos)


def cipher_step(
    logits: Any,
    own_matrix: Any,
    temperature: Any,
    eos_ids: Iterable[int],
    receiver_matrices: dict[str, Any] | None = None,
    own_unit_rows: Any | None = None,
) -> dict[str, Any]:
    """One CIPHER step for a batch of last-position logits [batch, vocab].

    Returns ``embedding`` (fed back to the sender, over its own matrix), ``token`` (nearest own
    vocabulary id), ``stop`` (nearest is EOS) and ``messages`` (per receiver model, the same
    distribution averaged over that receiver's matrix; a receiver whose matrix *is* the sender's
    gets ``embedding`` itself, not a second product). ``temperature``: a float or one per row.
    """
    probs = token_distribution(logits, temperature)
    own = probs @ own_matrix.float()
    token = nearest_tokens(own, own_matrix, own_unit_rows)
    messages = {name: own if m is own_matrix else probs @ m.float() for name, m in (receiver_matrices or {}).items()}
    return {"embedding": own, "token": token, "stop": is_stop(token, eos_ids), "messages": messages}


def check_same_tokenizer(sender: Any, receiver: Any, sender_name: str = "sender", receiver_name: str = "receiver") -> None:
    """Raise :class:`TokenizerMismatchError` unless both tokenizers map every token to the same id."""
    a, b = sender.get_vocab(), receiver.get_vocab()
    if a == b and getattr(sender, "eos_token_id", None) == getattr(receiver, "eos_token_id", None):
        return
    only_a = len(a.keys() - b.keys())
    only_b = len(b.keys() - a.keys())
    moved = sum(1 for k in a.keys() & b.keys() if a[k] != b[k])
    raise TokenizerMismatchError(
        f"CIPHER agents must share a tokenizer: {sender_name!r} ({len(a)} tokens) and {receiver_name!r} "
        f"({len(b)} tokens) differ ({only_a} tokens only in the first, {only_b} only in the second, {moved} with "
        f"different ids, eos {getattr(sender, 'eos_token_id', None)} vs {getattr(receiver, 'eos_token_id', None)}); "
        "pair models of one family (same tokenizer), or use mode 'natural'"
    )
