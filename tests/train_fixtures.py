"""A tiny random BERT sentence-transformers model (MiniLM's tokenizer) for fast training tests."""

from __future__ import annotations

from pathlib import Path

import pytest


def build_tiny_model(dest: Path, minilm: str, hidden: int = 32, layers: int = 2) -> str:
    """Save a random ``layers`` x ``hidden`` BERT with mean pooling as a SentenceTransformer folder."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(minilm)
    cfg = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=128)
    raw = dest / "raw"
    BertModel(cfg).save_pretrained(raw)
    tokenizer.save_pretrained(raw)
    model = SentenceTransformer(modules=[Transformer(str(raw), max_seq_length=64), Pooling(hidden, "mean")],
                                device="cpu")
    out = dest / "st"
    model.save(str(out))
    return str(out)


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory, minilm_path) -> str:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-bert"), minilm_path)
