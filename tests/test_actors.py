"""The two shared actors on real engines: vLLM (CPU) and sentence-transformers."""

import numpy as np
import pytest

from embedforge.errors import EngineError, ResourceError

PROMPT = "The capital of France is"


@pytest.mark.timeout(600)
def test_vllm_generates_and_scores(llm_engine):
    out = llm_engine.generate([PROMPT, "1, 2, 3,"], max_tokens=[6, 4], logprobs=3)
    assert len(out) == 2 and out[0]["text"].strip()
    assert len(out[1]["token_ids"]) <= 4
    assert all(len(step) >= 1 for step in out[0]["logprobs"])
    # greedy: the generated token is the argmax of its own step's top log-probs
    first = out[0]["logprobs"][0]
    assert out[0]["token_ids"][0] == max(first, key=first.get)

    good, bad = llm_engine.continuation_logprobs([PROMPT, PROMPT], [" Paris", " banana"])
    assert len(good) == len(llm_engine.tokenizer.encode(" Paris", add_special_tokens=False))
    assert sum(good) / len(good) > sum(bad) / len(bad)
    assert all(lp <= 0 for lp in good + bad)


@pytest.mark.timeout(600)
def test_vllm_chat_template(llm_engine):
    out = llm_engine.chat([[{"role": "user", "content": "Say hello."}]], max_tokens=12)
    assert out[0]["text"].strip()
    assert "<|im_start|>" in llm_engine.apply_chat_template([{"role": "user", "content": "x"}])


@pytest.mark.timeout(600)
def test_vllm_prompt_embeds_match_token_ids(llm_engine):
    import torch

    emb = llm_engine.embedding_matrix()
    ids = llm_engine.tokenizer.encode(PROMPT, add_special_tokens=False)
    from_embeds = llm_engine.generate_from_embeds([emb[ids].to(torch.bfloat16)], max_tokens=6)[0]
    from_ids = llm_engine.generate([ids], max_tokens=6)[0]
    assert from_embeds["token_ids"] == from_ids["token_ids"]
    # a probability-weighted mix of rows (what CIPHER sends) is accepted
    mix = 0.5 * emb[ids] + 0.5 * emb[[i + 1 for i in ids]]
    assert llm_engine.generate_from_embeds([mix.to(torch.bfloat16)], max_tokens=3)[0]["token_ids"]


@pytest.mark.timeout(600)
def test_vllm_errors(llm_engine):
    with pytest.raises(EngineError, match="continuation .* has no tokens"):
        llm_engine.continuation_logprobs([PROMPT], [""])
    with pytest.raises(EngineError, match="2 prompts but 1 continuations"):
        llm_engine.continuation_logprobs([PROMPT, PROMPT], [" x"])


def test_embedder_matches_sentence_transformers(minilm_path):
    from sentence_transformers import SentenceTransformer

    from actors.embedder import Embedder, EmbedderConfig

    texts = ["A man is playing a guitar.", "A woman is slicing onions.", "Kids play in the park."]
    emb = Embedder(EmbedderConfig(model=minilm_path, dtype="float32"))  # the reference encodes in float32
    ref = SentenceTransformer(minilm_path, device="cpu").encode(texts, normalize_embeddings=True)
    got = emb.encode(texts)
    assert got.shape == (3, 384)
    np.testing.assert_allclose(got, ref, atol=1e-5)

    small = emb.encode(texts, dimensions=64)
    assert small.shape == (3, 64)
    np.testing.assert_allclose(np.linalg.norm(small, axis=1), 1.0, atol=1e-5)

    # early exit equals pooling the hidden states of layer 3 by hand
    import torch

    model = emb.model
    feats = model.tokenize(texts)
    with torch.inference_mode():
        out = model[0].auto_model(**feats, output_hidden_states=True)
    h = out.hidden_states[3]
    mask = feats["attention_mask"].unsqueeze(-1).float()
    manual = ((h * mask).sum(1) / mask.sum(1)).numpy()
    manual /= np.linalg.norm(manual, axis=1, keepdims=True)
    np.testing.assert_allclose(emb.encode(texts, layers=3), manual, atol=1e-5)
    assert emb.num_layers == 6  # the layer list is restored after early exit
    np.testing.assert_allclose(emb.encode(texts), ref, atol=1e-5)


@pytest.mark.timeout(300)
def test_embedder_in_ray_data(ray_local, minilm_path):
    import ray

    from actors.embedder import Embedder, EmbedderConfig

    texts = [f"sentence number {i}" for i in range(40)]
    # float32: this checks the Ray Data plumbing; with dtype auto a CPU with native bf16 runs bf16, whose
    # sums differ with the thread count (the pool actor has 1 CPU, this process 2) by more than atol
    cfg = EmbedderConfig(model=minilm_path, batch_size=16, dtype="float32")
    ds = ray.data.from_items([{"text": t} for t in texts]).repartition(4)
    rows = ds.map_batches(Embedder, fn_constructor_kwargs={"config": cfg}, batch_size=16,
                          compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1).take_all()
    got = {r["text"]: np.asarray(r["embedding"]) for r in rows}
    ref = Embedder(cfg).encode(texts)
    np.testing.assert_allclose(np.stack([got[t] for t in texts]), ref, atol=1e-5)


@pytest.mark.timeout(120)
def test_gpu_request_fails_fast(ray_local):
    from embedforge.runtime import check_resources

    with pytest.raises(ResourceError, match="num_gpus=1 but the cluster has 0 GPUs"):
        check_resources(1, 1, "LLM engine")
    check_resources(1, 0, "LLM engine")


@pytest.mark.timeout(300)
def test_embedder_as_remote_actor(ray_local, minilm_path):
    import ray

    from actors.embedder import Embedder, EmbedderConfig
    from embedforge.runtime import remote_actor

    actor = remote_actor(Embedder, EmbedderConfig(model=minilm_path))
    emb = ray.get(actor.encode.remote(["hello world"], dimensions=32), timeout=120)
    assert emb.shape == (1, 32)
    with pytest.raises(ResourceError, match="num_gpus=1"):
        remote_actor(Embedder, EmbedderConfig(model=minilm_path, num_gpus=1))
    ray.kill(actor)
