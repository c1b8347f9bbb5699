"""Pooling choices: sentence-transformers' mean/CLS/last-token, and the trainable multi-layer
attention pooling, which saves and reloads through a plain ``SentenceTransformer(path)``."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.timeout(120)

TEXTS = ["The cat sits on the mat.", "A dog runs in the park", "short", "Stocks fell sharply on Monday."]


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory, minilm_path):
    from tests.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_pool"), minilm_path)


def load(path):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(path, device="cpu")


@pytest.mark.parametrize("mode", ["mean", "cls", "lasttoken"])
def test_standard_pooling_modes_use_sentence_transformers_pooling(tiny_path, mode):
    import torch

    from workflows.train.pooling import set_pooling

    st = set_pooling(load(tiny_path), mode)
    assert st[1].pooling_mode == mode
    features = st.preprocess(TEXTS)
    with torch.no_grad():
        tokens = st[0](dict(features))["token_embeddings"]
    emb = st.encode(TEXTS, convert_to_tensor=True)
    mask = features["attention_mask"]
    if mode == "cls":
        expected = tokens[:, 0]
    elif mode == "lasttoken":
        expected = tokens[torch.arange(len(TEXTS)), mask.sum(1) - 1]
    else:
        expected = (tokens * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
    torch.testing.assert_close(emb, expected, atol=1e-5, rtol=1e-5)


def test_multilayer_attention_pooling_trains_saves_and_reloads(tiny_path, tmp_path):
    import json

    import torch
    from sentence_transformers import SentenceTransformer

    from embedforge.st_modules import MultiLayerAttentionPooling, load_sentence_transformer
    from workflows.train.losses import CoSENTConfig, build_loss
    from workflows.train.pooling import set_pooling

    st = set_pooling(load(tiny_path), "multilayer_attention")
    pooling = st[1]
    assert isinstance(pooling, MultiLayerAttentionPooling)
    # starts as the base model's mean pooling (zero-initialized residual branch)
    base = set_pooling(load(tiny_path), "mean")
    np.testing.assert_allclose(st.encode(TEXTS), base.encode(TEXTS), atol=1e-5)

    # a few optimizer steps move the pooling's own parameters
    st.train()
    loss_fn = build_loss(CoSENTConfig(), st)
    opt = torch.optim.AdamW(st.parameters(), lr=1e-2)
    before = pooling.queries.detach().clone()
    for _ in range(3):
        feats = [st.preprocess(TEXTS[:2] * 2), st.preprocess(TEXTS[2:] * 2)]
        loss = loss_fn(feats, torch.tensor([0.9, 0.1, 0.5, 0.3]))
        opt.zero_grad()
        loss.backward()
        assert pooling.mlp[-1].weight.grad.abs().sum() > 0
        opt.step()
    assert not torch.equal(before, pooling.queries.detach())
    st.eval()
    trained = st.encode(TEXTS)
    assert np.abs(trained - base.encode(TEXTS)).max() > 1e-4  # the pooling now differs from mean

    st.save(str(tmp_path))
    modules = json.loads((tmp_path / "modules.json").read_text())
    assert modules[1]["type"] == "embedforge.st_modules.MultiLayerAttentionPooling"
    # sentence-transformers 6.2 imports classes outside its namespace only with trust_remote_code
    with pytest.raises(ValueError, match="trust_remote_code"):
        SentenceTransformer(str(tmp_path), device="cpu")
    for reloaded in (SentenceTransformer(str(tmp_path), device="cpu", trust_remote_code=True),
                     load_sentence_transformer(tmp_path, device="cpu")):
        assert isinstance(reloaded[1], MultiLayerAttentionPooling)
        np.testing.assert_allclose(reloaded.encode(TEXTS), trained, atol=1e-6)


def test_multilayer_pooling_follows_early_exit(tiny_path):
    """With fewer layers (elastic depth), the pooling attends over the layers it gets."""
    from embedforge.elastic import truncated_layers
    from workflows.train.pooling import set_pooling

    st = set_pooling(load(tiny_path), "multilayer_attention")
    with truncated_layers(st, 2):
        shallow = st.encode(TEXTS)
    assert shallow.shape == (len(TEXTS), 32) and np.isfinite(shallow).all()
    assert np.abs(shallow - st.encode(TEXTS)).max() > 1e-4


def test_multilayer_pooling_without_hidden_states_says_how_to_fix(tiny_path):
    from embedforge.st_modules import MultiLayerAttentionPooling

    pooling = MultiLayerAttentionPooling(32, 4)
    with pytest.raises(ValueError, match="output_hidden_states=True"):
        pooling({"token_embeddings": None, "attention_mask": None})
