"""The papers' objectives as their official code defines them, checked against hand computations:
LLM-Embedder's distillation (FlagEmbedding), PEG's progressive weighting, DSE's gold/teacher mix,
AnglE ESE's layer weights, and 2DMSE sampling seeded by (seed, step): identical on 2 gloo
workers, reproducible from the seed, different for another seed."""

from __future__ import annotations

import math
import os

import pytest
from pydantic import TypeAdapter, ValidationError

from tests.test_losses import _free_port, assert_grads_close, batch_for, grads, load, loss_on, tiny_path  # noqa: F401
from workflows.train.losses import ObjectiveConfig, build_loss, labels_from_batch, required_columns

pytestmark = pytest.mark.timeout(180)
OBJ = TypeAdapter(ObjectiveConfig)


def _logsumexp(xs):
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def _unit(v):
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b))


# ---- LLM-Embedder (FlagEmbedding research/llm_embedder) ----

Q = [[1.0, 0.0], [0.6, 0.8]]
C = [[[1.0, 0.0], [0.0, 1.0], [-1.0, 1.0]],   # candidates of query 0
     [[1.0, 1.0], [0.0, 1.0], [1.0, 0.0]]]    # candidates of query 1
P = [[0.5, 0.2, 0.3], [0.1, 0.6, 0.3]]         # teacher probabilities


def _tensors():
    import torch

    return torch.tensor(Q), torch.tensor(C), torch.tensor(P)


def test_kl_form_is_flagembeddings_kl_without_t_squared():
    import torch

    from workflows.train.losses.distill import TeacherKLDivLoss, kl_distill_reference, llm_embedder_loss

    q, c, p = _tensors()
    tau, t_s, t_t = 0.1, 2.0, 0.5
    expected = 0.0
    for b in range(2):
        s = [_dot(_unit(Q[b]), _unit(cand)) / tau / t_s for cand in C[b]]
        log_student = [x - _logsumexp(s) for x in s]
        z = [math.log(x) / t_t for x in P[b]]
        target = [math.exp(x - _logsumexp(z)) for x in z]
        expected += sum(t * (math.log(t) - ls) for t, ls in zip(target, log_student))
    expected /= 2
    got = llm_embedder_loss(q, c, p.log(), cos_temperature=tau, student_temperature=t_s, teacher_temperature=t_t)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # the module with teacher probabilities (their log is passed on) and the loop-written reference agree
    module = TeacherKLDivLoss(model=None, temperature=tau)
    ref = kl_distill_reference(q, c, p, tau)
    assert module.compute_loss_from_embeddings([q, c[:, 0], c[:, 1], c[:, 2]], p).item() == pytest.approx(
        ref.item(), rel=1e-5)
    with pytest.raises(ValueError, match="sum to 1"):
        module.compute_loss_from_embeddings([q, c[:, 0], c[:, 1], c[:, 2]], p * 2)
    with pytest.raises(ValueError, match="neither distillation nor the contrastive"):
        llm_embedder_loss(q, c, p.log(), distill="none")
    assert torch.isfinite(got)


def test_stable_distillation_and_contrastive_equal_hand_computation():
    from workflows.train.losses.distill import TeacherKLDivLoss, llm_embedder_loss, sort_negatives_by_teacher

    q, c, p = _tensors()
    tau = 0.5
    pool = [_unit(cand) for row in C for cand in row]  # query-major, 6 keys
    k = 3
    stable, contrastive = 0.0, 0.0
    for b in range(2):
        scores = [_dot(_unit(Q[b]), key) / tau for key in pool]
        w = P[b]  # softmax(log p) = p
        masked = set()
        for i in range(k):
            target = b * k + i
            kept = [s for j, s in enumerate(scores) if j not in masked]
            stable += w[i] * (_logsumexp(kept) - scores[target]) / 2
            masked.add(target)
        contrastive += (_logsumexp(scores) - scores[b * k]) / 2
    got = llm_embedder_loss(q, c, p.log(), cos_temperature=tau, distill="stable")
    assert got.item() == pytest.approx(stable, rel=1e-5)
    got_c = llm_embedder_loss(q, c, p.log(), cos_temperature=tau, distill="none", contrastive_weight=0.2)
    assert got_c.item() == pytest.approx(contrastive, rel=1e-5)  # alone it is not weighted, as in FlagEmbedding
    both = llm_embedder_loss(q, c, p.log(), cos_temperature=tau, distill="stable", contrastive_weight=0.2,
                             distill_weight=0.7)
    assert both.item() == pytest.approx(0.2 * contrastive + 0.7 * stable, rel=1e-5)

    # the loader's sort: gold first, negatives by teacher score descending
    sc, sp = sort_negatives_by_teacher(c, p)
    assert sp.flatten().tolist() == pytest.approx([0.5, 0.3, 0.2, 0.1, 0.6, 0.3])
    assert sc[0, 1].tolist() == C[0][2] and sc[0, 2].tolist() == C[0][1]
    module = TeacherKLDivLoss(model=None, temperature=tau, distill="stable")
    unsorted = module.compute_loss_from_embeddings([q, c[:, 0], c[:, 1], c[:, 2]], p)
    assert unsorted.item() == pytest.approx(llm_embedder_loss(q, sc, sp.log(), cos_temperature=tau,
                                                              distill="stable").item(), rel=1e-6)


def test_kl_gradient_is_flagembeddings_scale():
    """d loss / d cos = (p_student - p_teacher) / (B tau): with tau = 0.01 about 100x the cosine gap,
    where the previous T^2-scaled loss gave T (= 0.05) times it."""
    import torch

    from workflows.train.losses.distill import llm_embedder_loss

    q = torch.tensor([[1.0, 0.0]])
    angles = torch.tensor([0.3, 0.5], requires_grad=True)
    c = torch.stack([torch.stack([torch.cos(a), torch.sin(a)]) for a in angles]).unsqueeze(0)
    p = torch.tensor([[0.9, 0.1]])
    loss = llm_embedder_loss(q, c, p.log(), cos_temperature=0.01)
    cos = torch.cos(angles.detach())
    student = torch.softmax(cos / 0.01, dim=0)
    loss.backward()
    expected = (student - p[0]) / 0.01 * (-torch.sin(angles.detach()))
    assert torch.allclose(angles.grad, expected, rtol=1e-4)


# ---- PEG progressive weighting ----

def test_peg_schedule_and_weights_equal_hand_computation():
    import torch
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    from workflows.train.losses.peg import progress_lambda, progressive_infonce

    assert progress_lambda(0, 11, 2.0) == -2.0 and progress_lambda(5, 11, 2.0) == 0.0
    assert progress_lambda(10, 11, 2.0) == 2.0
    torch.manual_seed(0)
    a, pos, n1, n2 = (torch.randn(4, 8) for _ in range(4))
    # lam = 0: exactly sentence-transformers' MNRL with two hard-negative columns
    plain, w0 = progressive_infonce(a, [pos, n1, n2], scale=20.0, lam=0.0)
    ref = MultipleNegativesRankingLoss(model=None, scale=20.0).compute_loss_from_embeddings([a, pos, n1, n2], None)
    assert plain.item() == pytest.approx(ref.item(), rel=1e-5) and torch.allclose(w0, torch.ones(4))
    lam = 1.5
    A, D = a.tolist(), torch.cat([pos, n1, n2]).tolist()
    ce, diff = [], []
    for i in range(4):
        s = [20.0 * _dot(_unit(A[i]), _unit(d)) for d in D]
        ce.append(_logsumexp(s) - s[i])
        diff.append(1.0 - math.exp(-ce[-1]))
    z = [lam * d for d in diff]
    weights = [4 * math.exp(x - _logsumexp(z)) for x in z]
    got, w = progressive_infonce(a, [pos, n1, n2], scale=20.0, lam=lam)
    assert w.tolist() == pytest.approx(weights, rel=1e-5)
    assert got.item() == pytest.approx(sum(wi * c for wi, c in zip(weights, ce)) / 4, rel=1e-5)
    # late in training the hardest query weighs most
    assert int(w.argmax()) == max(range(4), key=lambda i: diff[i])


def test_peg_config_and_begin_step_reach_a_nested_loss(tiny_path):
    from workflows.train.losses.peg import ProgressiveMNRLLoss
    from workflows.train.losses.steps import begin_step

    spec = {"kind": "mnrl", "num_negatives": 2, "progressive": 2.0,
            "matryoshka2d": {"layers": [2], "dims": [32, 8]}}
    objective = OBJ.validate_python(spec)
    st = load(tiny_path)
    loss = build_loss(objective, st)
    assert begin_step(loss, step=9, total_steps=10, seed=3) == 2  # the 2DMSE wrapper and the PEG base
    peg = [m for m in loss.modules() if isinstance(m, ProgressiveMNRLLoss)][0]
    assert peg.lam == 2.0 and loss.seed == 3 and loss.step == 9
    value = loss_on(st, loss, objective, batch_for(objective))
    value.backward()
    assert any(v.abs().sum() > 0 for v in grads(st).values())
    with pytest.raises(ValidationError, match="progressive"):
        OBJ.validate_python({"kind": "cached_mnrl", "progressive": 1.0})


# ---- DSE ----

def test_dse_mixes_gold_and_teacher():
    import torch
    from sentence_transformers.sentence_transformer.losses import CosineSimilarityLoss

    from workflows.train.losses.dse import MixedScoreDistillLoss

    objective = OBJ.validate_python({"kind": "score_distill", "alpha": 0.3, "gold_column": "score"})
    assert required_columns(objective) == ["sentence1", "sentence2", "teacher_score", "score"]
    labels = labels_from_batch(objective, {"teacher_score": [0.9, 0.2], "score": [1.0, 0.0]})
    assert labels.flatten().tolist() == pytest.approx([0.9, 1.0, 0.2, 0.0])
    torch.manual_seed(0)
    u, v = torch.randn(2, 4), torch.randn(2, 4)
    cos = torch.nn.functional.cosine_similarity(u, v).tolist()
    mse = lambda target: sum((c - t) ** 2 for c, t in zip(cos, target)) / 2  # noqa: E731
    expected = 0.7 * mse([1.0, 0.0]) + 0.3 * mse([0.9, 0.2])
    loss = MixedScoreDistillLoss(None, CosineSimilarityLoss(model=None), 0.3)
    assert loss.compute_loss_from_embeddings([u, v], labels).item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValidationError, match="gold_column"):
        OBJ.validate_python({"kind": "score_distill", "alpha": 0.5})


# ---- 2DMSE: seeded sampling and AnglE ESE weights ----

def test_2dmse_sampling_is_a_function_of_seed_and_step(tiny_path):
    from workflows.train.losses.grid import Matryoshka2dGridLoss
    from workflows.train.losses.steps import begin_step

    from sentence_transformers.sentence_transformer.losses import CoSENTLoss

    st = load(tiny_path)

    def draws(seed, steps=12):
        loss = Matryoshka2dGridLoss(st, CoSENTLoss(st), [0, 1, 2, 3], [32, 16, 8], n_layers_per_step=1,
                                    n_dims_per_step=2)
        out = []
        for step in range(steps):
            begin_step(loss, step=step, total_steps=steps, seed=seed)
            out.append(loss.sample())
        return out

    assert draws(0) == draws(0)
    assert draws(0) != draws(1)
    assert len({tuple(d) for d, _ in draws(0)}) > 1  # the depth changes across steps


def test_ese_weights_every_depth_by_decay(tiny_path):
    import torch
    from sentence_transformers.sentence_transformer.losses import CoSENTLoss

    from workflows.train.losses.grid import Matryoshka2dGridLoss, embed_depths, ese_weight

    assert ese_weight(0) == 1.0 and ese_weight(1) == pytest.approx(1 / (1 + math.log(2)))
    with pytest.raises(ValidationError, match="n_layers_per_step"):
        OBJ.validate_python({"kind": "cosent", "matryoshka2d": {"layers": [1, 2], "dims": [8],
                                                                "layer_weights": "ese", "n_layers_per_step": 1}})
    objective = OBJ.validate_python({"kind": "cosent", "matryoshka2d": {
        "layers": [1, 2, 3], "dims": [32, 8], "layer_weights": "ese", "n_layers_per_step": -1,
        "kl_temperature": 0.0}})
    st = load(tiny_path)
    batch = batch_for(objective)
    ese = build_loss(objective, st)
    got = loss_on(st, ese, objective, batch)
    # by hand: full depth + mean over depths of ese_weight(k) * Matryoshka(k)
    plain = Matryoshka2dGridLoss(st, CoSENTLoss(st), [1, 2, 3], [32, 8], n_layers_per_step=-1, kl_temperature=0.0)
    features = [st.preprocess(batch[c]) for c in ("sentence1", "sentence2")]
    labels = labels_from_batch(objective, batch)
    with torch.no_grad():
        embs = [embed_depths(st, st, f, [1, 2, 3]) for f in features]
        expected = plain._matryoshka([e[:, 0] for e in embs], labels, [0, 1])
        for j, k in enumerate([1, 2, 3], start=1):
            expected = expected + ese_weight(k) / 3 * plain._matryoshka([e[:, j] for e in embs], labels, [0, 1])
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


# ---- 2 gloo workers: seeded 2DMSE training; gathered LLM-Embedder pool ----

SEEDED_SPEC = {"kind": "mnrl", "gather_across_workers": True,
               "matryoshka2d": {"layers": [1, 2, 3], "dims": [32, 8], "n_layers_per_step": 1}}
STEPS = 4


def _seeded_run(rank, world, path, seed):
    """A few optimizer steps the way workflows.train.loop runs them; returns (losses, depths) per step."""
    import torch

    from workflows.train.loop import FlatGradients, broadcast_parameters
    from workflows.train.losses.steps import begin_step

    torch.manual_seed(1234 + rank)  # model randomness is fixed; only the 2DMSE seed varies
    objective = OBJ.validate_python(SEEDED_SPEC)
    st = load(path)
    broadcast_parameters(st, world)
    loss_fn = build_loss(objective, st)
    params = [p for p in st.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    flat = FlatGradients(params)
    history = []
    for step in range(STEPS):
        rows = {c: v[rank * 4:(rank + 1) * 4] for c, v in batch_for(objective).items()}
        begin_step(loss_fn, step=step, total_steps=STEPS, seed=seed)
        depths, _ = loss_fn.sample()
        loss_fn.step = step  # sample() advanced it; the forward pass draws this step again
        value = loss_on(st, loss_fn, objective, rows)
        value.backward()
        flat.average(world)
        opt.step()
        flat.zero()
        mean = value.detach().clone()
        torch.distributed.all_reduce(mean)
        history.append((mean.item() / world, depths))
    return history


def _gloo_worker(rank, world, port, path, out_dir):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        runs = {"a": _seeded_run(rank, world, path, seed=0), "b": _seeded_run(rank, world, path, seed=0),
                "c": _seeded_run(rank, world, path, seed=1)}
        # the pooled (gathered) LLM-Embedder loss on half batches
        spec = {"kind": "kl_distill", "num_candidates": 3, "distill": "stable", "contrastive_weight": 0.2,
                "temperature": 0.05}
        objective = OBJ.validate_python(spec)
        st = load(path)
        half = {c: v[rank * 4:(rank + 1) * 4] for c, v in batch_for(objective).items()}
        half["teacher_probs"] = [[0.6, 0.1, 0.3]] * 4
        value = loss_on(st, build_loss(objective, st), objective, half)
        value.backward()
        g = grads(st)
        for t in g.values():
            dist.all_reduce(t)
            t.div_(world)
        mean = value.detach().clone()
        dist.all_reduce(mean)
        torch.save({"runs": runs, "pooled": (mean.item() / world, g)}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_workers_seeded_2dmse_and_pooled_distillation(tiny_path, tmp_path):
    import torch
    import torch.multiprocessing as mp

    mp.spawn(_gloo_worker, args=(2, _free_port(), tiny_path, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    for name in ("a", "b", "c"):
        assert [d for _, d in r0["runs"][name]] == [d for _, d in r1["runs"][name]], f"run {name}: ranks disagree"
    assert r0["runs"]["a"] == r0["runs"]["b"], "one seed, two runs: loss histories differ"
    assert [d for _, d in r0["runs"]["a"]] != [d for _, d in r0["runs"]["c"]], "another seed drew the same depths"
    assert [v for v, _ in r0["runs"]["a"]] != [v for v, _ in r0["runs"]["c"]]

    # gathered candidates across 2 workers == the single-process loss over the full batch
    spec = {"kind": "kl_distill", "num_candidates": 3, "distill": "stable", "contrastive_weight": 0.2,
            "temperature": 0.05}
    objective = OBJ.validate_python(spec)
    st = load(tiny_path)
    full = batch_for(objective)
    full["teacher_probs"] = [[0.6, 0.1, 0.3]] * 8
    value = loss_on(st, build_loss(objective, st), objective, full)
    value.backward()
    loss2, grads2 = r0["pooled"]
    assert loss2 == pytest.approx(value.item(), abs=1e-5)
    assert_grads_close(grads2, grads(st), "gathered vs full batch, stable distillation + contrastive")


def test_feedback_rows_become_mnrl_rows_with_several_mined_negatives():
    import pyarrow as pa

    from workflows.train.hard_negatives import feedback_negatives

    rows = pa.table({"qid": ["a"] * 4 + ["b"] * 2, "question": ["qa"] * 4 + ["qb"] * 2,
                     "passage": ["gold", "n2", "n1", "n3", "gold b", "x"], "rank": [0, 2, 1, 3, 0, 1],
                     "is_positive": [True, False, False, False, True, False]})
    table, dropped = feedback_negatives(rows, 2)
    assert table.to_pydict() == {"anchor": ["qa"], "positive": ["gold"], "negative_1": ["n1"], "negative_2": ["n2"]}
    assert dropped == 1  # query b has one mined negative
    objective = OBJ.validate_python({"kind": "mnrl", "num_negatives": 2})
    assert table.column_names == required_columns(objective)
    assert feedback_negatives(rows, 1)[0].column_names == ["anchor", "positive", "negative"]
