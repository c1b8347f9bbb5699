"""Small-scale ablations of the seed methods' objectives: one row per method (variant vs baseline).

    flock /tmp/ef-heavy.lock .venv/bin/python -m benchmarks.fidelity --quick
    flock /tmp/ef-heavy.lock .venv/bin/python -m benchmarks.fidelity --seeds 0 1 --steps 150 \\
        --feedback /tmp/embedforge/reward --teachers /tmp/embedforge/reward /tmp/embedforge/reward-gemma

Every run trains all-minilm-l6-v2 in this one process with the project's loss modules
(``workflows.train.losses.build_loss``, the loop's ``make_batch`` and ``begin_step``), AdamW with
linear warmup/decay; it is not a Ray Train run (2 cores: one process trains several variants in
the time one 2-worker run starts). Only train and dev data are read, never a test split:

* **2DMSE** (CoSENT on STS-B train): Spearman on STS-B dev at half depth (3 of 6 layers) and at
  64 dims, as a share of full depth/width, for plain CoSENT, 2DMSE (one sampled depth per step)
  and the ESE option (every depth, decaying weights).
* **PEG** (XQuAD train, first half of its articles): MNRL with 3 mined hard negatives per query
  (mined by the base model among the training contexts) and PEG's progressive weighting vs the
  same MNRL without it, and vs plain MNRL on pairs; nDCG@10 on the other half of the train articles.
* **LLM-Embedder** (needs ``--feedback``: a committed reward output, e.g. the reward stage run on
  ``--reward-input``'s file, which holds questions of the first half of the train articles only): KL and stable distillation
  from its LLM-feedback teacher vs contrastive-only on the same queries; nDCG@10 on the train
  articles the reward run did not read.
* **DSE teacher** (needs ``--teachers``: reward outputs with ``sts_eval``): Spearman of each LLM
  read as a cross-encoder, and of their rank-average, against the student's own cosine on the same
  STS-B dev pairs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BASE = "all-minilm-l6-v2"
GRID = {"layers": [1, 2, 3, 4, 5], "dims": [384, 256, 128, 64, 32]}


# ---------------------------------------------------------------- training and scoring

def train(spec: dict, rows: dict[str, list], steps: int, seed: int, batch: int = 16, lr: float = 2e-5) -> Any:
    """Fine-tune the base model on ``rows`` with objective ``spec`` for ``steps`` steps; returns the model."""
    import numpy as np
    import pyarrow as pa
    import torch
    from pydantic import TypeAdapter
    from transformers import get_linear_schedule_with_warmup

    from embedforge.models import resolve_model
    from workflows.train.config import ModelConfig
    from workflows.train.loop import build_model, make_batch
    from workflows.train.losses import ObjectiveConfig, build_loss, required_columns
    from workflows.train.losses.steps import begin_step

    objective = TypeAdapter(ObjectiveConfig).validate_python(spec)
    torch.manual_seed(seed)
    model = build_model(resolve_model(BASE), ModelConfig(base=BASE))
    model.train()
    loss_fn = build_loss(objective, model)
    table = pa.table({c: rows[c] for c in required_columns(objective)})
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = get_linear_schedule_with_warmup(opt, int(0.1 * steps), steps)
    rng = np.random.default_rng(seed)
    order: list[int] = []
    for step in range(steps):
        while len(order) < batch:
            order.extend(rng.permutation(table.num_rows).tolist())
        idx, order = order[:batch], order[batch:]
        features, labels = make_batch(model, objective, table, idx, "cpu")
        begin_step(loss_fn, step=step, total_steps=steps, seed=seed)
        loss = loss_fn(features, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    return model


def embed(model: Any, texts: list[str], depth: int | None = None, dim: int | None = None, batch: int = 64):
    """Normalized embeddings, after ``depth`` layers (None: all) and truncated to ``dim`` (None: all)."""
    import torch
    import torch.nn.functional as F

    from embedforge.elastic import num_layers
    from workflows.train.losses.grid import embed_depths

    full = num_layers(model)
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            feats = model.preprocess(texts[i:i + batch])
            e = embed_depths(model, model, feats, [] if depth in (None, full) else [depth])[:, -1]
            out.append(F.normalize(e[:, :dim] if dim else e, dim=-1))
    return torch.cat(out).numpy()


def sts_spearman(model: Any, dev: dict[str, list], depth: int | None = None, dim: int | None = None) -> float:
    from scipy.stats import spearmanr

    a, b = embed(model, dev["sentence1"], depth, dim), embed(model, dev["sentence2"], depth, dim)
    return 100 * float(spearmanr((a * b).sum(-1), dev["score"]).statistic)


def ndcg10(model: Any, ir: dict[str, Any]) -> float:
    """nDCG@10 of cosine retrieval (sentence-transformers' InformationRetrievalEvaluator)."""
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    ev = InformationRetrievalEvaluator(ir["queries"], ir["corpus"], ir["relevant"], name="ir", write_csv=False,
                                       ndcg_at_k=[10], mrr_at_k=[10], accuracy_at_k=[1], map_at_k=[10],
                                       precision_recall_at_k=[10], batch_size=64)
    results = ev(model)
    return 100 * float(next(v for key, v in results.items() if key.endswith("ndcg@10")))


def progress(method: str, variant: str, seed: int, value: Any, wall: float | None = None) -> None:
    """One finished training run, printed at once (a long ablation keeps what it measured so far)."""
    took = "" if wall is None else f" ({wall:.0f} s)"
    print(f"run {method} {variant} seed {seed}: {json.dumps(value)}{took}", flush=True)


def scored(method: str, name: str, seeds: list[int], run) -> list[float]:
    out = []
    for seed in seeds:
        t0 = time.perf_counter()
        out.append(run(seed))
        progress(method, name, seed, out[-1], time.perf_counter() - t0)
    return out


def mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


# ---------------------------------------------------------------- data

def stsb(split: str, limit: int | None) -> dict[str, list]:
    from embedforge.data import DatasetSpec, load_dataset

    df = load_dataset(DatasetSpec(source="stsb", split=split, limit=limit))
    return {c: df[c].to_list() for c in ("sentence1", "sentence2", "score")}


def xquad_halves() -> tuple[Any, Any, list[str]]:
    """XQuAD train split (never its test articles) cut by article: (first half, second half, article order)."""
    from embedforge.data import DatasetSpec, load_dataset

    df = load_dataset(DatasetSpec(source="xquad", split="train", lang="en"))
    articles = list(dict.fromkeys(df["article"].to_list()))
    half = set(articles[: len(articles) // 2])
    return df.filter(df["article"].is_in(list(half))), df.filter(~df["article"].is_in(list(half))), articles


def write_reward_input(path: str, every: int) -> int:
    """Every ``every``-th question of the first half of the XQuAD train articles as a qa JSONL file
    for the reward stage (``llm_feedback.data.source``); the second half stays unread for nDCG."""
    first, _, _ = xquad_halves()
    rows = first.with_row_index("_i").filter(first.with_row_index("_i")["_i"] % every == 0).drop("_i")
    rows.select("qid", "question", "context", "answer", "lang", "article").write_ndjson(path)
    return rows.height


def ir_task(df: Any) -> dict[str, Any]:
    contexts = list(dict.fromkeys(df["context"].to_list()))
    cid = {c: f"c{i}" for i, c in enumerate(contexts)}
    return {"queries": dict(zip(df["qid"].to_list(), df["question"].to_list())),
            "corpus": {v: k for k, v in cid.items()},
            "relevant": {q: {cid[c]} for q, c in zip(df["qid"].to_list(), df["context"].to_list())}}


def mine_negatives(df: Any, n: int) -> dict[str, list]:
    """anchor, positive, negative_1..n: the base model's top contexts of the same pool that are not the gold."""
    from sentence_transformers import SentenceTransformer

    from embedforge.models import resolve_model

    st = SentenceTransformer(resolve_model(BASE), device="cpu")
    contexts = list(dict.fromkeys(df["context"].to_list()))
    q = st.encode(df["question"].to_list(), normalize_embeddings=True, batch_size=64)
    c = st.encode(contexts, normalize_embeddings=True, batch_size=64)
    sims = q @ c.T
    rows: dict[str, list] = {"anchor": df["question"].to_list(), "positive": df["context"].to_list()}
    for i in range(1, n + 1):
        rows[f"negative_{i}"] = []
    for r, gold in enumerate(rows["positive"]):
        ranked = [contexts[j] for j in sims[r].argsort()[::-1] if contexts[j] != gold][:n]
        for i, text in enumerate(ranked, start=1):
            rows[f"negative_{i}"].append(text)
    return rows


# ---------------------------------------------------------------- the ablations

def row(method: str, variant: str, baseline: str, metric: str, v: list[float], b: list[float], scale: str) -> dict:
    delta = [x - y for x, y in zip(v, b)]
    return {"method": method, "variant": variant, "baseline": baseline, "metric": metric,
            "variant_value": mean_sd(v), "baseline_value": mean_sd(b), "delta": mean_sd(delta), "scale": scale,
            "runs": {"variant": v, "baseline": b}}


def ablate_2dmse(seeds: list[int], steps: int, dev_limit: int | None, variants: list[str] | None = None) -> list[dict]:
    train_rows, dev = stsb("train", None), stsb("dev", dev_limit)
    specs = {"cosent": {"kind": "cosent"},
             "2dmse": {"kind": "cosent", "matryoshka2d": {**GRID, "n_layers_per_step": 1}},
             "2dmse-ese": {"kind": "cosent", "matryoshka2d": {**GRID, "n_layers_per_step": -1,
                                                               "layer_weights": "ese"}}}
    specs = {name: spec for name, spec in specs.items() if not variants or name in variants}
    scores: dict[str, dict[str, list[float]]] = {name: {"full": [], "half": [], "d64": []} for name in specs}
    for name, spec in specs.items():
        for seed in seeds:
            t0 = time.perf_counter()
            model = train(spec, train_rows, steps, seed)
            full = sts_spearman(model, dev)
            scores[name]["full"].append(full)
            scores[name]["half"].append(100 * sts_spearman(model, dev, depth=3) / full)
            scores[name]["d64"].append(100 * sts_spearman(model, dev, dim=64) / full)
            progress("2dmse", name, seed, {k: v[-1] for k, v in scores[name].items()}, time.perf_counter() - t0)
    scale = f"{steps} steps x 16 pairs, seeds {seeds}, STS-B dev {len(dev['score'])} pairs"
    out = []
    if "cosent" not in specs:
        return out
    for name in [n for n in ("2dmse", "2dmse-ese") if n in specs]:
        out.append(row("2DMSE", name, "cosent", "half-depth retention % (STS-B dev)",
                       scores[name]["half"], scores["cosent"]["half"], scale))
        out.append(row("2DMSE", name, "cosent", "64-dim retention %", scores[name]["d64"], scores["cosent"]["d64"],
                       scale))
        out.append(row("2DMSE", name, "cosent", "full Spearman x100", scores[name]["full"], scores["cosent"]["full"],
                       scale))
    return out


def ablate_peg(seeds: list[int], steps: int, n_neg: int) -> list[dict]:
    first, second, _ = xquad_halves()
    rows = mine_negatives(first, n_neg)
    ir = ir_task(second)
    specs = {"mnrl-pairs": {"kind": "mnrl", "num_negatives": 0},
             "mnrl-hard": {"kind": "mnrl", "num_negatives": n_neg},
             "peg": {"kind": "mnrl", "num_negatives": n_neg, "progressive": 2.0}}
    got = {name: scored("peg", name, seeds, lambda seed, spec=spec: ndcg10(train(spec, rows, steps, seed), ir))
           for name, spec in specs.items()}
    scale = (f"{steps} steps x 16 queries, {n_neg} mined negatives, seeds {seeds}, train on "
             f"{first.height} questions, nDCG@10 over {second.height} questions of the other train articles")
    return [row("PEG", "mnrl+hard negatives+progressive", "mnrl+hard negatives", "nDCG@10", got["peg"],
                got["mnrl-hard"], scale),
            row("PEG", "mnrl+hard negatives", "mnrl pairs", "nDCG@10", got["mnrl-hard"], got["mnrl-pairs"], scale)]


def ablate_llm_embedder(feedback: str, seeds: list[int], steps: int, k: int,
                        variants: list[str] | None = None) -> list[dict]:
    from embedforge import storage
    from embedforge.data import DatasetSpec, load_dataset
    from workflows.train.mixture import pivot_feedback

    table, dropped = pivot_feedback(storage.read_output(feedback, "feedback"), k)
    rows = {c: table.column(c).to_pylist() for c in table.column_names}
    qa = load_dataset(DatasetSpec(source="xquad", split="train", lang="en"))
    used = set(qa.filter(qa["question"].is_in(rows["query"]))["article"].to_list())
    held = qa.filter(~qa["article"].is_in(list(used)))
    ir = ir_task(held)
    base = {"kind": "kl_distill", "num_candidates": k}
    specs = {"contrastive": {**base, "distill": "none", "contrastive_weight": 1.0},
             "kl": {**base, "distill": "kl"},
             "stable": {**base, "distill": "stable"},
             "kl+contrastive": {**base, "distill": "kl", "contrastive_weight": 0.2}}
    specs = {name: spec for name, spec in specs.items() if not variants or name in variants}
    base_ndcg = f"{ndcg10(load_base(), ir):.2f}" if "contrastive" in specs else "not measured in this run"
    print(f"llm_embedder: {len(rows['query'])} training queries x {k} candidates; nDCG@10 over {held.height} "
          f"held-out questions, {len(ir['corpus'])} contexts; base model {base_ndcg}", flush=True)
    got = {name: scored("llm_embedder", name, seeds, lambda seed, spec=spec: ndcg10(train(spec, rows, steps, seed), ir))
           for name, spec in specs.items()}
    scale = (f"{steps} steps x 16 queries, {len(rows['query'])} queries x {k} candidates ({dropped} dropped), "
             f"seeds {seeds}, nDCG@10 over {held.height} questions of {len(set(held['article'].to_list()))} "
             "train articles the reward run did not read")
    if "contrastive" not in got:
        return []
    return [row("LLM-Embedder", name, "contrastive only", "nDCG@10", got[name], got["contrastive"], scale)
            for name in ("kl", "stable", "kl+contrastive") if name in got]


def load_base() -> Any:
    from sentence_transformers import SentenceTransformer

    from embedforge.models import resolve_model

    return SentenceTransformer(resolve_model(BASE), device="cpu")


def dse_teachers(teachers: list[str]) -> list[dict]:
    import numpy as np
    from scipy.stats import rankdata, spearmanr

    from embedforge import storage
    from embedforge.models import resolve_model
    from sentence_transformers import SentenceTransformer

    frames = {}
    for uri in teachers:
        t = storage.read_output(uri, "sts_eval").to_pandas()
        frames[os.path.basename(uri.rstrip("/"))] = t.set_index(["sentence1", "sentence2"])
    common = sorted(set.intersection(*(set(f.index) for f in frames.values())))
    gold = np.asarray([next(iter(frames.values())).loc[p, "score"] for p in common], dtype=float)
    st = SentenceTransformer(resolve_model(BASE), device="cpu")
    a = st.encode([p[0] for p in common], normalize_embeddings=True)
    b = st.encode([p[1] for p in common], normalize_embeddings=True)
    student = 100 * float(spearmanr((a * b).sum(-1), gold).statistic)
    out, ranks = [], []
    for name, f in frames.items():
        t = np.asarray([f.loc[p, "teacher_score"] for p in common], dtype=float)
        ranks.append(rankdata(t))
        out.append(row("DSE teacher", f"{name} as cross-encoder", f"student cosine ({BASE})", "Spearman x100 (dev)",
                       [100 * float(spearmanr(t, gold).statistic)], [student], f"{len(common)} STS-B dev pairs"))
    if len(frames) > 1:
        ens = np.mean(ranks, axis=0)
        out.append(row("DSE teacher", "rank-average of the LLMs", f"student cosine ({BASE})", "Spearman x100 (dev)",
                       [100 * float(spearmanr(ens, gold).statistic)], [student], f"{len(common)} STS-B dev pairs"))
    return out


def hf_cross_encoder(model_name: str, dev: dict[str, list], chat: bool) -> list[float]:
    """An LLM read as a cross-encoder with transformers: the reward stage's few-shot prompt, then the
    expected score ``sum_k k p(k) / sum_k p(k)`` over the next-token probabilities of the digits 0-5."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from actors.reward_scorer import DEFAULT_CROSS_ENCODER_TEMPLATE
    from embedforge.models import resolve_model

    path = resolve_model(model_name)
    tok = AutoTokenizer.from_pretrained(path)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    digits = [tok.convert_tokens_to_ids(str(k)) for k in range(6)]
    scores = []
    with torch.no_grad():
        for s1, s2 in zip(dev["sentence1"], dev["sentence2"]):
            message = DEFAULT_CROSS_ENCODER_TEMPLATE.format(sentence1=s1, sentence2=s2)
            if chat:
                text = tok.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                               add_generation_prompt=True) + "Similarity (0-5): "
            else:
                text = message + "\nSimilarity (0-5): "
            ids = tok(text, return_tensors="pt")
            p = torch.softmax(lm(**ids).logits[0, -1], dim=-1)[digits]
            scores.append(float((p * torch.arange(6)).sum() / p.sum()))
    return scores


def dse_hf_teachers(names: list[str], limit: int) -> list[dict]:
    from scipy.stats import rankdata, spearmanr

    from embedforge.models import resolve_model
    from sentence_transformers import SentenceTransformer

    dev = stsb("dev", limit)
    st = SentenceTransformer(resolve_model(BASE), device="cpu")
    a = st.encode(dev["sentence1"], normalize_embeddings=True)
    b = st.encode(dev["sentence2"], normalize_embeddings=True)
    student = 100 * float(spearmanr((a * b).sum(-1), dev["score"]).statistic)
    out, ranks = [], []
    for name in names:
        t = hf_cross_encoder(name, dev, chat="instruct" in name)
        ranks.append(rankdata(t))
        out.append(row("DSE teacher", f"{name} as cross-encoder (transformers)", f"student cosine ({BASE})",
                       "Spearman x100 (dev)", [100 * float(spearmanr(t, dev["score"]).statistic)], [student],
                       f"{len(t)} STS-B dev pairs"))
        progress("dse", name, 0, [out[-1]["variant_value"], student])
    if len(names) > 1:
        ens = sum(ranks) / len(ranks)
        out.append(row("DSE teacher", "rank-average of the LLMs", f"student cosine ({BASE})", "Spearman x100 (dev)",
                       [100 * float(spearmanr(ens, dev["score"]).statistic)], [student], f"{len(ens)} STS-B dev pairs"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few minutes on 2 cores: 1 seed, few steps")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per training run")
    parser.add_argument("--only", nargs="+", choices=["2dmse", "peg", "llm_embedder", "dse"],
                        default=["2dmse", "peg", "llm_embedder", "dse"])
    parser.add_argument("--feedback", help="committed reward output with LLM feedback (LLM-Embedder row)")
    parser.add_argument("--teachers", nargs="*", default=[], help="reward outputs with sts_eval (DSE row)")
    parser.add_argument("--hf-teachers", nargs="*", default=[],
                        help="packaged LLMs to read as cross-encoders with transformers (DSE row), e.g. gemma-3-270m")
    parser.add_argument("--teacher-pairs", type=int, default=100, help="STS-B dev pairs for --hf-teachers")
    parser.add_argument("--candidates", type=int, default=4, help="kl_distill candidates per query")
    parser.add_argument("--out", help="write the rows as JSON here")
    parser.add_argument("--variants", nargs="+", choices=["cosent", "2dmse", "2dmse-ese"],
                        help="2DMSE row: train only these (rows need cosent too; runs are printed either way)")
    parser.add_argument("--le-variants", nargs="+", choices=["contrastive", "kl", "stable", "kl+contrastive"],
                        help="LLM-Embedder row: train only these (rows need contrastive too; runs are printed either way)")
    parser.add_argument("--reward-input", help="write the reward stage's input (XQuAD train, first half of the "
                                               "articles, every --reward-every-th question) to this JSONL and exit")
    parser.add_argument("--reward-every", type=int, default=2)
    parser.add_argument("--dev-limit", type=int, help="STS-B dev pairs for the 2DMSE row (default: all)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.reward_input:
        print(f"{write_reward_input(args.reward_input, args.reward_every)} questions -> {args.reward_input}")
        return
    import torch

    torch.set_num_threads(args.threads)
    seeds, steps, dev_limit = ((args.seeds[:1], min(args.steps, 30), 300) if args.quick
                               else (args.seeds, args.steps, args.dev_limit))
    rows: list[dict] = []
    t0 = time.perf_counter()
    if "2dmse" in args.only:
        rows += ablate_2dmse(seeds, steps, dev_limit, args.variants)
    if "peg" in args.only:
        rows += ablate_peg(seeds, steps, n_neg=3)
    if "dse" in args.only and args.hf_teachers:
        rows += dse_hf_teachers(args.hf_teachers, args.teacher_pairs)
    if "dse" in args.only:
        if args.teachers:
            dse_rows = dse_teachers(args.teachers)
            for r in dse_rows:
                progress("dse", r["variant"], 0, [r["variant_value"], r["baseline_value"]])
            rows += dse_rows
        else:
            print("DSE teacher: skipped (pass --teachers, reward outputs with sts_eval)")
    if "llm_embedder" in args.only:
        if args.feedback:
            rows += ablate_llm_embedder(args.feedback, seeds, steps, args.candidates, args.le_variants)
        else:
            print("LLM-Embedder: skipped (pass --feedback, a committed reward output with LLM feedback)")
    print(f"{'method':<13} {'variant':<34} {'baseline':<28} {'metric':<36} {'variant':>14} {'baseline':>14} "
          f"{'delta':>14}")
    for r in rows:
        print(f"{r['method']:<13} {r['variant']:<34} {r['baseline']:<28} {r['metric']:<36} {r['variant_value']:>14} "
              f"{r['baseline_value']:>14} {r['delta']:>14}")
    for scale in dict.fromkeys(r["scale"] for r in rows):
        print(f"scale: {scale}")
    print(f"machine: {os.cpu_count()} CPUs; wall {time.perf_counter() - t0:.0f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
