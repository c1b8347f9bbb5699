"""Serving decoder embedders: which folders vLLM's pooling runner can serve, and one real Serve app
over real HTTP with a SmolLM2 embedder on the vLLM backend, the same folder on sentence-transformers,
an encoder beside them and a multi-layer-pooling model that falls back to sentence-transformers."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest

from embedforge.config import build_config
from embedforge.errors import ConfigError
from workflows.serve.config import ServeConfig

TEXTS = ["A man is playing a guitar.", "The stock market fell sharply today.", "Ein Hund rennt im Park."]
STS_PROMPT = "Instruct: Retrieve semantically similar text.\nQuery: "


def _export(dest: Path, smollm_path: str, pooling: str) -> str:
    """A SmolLM2 embedder folder as training exports it: LoRA adapters (non-zero) merged into the weights."""
    import torch

    from workflows.train.config import ModelConfig
    from workflows.train.decoder import build_decoder_embedder, save_embedder

    cfg = ModelConfig.model_validate({
        "base": smollm_path, "pooling": pooling, "max_seq_length": 64, "decoder": {"lora": {"r": 4}},
        "multilayer": {"num_latents": 8, "num_heads": 2, "head_dim": 32},
        "prompts": {"sts": STS_PROMPT}, "default_prompt_name": "sts"})
    model = build_decoder_embedder(smollm_path, cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    save_embedder(model, str(dest))
    return str(dest)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, smollm_path):
    tmp = tmp_path_factory.mktemp("llm-serve")
    return {"lasttoken": _export(tmp / "smol-lasttoken", smollm_path, "lasttoken"),
            "multilayer": _export(tmp / "smol-multilayer", smollm_path, "multilayer_trainable")}


# ---------------------------------------------------------------- no Ray


@pytest.mark.timeout(300)
def test_vllm_pooling_support_per_folder(exported, minilm_path, tmp_path):
    from actors.vllm_embedder import vllm_pooling_support

    assert vllm_pooling_support(exported["lasttoken"]) is None
    assert vllm_pooling_support(minilm_path) is None
    assert "custom or trainable pooling" in vllm_pooling_support(exported["multilayer"])
    assert "no modules.json" in vllm_pooling_support(tmp_path)


def test_backends_must_name_served_models():
    with pytest.raises(ConfigError, match=r"backends names \['nope'\], which are not in models"):
        build_config(ServeConfig, {"models": {"a": "all-minilm-l6-v2"}, "backends": {"nope": "vllm"},
                                   "auth": {"mode": "disabled"}})


# ---------------------------------------------------------------- a real app over HTTP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(ray_local, exported, minilm_path):
    from ray import serve

    from workflows.serve.app import backend_fallbacks, build_app
    from workflows.serve.run import wait_healthy

    port = _free_port()
    config = build_config(ServeConfig, {
        "models": {"smol-vllm": exported["lasttoken"], "smol-st": exported["lasttoken"], "minilm": minilm_path,
                   "smol-multilayer": exported["multilayer"]},
        "backends": {"smol-vllm": "vllm", "smol-multilayer": "vllm"},
        "vllm": {"dtype": "float32"},
        "auth": {"mode": "disabled"}, "http": {"host": "127.0.0.1", "port": port},
        "limits": {"max_tokens_per_input": 64},
        "batching": {"max_models_per_replica": 4},
        "autoscaling": {"min_replicas": 1, "max_replicas": 1},
        "model_deployment": {"num_cpus": 1, "torch_threads": 1},
        "serve": {"app_name": "llm"}})
    fallbacks = backend_fallbacks(config)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(config), name="llm", route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, 180)
        yield {"url": url, "fallbacks": fallbacks}
    finally:
        serve.shutdown()


def _cos(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_decoder_on_vllm_beside_encoder_through_the_openai_client(server, exported, minilm_path):
    from openai import OpenAI
    from sentence_transformers import SentenceTransformer

    client = OpenAI(base_url=f"{server['url']}/v1", api_key="unused", timeout=300, max_retries=0)
    ref = SentenceTransformer(exported["lasttoken"], device="cpu")
    expected = ref.encode(TEXTS)  # default prompt "sts" prepended, EOS appended, last token
    got = client.embeddings.create(model="smol-vllm", input=TEXTS)
    vllm_emb = np.array([d.embedding for d in got.data])
    assert vllm_emb.shape == (3, 576)
    assert _cos(vllm_emb, expected).min() > 0.999
    st_emb = np.array([d.embedding for d in client.embeddings.create(model="smol-st", input=TEXTS).data])
    assert _cos(st_emb, expected).min() > 0.999  # dtype auto: bf16 on CPUs with native bf16 (0.9997 seen)
    assert got.usage.prompt_tokens == sum(len(ref.tokenizer(STS_PROMPT + t)["input_ids"]) for t in TEXTS)

    short = client.embeddings.create(model="smol-vllm", input=TEXTS, dimensions=64)
    short_emb = np.array([d.embedding for d in short.data])
    assert short_emb.shape == (3, 64)
    np.testing.assert_allclose(np.linalg.norm(short_emb, axis=1), 1.0, atol=1e-5)
    assert _cos(short_emb, expected[:, :64]).min() > 0.999

    encoder = np.array([d.embedding for d in client.embeddings.create(model="minilm", input=TEXTS).data])
    assert _cos(encoder, SentenceTransformer(minilm_path, device="cpu").encode(TEXTS)).min() > 0.9999

    cards = {m.id: m.model_extra for m in client.models.list().data}
    assert cards["smol-vllm"]["backend"] == "vllm" and cards["smol-st"]["backend"] == "sentence-transformers"
    assert cards["minilm"]["backend"] == "sentence-transformers"

    # the multi-layer pooling cannot run in vLLM: said at deploy time, served by sentence-transformers
    assert "custom or trainable pooling" in server["fallbacks"]["smol-multilayer"]
    assert cards["smol-multilayer"]["backend"] == "sentence-transformers"
    ml = np.array([d.embedding for d in client.embeddings.create(model="smol-multilayer", input=TEXTS).data])
    from embedforge.st_modules import load_sentence_transformer

    ml_ref = load_sentence_transformer(exported["multilayer"], device="cpu").encode(TEXTS)
    assert _cos(ml, ml_ref).min() > 0.999

    import httpx

    r = httpx.post(f"{server['url']}/v1/embeddings", json={"model": "smol-vllm", "input": "x", "layers": 3},
                   timeout=120)
    assert r.status_code == 400 and "no early exit" in r.json()["error"]["message"]
