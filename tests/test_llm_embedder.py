"""Decoder LLMs as embedders: the multi-layer trainable pooling on tiny tensors, the decoder
wrapper on the real SmolLM2 tokenizer, and a real 2-worker LoRA run exported merged."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from embedforge.config import build_config, load_config
from embedforge.errors import ConfigError
from workflows.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
STS_PROMPT = "Instruct: Retrieve semantically similar text.\nQuery: "


# ---------------------------------------------------------------- the pooling module alone (no model)


def _official_forward(pool, layers, last_index):
    """The official PerceiverResampler's forward, written out op by op on this module's weights
    (``hidden_states[l][:, -1]`` taken at ``last_index`` instead of -1)."""
    import torch

    b = layers[0].shape[0]
    h = torch.stack([x[torch.arange(b), last_index] for x in layers], dim=1)
    h = h + pool.layer_embeddings(torch.arange(h.shape[1]))
    x = pool.latents.unsqueeze(0).repeat(b, 1, 1)
    hn, xn = pool.norm_layers(h), pool.norm_latents(x)  # PreNorm: norm(x=hiddens), norm_context(context=latents)
    q = pool.to_q(xn)
    k, v = pool.to_kv(hn).chunk(2, dim=-1)
    heads = pool.num_heads

    def split(t):  # 'b n (h d) -> (b h) n d'
        return t.reshape(b, t.shape[1], heads, -1).permute(0, 2, 1, 3).reshape(b * heads, t.shape[1], -1)

    q, k, v = map(split, (q, k, v))
    att = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1) @ v
    att = att.reshape(b, heads, -1, att.shape[-1]).permute(0, 2, 1, 3).reshape(b, -1, heads * att.shape[-1])
    x = pool.to_out(att) + x
    ff = pool.ff[2](pool.ff[1](pool.ff[0](pool.norm_ff(x))))
    x = ff + x
    return torch.nn.functional.normalize(x.mean(dim=1), p=2, dim=-1)


def test_multilayer_trainable_pooling_matches_the_official_computation():
    import torch

    from embedforge.st_modules import MultiLayerTrainablePooling

    torch.manual_seed(0)
    d, n_layers, b, seq = 16, 3, 3, 5
    pool = MultiLayerTrainablePooling(d, n_layers, num_latents=4, num_heads=2, head_dim=8, ff_mult=2)
    hidden = [torch.randn(b, seq, d) for _ in range(n_layers + 1)]  # embedding output + 3 layers
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])  # right padding
    out = pool({"all_layer_embeddings": hidden, "attention_mask": mask})["sentence_embedding"]
    expected = _official_forward(pool, hidden[1:], mask.sum(1) - 1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert out.shape == (b, d)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(b))

    # the embedding output (hidden_states[0]) is not one of the attended layers
    changed = [hidden[0] + 5.0] + hidden[1:]
    torch.testing.assert_close(pool({"all_layer_embeddings": changed, "attention_mask": mask})["sentence_embedding"],
                               out)
    # left padding: the same sequences shifted right give the same last-token vectors
    left = [torch.zeros_like(x) for x in hidden]
    lmask = torch.zeros_like(mask)
    for i, n in enumerate(mask.sum(1).tolist()):
        for j in range(n_layers + 1):
            left[j][i, seq - n:] = hidden[j][i, :n]
        lmask[i, seq - n:] = 1
    torch.testing.assert_close(pool({"all_layer_embeddings": left, "attention_mask": lmask})["sentence_embedding"],
                               out, atol=1e-6, rtol=1e-5)
    # every parameter trains
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in pool.parameters())


def test_multilayer_trainable_pooling_mean_summary_and_bad_settings():
    import torch

    from embedforge.st_modules import MultiLayerTrainablePooling, summarize_layer

    torch.manual_seed(1)
    pool = MultiLayerTrainablePooling(8, 2, layer_summary="mean", num_latents=3, num_heads=2, head_dim=4)
    hidden = [torch.randn(2, 4, 8) for _ in range(3)]
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    out = pool({"all_layer_embeddings": hidden, "attention_mask": mask})["sentence_embedding"]
    means = [summarize_layer(x, mask, "mean") for x in hidden[1:]]
    # a different sequence with the same masked means pools identically
    other = [x.clone() for x in hidden]
    for x in other:
        x[1, 2:] = 100.0  # padding positions
    assert torch.allclose(pool({"all_layer_embeddings": other, "attention_mask": mask})["sentence_embedding"], out)
    assert means[0].shape == (2, 8)
    with pytest.raises(ValueError, match="layer_summary must be lasttoken"):
        MultiLayerTrainablePooling(8, 2, layer_summary="cls")
    with pytest.raises(ValueError, match="needs all layers' outputs"):
        pool({"attention_mask": mask})
    with pytest.raises(ValueError, match="built for 2"):
        pool({"all_layer_embeddings": hidden + [hidden[0]], "attention_mask": mask})


# ---------------------------------------------------------------- configs (no model)


def test_llm_embedder_config_dry_run_and_checks(tmp_path):
    config = load_config(TrainConfig, REPO / "configs" / "train_llm_embedder.yaml")
    assert config.model.decoder.lora.r == 16 and config.model.pooling == "lasttoken"
    base = {"model": {"base": "smollm2-135m-instruct", "pooling": "lasttoken", "decoder": {}},
            "datasets": [{"dataset": {"source": "stsb", "split": "train"}, "objective": {"kind": "cosent"}}],
            "train": {"max_steps": 2}, "output": str(tmp_path)}
    build_config(TrainConfig, base)
    with pytest.raises(ConfigError, match="a decoder LLM has no sentence pooling to keep"):
        build_config(TrainConfig, {**base, "model": {"base": "x", "decoder": {}}})
    bad_prompt = {**base, "datasets": [{**base["datasets"][0], "prompts": {"anchor": "q: "}}]}
    with pytest.raises(ConfigError, match=r"prompts: columns \['anchor'\] are not read by objective cosent"):
        build_config(TrainConfig, bad_prompt)
    with pytest.raises(ConfigError, match="default_prompt_name 'q' is not a key of model.prompts"):
        build_config(TrainConfig, {**base, "model": {**base["model"], "default_prompt_name": "q"}})
    rc = subprocess.run([sys.executable, "-m", "jobs.train", "--config", "configs/train_llm_embedder.yaml",
                         "--dry-run"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert rc.returncode == 0, rc.stderr[-2000:]


# ---------------------------------------------------------------- the decoder wrapper on SmolLM2


@pytest.mark.timeout(300)
@pytest.mark.parametrize("side", ["right", "left"])
def test_decoder_embedder_appends_eos_and_pools_it_on_either_padding_side(smollm_path, side):
    import torch

    from workflows.train.config import ModelConfig
    from workflows.train.decoder import build_decoder_embedder

    cfg = ModelConfig.model_validate({"base": smollm_path, "pooling": "lasttoken", "max_seq_length": 32,
                                      "decoder": {"padding_side": side}})
    model = build_decoder_embedder(smollm_path, cfg)
    eos = model.tokenizer.eos_token_id
    texts = ["A man plays a guitar.", "Hi"]
    features = model.preprocess(texts)
    ids, mask = features["input_ids"], features["attention_mask"]
    last = [row[m.bool()][-1].item() for row, m in zip(ids, mask)]
    assert last == [eos, eos]
    assert (mask[1, 0] == 0) == (side == "left")
    assert not any(model.tokenizer.decode(r).startswith("<|im_start|>system") for r in ids)  # no chat template
    with torch.no_grad():
        emb = model.encode(texts, convert_to_tensor=True)
        tokens = model[0](dict(model.preprocess(texts[:1])))["token_embeddings"]
    torch.testing.assert_close(emb[0], tokens[0, -1], atol=1e-4, rtol=1e-4)  # the EOS token's vector


# ---------------------------------------------------------------- real Ray Train: LoRA, 2 gloo workers


def _peft_free_encode(folder: str, texts: list[str]) -> np.ndarray:
    """Load ``folder`` with a plain ``SentenceTransformer`` in a process where peft cannot be imported."""
    code = ("import sys, json; sys.modules['peft'] = None\n"
            "from sentence_transformers import SentenceTransformer\n"
            f"m = SentenceTransformer({folder!r}, device='cpu')\n"
            f"print(json.dumps(m.encode({texts!r}).tolist()))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    return np.array(json.loads(out.stdout.strip().splitlines()[-1]))


def train_lora_smollm2(tmp_path: Path, smollm_path: str, pooling: str = "lasttoken") -> dict:
    from workflows.train.run import run_train

    config = build_config(TrainConfig, {
        "model": {"base": smollm_path, "pooling": pooling, "max_seq_length": 32,
                  "decoder": {"lora": {"r": 4, "alpha": 8}},
                  "prompts": {"sts": STS_PROMPT}, "default_prompt_name": "sts"},
        "datasets": [{"dataset": {"source": "sick", "split": "train", "kind": "nli_triplets", "limit": 16},
                      "objective": {"kind": "mnrl", "gather_across_workers": True},
                      "prompts": {"anchor": "Instruct: Given a premise, retrieve a hypothesis\nQuery: "}}],
        "train": {"max_steps": 3, "batch_size": 2, "lr": 1e-3, "log_every_n_steps": 1, "warmup_ratio": 0.0},
        "dev": {"dataset": {"source": "stsb", "split": "dev", "limit": 8}, "batch_size": 8},
        "checkpoint": {"every_n_steps": 2, "keep_best_k": 1, "export": "last"},
        "failure": {"max_failures": 0},
        "output": str(tmp_path / "run"), "run_name": "lora"})
    return run_train(config)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_lora_lasttoken_smollm2_trains_on_two_workers_and_exports_merged(ray_local, tmp_path, smollm_path):
    from sentence_transformers import SentenceTransformer

    summary = train_lora_smollm2(tmp_path, smollm_path)
    folder = Path(summary["model"])
    assert not (folder / "adapter_config.json").exists() and not (folder / "adapter_model.safetensors").exists()
    modules = json.loads((folder / "modules.json").read_text())
    assert [m["type"] for m in modules] == ["sentence_transformers.base.modules.transformer.Transformer",
                                            "sentence_transformers.sentence_transformer.modules.pooling.Pooling"]
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["LlamaModel"]
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [h["step"] for h in history] == [0, 1, 2, 3] and all(np.isfinite(h.get("train_loss", 0)) for h in history)

    texts = ["A man is playing a guitar.", "Stocks fell on Monday."]
    model = SentenceTransformer(str(folder), device="cpu")
    assert model.default_prompt_name == "sts" and model.prompts["sts"] == STS_PROMPT
    emb = model.encode(texts)
    assert emb.shape == (2, 576) and np.isfinite(emb).all()
    np.testing.assert_allclose(_peft_free_encode(str(folder), texts), emb, atol=1e-4)
    # the adapters were merged: the exported weights differ from the base model's
    from safetensors.torch import load_file

    trained = load_file(str(folder / "model.safetensors"))
    base = load_file(str(Path(smollm_path) / "model.safetensors"))
    key = next(k for k in trained if k.endswith("layers.0.self_attn.q_proj.weight"))
    base_key = next(k for k in base if k.endswith("layers.0.self_attn.q_proj.weight"))
    assert not np.allclose(trained[key].float().numpy(), base[base_key].float().numpy(), atol=1e-6)


@pytest.mark.timeout(300)
def test_lora_save_merges_adapters_and_trainable_state_round_trips(smollm_path, tmp_path):
    import torch
    from sentence_transformers import SentenceTransformer

    from workflows.train.config import ModelConfig
    from workflows.train.decoder import (build_decoder_embedder, is_lora, load_trainable_state, save_embedder,
                                         trainable_state)

    cfg = ModelConfig.model_validate({"base": smollm_path, "pooling": "mean", "max_seq_length": 32,
                                      "decoder": {"lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]}}})
    model = build_decoder_embedder(smollm_path, cfg)
    assert is_lora(model)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.eval()
    texts = ["A man plays a guitar.", "Hi"]
    live = model.encode(texts)
    save_embedder(model, str(tmp_path / "merged"))
    assert is_lora(model)  # the live model keeps its adapters
    merged = SentenceTransformer(str(tmp_path / "merged"), device="cpu")
    np.testing.assert_allclose(merged.encode(texts), live, atol=1e-4)
    state = trainable_state(model)
    assert state and all("lora_" in k for k in state)
    fresh = build_decoder_embedder(smollm_path, cfg)
    load_trainable_state(fresh, state)
    fresh.eval()
    np.testing.assert_allclose(fresh.encode(texts), live, atol=1e-5)
    with pytest.raises(ValueError, match="does not fit the model"):
        load_trainable_state(fresh, {"nope": torch.zeros(1)})
