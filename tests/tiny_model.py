"""A tiny random BERT sentence-transformer (4 layers, width 32, no dropout) for fast loss tests."""

from __future__ import annotations

from pathlib import Path


def build_tiny_model(out_dir: str | Path, tokenizer_path: str, layers: int = 4, width: int = 32) -> str:
    """Write a randomly initialized BERT with the tokenizer of ``tokenizer_path`` as an ST folder."""
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    out = Path(out_dir)
    hf_dir = out / "hf"
    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=width, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=2 * width,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=128)
    transformers.BertModel(config, add_pooling_layer=False).save_pretrained(hf_dir)
    transformers.AutoTokenizer.from_pretrained(tokenizer_path).save_pretrained(hf_dir)
    st = SentenceTransformer(modules=[Transformer(str(hf_dir), max_seq_length=32), Pooling(width, "mean")],
                             device="cpu")
    st.save(str(out / "st"))
    return str(out / "st")
