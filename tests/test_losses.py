"""Training objectives on a tiny random BERT: every loss trains, cached 2DMSE equals uncached (and
sentence-transformers' Matryoshka2dLoss), gathered negatives over 2 gloo processes equal the
full-batch loss, KL distillation equals the formula computed by hand."""

from __future__ import annotations

import json
import math
import os
import socket

import pytest
from pydantic import TypeAdapter, ValidationError

from workflows.train.losses import (
    ObjectiveConfig,
    build_loss,
    input_columns,
    labels_from_batch,
    record_grid,
    required_columns,
    trained_grid,
)

pytestmark = pytest.mark.timeout(120)
OBJ = TypeAdapter(ObjectiveConfig)

ANCHORS = [f"anchor sentence number {i} about topic {i % 3}" for i in range(8)]
POSITIVES = [f"a positive text {i} that is {'very ' * i}long" for i in range(8)]
NEGATIVES = [f"negative {i}" for i in range(8)]


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory, minilm_path):
    from tests.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny"), minilm_path)


def load(path):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(path, device="cpu")
    for name, p in st.named_parameters():
        if "pooler" in name:  # unused by sentence embeddings; DDP must not wait for it
            p.requires_grad_(False)
    st.train()
    return st


def grads(st):
    return {n: p.grad.detach().clone() for n, p in st.named_parameters() if p.grad is not None}


def batch_for(objective, n=8):
    rows = {"anchor": ANCHORS[:n], "positive": POSITIVES[:n], "negative": NEGATIVES[:n],
            "sentence1": ANCHORS[:n], "sentence2": POSITIVES[:n], "score": [i / (n - 1) for i in range(n)],
            "teacher_score": [1 - i / (n - 1) for i in range(n)], "query": ANCHORS[:n],
            "teacher_probs": [[0.7, 0.2, 0.1]] * n, "source_sentence": ANCHORS[:n], "translation": POSITIVES[:n],
            "teacher_embedding": [[((i * 7 + j) % 11 - 5) / 20 for j in range(32)] for i in range(n)]}
    for i in range(1, 4):
        rows[f"candidate_{i}"] = [POSITIVES, NEGATIVES, ANCHORS[::-1]][i - 1][:n]
        rows[f"negative_{i}"] = NEGATIVES[i:] + NEGATIVES[:i]
    return {c: rows[c] for c in required_columns(objective)}


def loss_on(st, loss_fn, objective, batch):
    features = [st.preprocess(batch[c]) for c in input_columns(objective)]
    return loss_fn(features, labels_from_batch(objective, batch))


# ---- configs and columns (no model) ----

def test_columns_per_objective():
    assert required_columns(OBJ.validate_python({"kind": "mnrl", "num_negatives": 0})) == ["anchor", "positive"]
    assert required_columns(OBJ.validate_python({"kind": "cached_mnrl"})) == ["anchor", "positive", "negative"]
    assert required_columns(OBJ.validate_python({"kind": "mnrl", "num_negatives": 2})) == [
        "anchor", "positive", "negative_1", "negative_2"]
    assert required_columns(OBJ.validate_python({"kind": "cosent"})) == ["sentence1", "sentence2", "score"]
    assert required_columns(OBJ.validate_python({"kind": "angle"})) == ["sentence1", "sentence2", "score"]
    assert required_columns(OBJ.validate_python({"kind": "kl_distill", "num_candidates": 2})) == [
        "query", "candidate_1", "candidate_2", "teacher_probs"]
    assert required_columns(OBJ.validate_python({"kind": "score_distill", "teacher_column": "t"})) == [
        "sentence1", "sentence2", "t"]
    assert required_columns(OBJ.validate_python({"kind": "multilingual_distill"})) == [
        "source_sentence", "translation", "teacher_embedding"]


def test_bad_objective_configs_name_the_field():
    with pytest.raises(ValidationError, match="kind"):
        OBJ.validate_python({"kind": "triplet"})
    with pytest.raises(ValidationError, match="dim_weights"):
        OBJ.validate_python({"kind": "cosent", "matryoshka2d": {"layers": [2], "dims": [8, 4], "dim_weights": [1]}})
    with pytest.raises(ValidationError, match="mini_batch_size"):
        OBJ.validate_python({"kind": "cached_mnrl", "mini_batch_size": 0})
    with pytest.raises(ValidationError, match="multilingual_distill: matryoshka2d is not supported"):
        OBJ.validate_python({"kind": "multilingual_distill", "matryoshka2d": {"layers": [1], "dims": [8]}})
    with pytest.raises(ValidationError, match="pairs"):
        OBJ.validate_python({"kind": "multilingual_distill", "pairs": [["only_one"]]})


def test_trained_grid_unions_objectives_and_adds_full_size():
    a = OBJ.validate_python({"kind": "cosent", "matryoshka2d": {"layers": [2], "dims": [16, 8]}})
    b = OBJ.validate_python({"kind": "mnrl", "matryoshka2d": {"layers": [1, 2], "dims": [32]}})
    assert trained_grid([a, b], num_layers=4, dim=32) == {"layers": [1, 2, 4], "dims": [8, 16, 32]}
    assert trained_grid([OBJ.validate_python({"kind": "cosent"})]) is None


def test_labels_from_batch_checks_teacher_width():
    kl = OBJ.validate_python({"kind": "kl_distill", "num_candidates": 3})
    assert tuple(labels_from_batch(kl, batch_for(kl, 4)).shape) == (4, 3)
    with pytest.raises(ValueError, match="teacher_probs.*3 teacher values"):
        labels_from_batch(kl, {"teacher_probs": [[0.5, 0.5]] * 4})


# ---- every objective trains ----

@pytest.mark.parametrize("spec", [
    {"kind": "mnrl"},
    {"kind": "mnrl", "num_negatives": 2, "gather_across_workers": False},
    {"kind": "cached_mnrl", "mini_batch_size": 3},
    {"kind": "cosent"},
    {"kind": "angle"},
    {"kind": "kl_distill", "num_candidates": 3, "temperature": 0.1},
    {"kind": "score_distill", "loss": "mse"},
    {"kind": "score_distill", "loss": "cosent"},
    {"kind": "multilingual_distill"},
    {"kind": "cosent", "matryoshka2d": {"layers": [1, 2], "dims": [32, 16], "n_layers_per_step": 1}},
    {"kind": "cached_mnrl", "mini_batch_size": 4, "matryoshka2d": {"layers": [2], "dims": [32, 8]}},
], ids=lambda s: s["kind"] + ("+2d" if "matryoshka2d" in s else ""))
def test_each_objective_runs_forward_and_backward(tiny_path, spec):
    import torch

    objective = OBJ.validate_python(spec)
    st = load(tiny_path)
    loss = loss_on(st, build_loss(objective, st), objective, batch_for(objective))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    g = grads(st)
    assert g and any(v.abs().sum() > 0 for k, v in g.items() if "encoder.layer.0." in k)


# ---- 2DMSE: cached == uncached == sentence-transformers ----

def assert_grads_close(a, b, what):
    assert a.keys() == b.keys(), what
    scale = max(1.0, max(v.abs().max().item() for v in a.values()))
    for k in a:
        diff = (a[k] - b[k]).abs().max().item()
        assert diff <= 1e-5 * scale, f"{what}: {k} differs by {diff} (gradient scale {scale})"


def test_cached_2dmse_matches_uncached_and_sentence_transformers(tiny_path):
    from sentence_transformers.sentence_transformer.losses import Matryoshka2dLoss, MultipleNegativesRankingLoss

    from workflows.train.losses.grid import CachedMatryoshka2dGridLoss, Matryoshka2dGridLoss

    mnrl = OBJ.validate_python({"kind": "mnrl"})
    batch = batch_for(mnrl)

    def run(make):
        st = load(tiny_path)
        loss = loss_on(st, make(st), mnrl, batch)
        loss.backward()
        return loss.item(), grads(st)

    dims = [32, 16, 8]
    every = dict(n_layers_per_step=-1)  # every depth, so the sampled sets agree
    ref = run(lambda st: Matryoshka2dLoss(st, MultipleNegativesRankingLoss(st), dims,
                                          n_layers_per_step=-1, n_dims_per_step=-1))
    uncached = run(lambda st: Matryoshka2dGridLoss(st, MultipleNegativesRankingLoss(st), [0, 1, 2, 3], dims, **every))
    cached = run(lambda st: CachedMatryoshka2dGridLoss(st, MultipleNegativesRankingLoss(st), [0, 1, 2, 3], dims,
                                                       mini_batch_size=3, **every))
    assert uncached[0] == pytest.approx(ref[0], abs=1e-5)
    assert cached[0] == pytest.approx(uncached[0], abs=1e-5)
    assert_grads_close(uncached[1], ref[1], "uncached 2DMSE vs sentence-transformers Matryoshka2dLoss")
    assert_grads_close(cached[1], uncached[1], "cached vs uncached 2DMSE")

    # the configured path (a depth subset, through build_loss) agrees too
    spec = {"layers": [2], "dims": [32, 8], "n_layers_per_step": -1}
    a = run(lambda st: build_loss(OBJ.validate_python({"kind": "mnrl", "matryoshka2d": spec}), st))
    b = run(lambda st: build_loss(OBJ.validate_python({"kind": "cached_mnrl", "mini_batch_size": 3,
                                                       "matryoshka2d": spec}), st))
    assert b[0] == pytest.approx(a[0], abs=1e-5)
    assert_grads_close(b[1], a[1], "build_loss cached_mnrl+2d vs mnrl+2d")


def test_record_grid_writes_the_elastic_grid(tiny_path, tmp_path):
    from embedforge.elastic import read_grid

    st = load(tiny_path)
    objective = OBJ.validate_python({"kind": "cosent", "matryoshka2d": {"layers": [2, 9], "dims": [16, 8]}})
    st.save(str(tmp_path))
    assert record_grid(tmp_path, [objective], st) == {"layers": [2, 4], "dims": [8, 16, 32]}
    assert read_grid(tmp_path) == {"layers": [2, 4], "dims": [8, 16, 32]}


def test_2dmse_rejects_layers_beyond_the_model(tiny_path):
    st = load(tiny_path)
    with pytest.raises(ValueError, match="out of range: the model has 4 layers"):
        build_loss(OBJ.validate_python({"kind": "cosent", "matryoshka2d": {"layers": [9], "dims": [8]}}), st)


# ---- KL distillation ----

def test_kl_distill_equals_hand_computation_2x3():
    import torch

    from sentence_transformers.util import pairwise_cos_sim  # noqa: F401  (the similarity used)

    from workflows.train.losses.distill import TeacherKLDivLoss

    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    cands = [torch.tensor([[1.0, 0.0], [0.0, 1.0]]),   # cos 1, 1
             torch.tensor([[0.0, 1.0], [1.0, 0.0]]),   # cos 0, 0
             torch.tensor([[-1.0, 0.0], [1.0, 1.0]])]  # cos -1, 1/sqrt2
    teacher = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    T = 0.5
    cos = [[1.0, 0.0, -1.0], [1.0, 0.0, 1 / math.sqrt(2)]]
    expected = 0.0
    for row in range(2):
        z = [c / T for c in cos[row]]
        log_norm = math.log(sum(math.exp(v) for v in z))
        expected += sum(p * (math.log(p) - (zi - log_norm)) for p, zi in zip(teacher[row].tolist(), z))
    expected = expected / 2  # FlagEmbedding's KL: batchmean, no T^2 factor
    loss = TeacherKLDivLoss(model=None, temperature=T).compute_loss_from_embeddings([q, *cands], teacher)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    logits = TeacherKLDivLoss(model=None, temperature=T, teacher_format="logits")
    assert logits.compute_loss_from_embeddings([q, *cands], teacher.log()).item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="sum to 1"):
        TeacherKLDivLoss(model=None, temperature=T).compute_loss_from_embeddings([q, *cands], teacher * 2)


# ---- multilingual distillation == sentence-transformers' MSELoss ----

def test_multilingual_distill_equals_sentence_transformers_mse_loss_and_the_formula(tiny_path):
    """Loss and gradients of the objective equal MSELoss and 1/2 (mse(S(s), T) + mse(S(t), T)) by hand."""
    import torch
    from sentence_transformers.sentence_transformer.losses import MSELoss

    objective = OBJ.validate_python({"kind": "multilingual_distill"})
    st = load(tiny_path)
    st.eval()  # dropout off: three passes over the same inputs must see the same network
    batch = batch_for(objective, 4)
    teacher = labels_from_batch(objective, batch)
    assert tuple(teacher.shape) == (4, 32)

    ours = loss_on(st, build_loss(objective, st), objective, batch)
    ours.backward()
    g_ours = grads(st)
    st.zero_grad(set_to_none=True)

    reference = loss_on(st, MSELoss(st), objective, batch)
    reference.backward()
    g_ref = grads(st)
    st.zero_grad(set_to_none=True)

    emb = [st(st.preprocess(batch[c]))["sentence_embedding"] for c in ("source_sentence", "translation")]
    by_hand = 0.5 * sum(((e - teacher) ** 2).sum() / e.numel() for e in emb)
    by_hand.backward()
    g_hand = grads(st)

    assert ours.item() == reference.item()
    assert ours.item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert_grads_close(g_ours, g_ref, "MSELoss")
    assert_grads_close(g_ours, g_hand, "formula")


def test_multilingual_distill_is_zero_on_sources_when_the_teacher_is_the_student(tiny_path):
    import torch

    objective = OBJ.validate_python({"kind": "multilingual_distill"})
    st = load(tiny_path)
    st.eval()
    sources = ANCHORS[:4]
    teacher = torch.from_numpy(st.encode(sources, convert_to_numpy=True))  # what the teacher stage stores
    loss_fn = build_loss(objective, st)
    with torch.no_grad():
        assert loss_fn([st.preprocess(sources)], teacher).item() < 1e-10
        assert loss_fn([st.preprocess(sources), st.preprocess(POSITIVES[:4])], teacher).item() > 1e-6


def test_multilingual_distill_names_the_teacher_when_widths_differ(tiny_path):
    import torch

    objective = OBJ.validate_python({"kind": "multilingual_distill"})
    st = load(tiny_path)
    with pytest.raises(ValueError, match="teacher's embeddings have 16 dims but the student's have 32"):
        build_loss(objective, st)([st.preprocess(ANCHORS[:2])], torch.zeros(2, 16))


def test_similarity_distill_equals_the_formula_by_hand():
    """mse(t s^T, G G^T) + mse(t t^T, G G^T) + mse(s s^T, G G^T) on normalized rows, computed elementwise."""
    import torch

    from workflows.train.losses.multilingual import similarity_distill_loss

    g = torch.Generator().manual_seed(0)
    s, t, teacher = (torch.randn(3, 5, generator=g) for _ in range(3))
    n = [x / x.norm(dim=1, keepdim=True) for x in (s, t, teacher)]
    cos = lambda a, b: [[float((a[i] * b[j]).sum()) for j in range(3)] for i in range(3)]  # noqa: E731
    target = cos(n[2], n[2])
    by_hand = sum(sum((m[i][j] - target[i][j]) ** 2 for i in range(3) for j in range(3)) / 9
                  for m in (cos(n[1], n[0]), cos(n[1], n[1]), cos(n[0], n[0])))
    assert similarity_distill_loss(s, t, teacher).item() == pytest.approx(by_hand, rel=1e-5)
    # zero when source and translation already sit where the teacher puts the source
    assert similarity_distill_loss(teacher, 2 * teacher, teacher).item() < 1e-10


def test_similarity_distill_objective_trains_through_the_factory(tiny_path):
    """loss: similarity builds SimilarityDistillLoss; it is zero on identical columns and backpropagates."""
    import torch

    from workflows.train.losses.multilingual import SimilarityDistillLoss

    objective = OBJ.validate_python({"kind": "multilingual_distill", "loss": "similarity"})
    st = load(tiny_path)
    st.eval()
    loss_fn = build_loss(objective, st)
    assert isinstance(loss_fn, SimilarityDistillLoss)
    sources = ANCHORS[:4]
    teacher = torch.from_numpy(st.encode(sources, convert_to_numpy=True))
    with torch.no_grad():
        assert loss_fn([st.preprocess(sources), st.preprocess(sources)], teacher).item() < 1e-10
    loss = loss_fn([st.preprocess(sources), st.preprocess(POSITIVES[:4])], teacher)
    assert loss.item() > 1e-6
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in st.parameters())


def test_translation_ranking_term_equals_the_formula_by_hand(tiny_path):
    """ranking_weight adds w * (CE over cos(t_i, s_j) + CE over cos(s_i, t_j)) / 2 to the distillation loss."""
    import torch
    import torch.nn.functional as F

    from workflows.train.losses.multilingual import TranslationRankingLoss, similarity_distill_loss

    objective = OBJ.validate_python({"kind": "multilingual_distill", "loss": "similarity", "ranking_weight": 0.3,
                                     "ranking_scale": 10.0, "gather_across_workers": False})
    st = load(tiny_path)
    st.eval()
    batch = batch_for(objective, n=6)
    loss_fn = build_loss(objective, st)
    assert isinstance(loss_fn, TranslationRankingLoss)
    loss = loss_on(st, loss_fn, objective, batch)
    def ranking_by_hand(queries, docs):  # mean over both directions of the per-row cross-entropy
        cos = 10.0 * F.normalize(queries, dim=-1) @ F.normalize(docs, dim=-1).T
        rows = [-(cos[i, i] - torch.logsumexp(cos[i], 0)) for i in range(6)]
        cols = [-(cos[i, i] - torch.logsumexp(cos[:, i], 0)) for i in range(6)]
        return (sum(rows) + sum(cols)) / 12

    with torch.no_grad():
        s = st(st.preprocess(batch["source_sentence"]))["sentence_embedding"]
        t = st(st.preprocess(batch["translation"]))["sentence_embedding"]
        teacher = labels_from_batch(objective, batch)
        by_hand = similarity_distill_loss(s, t, teacher) + 0.3 * ranking_by_hand(t, s)
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in st.parameters())
    # target teacher: translations are ranked against the teacher's source embeddings (fixed)
    teacher_target = OBJ.validate_python({**objective.model_dump(), "ranking_target": "teacher"})
    st.zero_grad()
    loss_t = loss_on(st, build_loss(teacher_target, st), teacher_target, batch)
    with torch.no_grad():
        by_hand_t = similarity_distill_loss(s, t, teacher) + 0.3 * ranking_by_hand(t, teacher)
    assert loss_t.item() == pytest.approx(by_hand_t.item(), rel=1e-5)
    # weight 0: the distillation loss alone, as before
    plain = build_loss(OBJ.validate_python({"kind": "multilingual_distill", "loss": "similarity"}), st)
    assert not isinstance(plain, TranslationRankingLoss)


# ---- negatives gathered across workers (2 gloo processes) ----

GATHER_SPECS = [
    {"kind": "mnrl", "gather_across_workers": True},
    {"kind": "cached_mnrl", "mini_batch_size": 3, "gather_across_workers": True},
    {"kind": "cached_mnrl", "mini_batch_size": 3, "gather_across_workers": True,
     "matryoshka2d": {"layers": [2], "dims": [32, 8], "n_layers_per_step": -1}},
    {"kind": "multilingual_distill", "loss": "mse", "ranking_weight": 0.5, "gather_across_workers": True},
]


def _gather_worker(rank, world, port, path, out_dir):
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = []
        for spec in GATHER_SPECS:
            objective = OBJ.validate_python(spec)
            st = load(path)
            ddp = DistributedDataParallel(st)
            half = {c: v[rank * 4:(rank + 1) * 4] for c, v in batch_for(objective).items()}
            loss = loss_on(st, build_loss(objective, ddp), objective, half)
            loss.backward()  # DDP averages the gradients over the 2 workers
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            results.append((mean_loss.item() / world, grads(st)))
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "gathered.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gathered_negatives_equal_full_batch_loss(tiny_path, tmp_path):
    import torch
    import torch.multiprocessing as mp

    mp.spawn(_gather_worker, args=(2, _free_port(), tiny_path, str(tmp_path)), nprocs=2, join=True)
    gathered = torch.load(tmp_path / "gathered.pt")
    for spec, (loss2, grads2) in zip(GATHER_SPECS, gathered):
        objective = OBJ.validate_python({**spec, "gather_across_workers": False})
        st = load(tiny_path)
        full = loss_on(st, build_loss(objective, st), objective, batch_for(objective))
        full.backward()
        assert loss2 == pytest.approx(full.item(), abs=1e-5), json.dumps(spec)
        assert_grads_close(grads2, grads(st), f"gathered vs full batch, {spec}")
