"""Evaluate CIPHER debate against natural-language debate and a single agent.

Problems: the first ``gsm8k_limit`` GSM8K *test* problems (final evaluation only; nothing is tuned
on them) and Du et al.'s arithmetic ``a+b*c+d-e*f`` with operands drawn from a seeded generator.
Every mode uses the same model and the same token budget per response (``max_tokens``); debates
use the configured temperatures, a single agent the lowest one. Agents run as Ray actors (one
CipherAgent on transformers for CIPHER, one TextAgent on vLLM for the baselines), decoding a batch
of questions at a time.

Outputs (committed under ``output`` with a manifest): ``results.parquet`` (one row per question and
mode, with the transcript), ``summary.json``, ``report.md`` and ``accuracy.png`` (accuracy with
95% Wilson intervals). Wall time per question is each batch's time divided by its size.
"""

from __future__ import annotations

import json
import logging
import random
import time
from typing import Any

from workflows.debate import protocol as P
from workflows.debate.config import DebateEvalConfig

log = logging.getLogger(__name__)

ARITHMETIC_PROMPT = "What is the result of {a}+{b}*{c}+{d}-{e}*{f}?"


def arithmetic_problems(count: int, seed: int, high: int = 30) -> list[dict[str, str]]:
    """Du et al.'s arithmetic task: ``a+b*c+d-e*f`` with operands in [0, high), seeded."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        a, b, c, d, e, f = (rng.randrange(high) for _ in range(6))
        out.append({"qid": f"arith-{seed}-{i}", "dataset": "arithmetic",
                    "question": ARITHMETIC_PROMPT.format(a=a, b=b, c=c, d=d, e=e, f=f),
                    "gold": str(a + b * c + d - e * f)})
    return out


def gsm8k_problems(limit: int) -> list[dict[str, str]]:
    """The first ``limit`` GSM8K test problems with their ``####`` final answers."""
    from embedforge import schemas as S
    from embedforge.data.spec import DatasetSpec, load_dataset

    if limit == 0:
        return []
    df = load_dataset(DatasetSpec(source="gsm8k", split="test", limit=limit))
    return [{"qid": f"gsm8k-test-{i}", "dataset": "gsm8k", "question": row[S.QUESTION], "gold": row[S.FINAL]}
            for i, row in enumerate(df.iter_rows(named=True))]


def wilson_interval(correct: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (scipy's ``binomtest``)."""
    from scipy.stats import binomtest

    if n == 0:
        return float("nan"), float("nan")
    ci = binomtest(correct, n).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def debate_batch(agent: Any, mode: str, questions: list[str], temperatures: list[float], rounds: int,
                 max_tokens: int, model_name: str, receivers: dict[str, str] | None, timeout_s: float) -> list[dict]:
    """Run one batch of debates; ``agent`` is a Ray actor handle with ``respond``. One dict per question."""
    import ray

    models = [model_name] * len(temperatures)
    previous = None
    transcripts: list[list[list[dict]]] = [[] for _ in questions]
    for _ in range(rounds):
        convs = P.next_round(questions, mode, models, previous)  # [agent][question]
        refs = [agent.respond.remote(convs[i], t, max_tokens, receivers) for i, t in enumerate(temperatures)]
        previous = ray.get(refs, timeout=timeout_s)
        for q in range(len(questions)):
            transcripts[q].append([{"text": previous[i][q].text, "completion_tokens": previous[i][q].completion_tokens,
                                    "prompt_tokens": previous[i][q].prompt_tokens} for i in range(len(temperatures))])
    out = []
    for q in range(len(questions)):
        answers = [P.extract_answer(m["text"]) for m in transcripts[q][-1]]
        out.append({"final_answer": P.final_answer(mode, temperatures, answers), "transcript": transcripts[q],
                    "completion_tokens": sum(m["completion_tokens"] for rnd in transcripts[q] for m in rnd),
                    "prompt_tokens": sum(m["prompt_tokens"] for rnd in transcripts[q] for m in rnd)})
    return out


def summarize(records: list[dict]) -> list[dict]:
    """Per (dataset, mode) and per mode over all datasets: accuracy, Wilson CI, tokens and seconds per question."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        groups.setdefault((r["dataset"], r["mode"]), []).append(r)
        groups.setdefault(("all", r["mode"]), []).append(r)
    rows = []
    for (dataset, mode), rs in sorted(groups.items()):
        k, n = sum(r["correct"] for r in rs), len(rs)
        low, high = wilson_interval(k, n)
        rows.append({"dataset": dataset, "mode": mode, "n": n, "correct": k, "accuracy": k / n, "ci_low": low,
                     "ci_high": high, "completion_tokens_per_q": sum(r["completion_tokens"] for r in rs) / n,
                     "prompt_tokens_per_q": sum(r["prompt_tokens"] for r in rs) / n,
                     "seconds_per_q": sum(r["seconds"] for r in rs) / n})
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = ["| dataset | mode | n | accuracy | 95% CI | completion tokens / q | prompt tokens / q | wall s / q |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['mode']} | {r['n']} | {r['accuracy']:.3f} | "
                     f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}] | {r['completion_tokens_per_q']:.1f} | "
                     f"{r['prompt_tokens_per_q']:.1f} | {r['seconds_per_q']:.2f} |")
    return "\n".join(lines)


def plot_accuracy(rows: list[dict], path: str) -> None:
    """Grouped bars (dataset x mode) with Wilson-interval error bars, written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({r["dataset"] for r in rows})
    modes = sorted({r["mode"] for r in rows})
    width = 0.8 / len(modes)
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(datasets), 3.6))
    for j, mode in enumerate(modes):
        xs, ys, err = [], [], [[], []]
        for i, d in enumerate(datasets):
            r = next((r for r in rows if r["dataset"] == d and r["mode"] == mode), None)
            if r:
                xs.append(i + (j - (len(modes) - 1) / 2) * width)
                ys.append(r["accuracy"])
                err[0].append(r["accuracy"] - r["ci_low"])
                err[1].append(r["ci_high"] - r["accuracy"])
        ax.bar(xs, ys, width, yerr=err, capsize=3, label=mode)
    ax.set_xticks(range(len(datasets)), datasets)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (95% Wilson CI)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_debate_eval(config: DebateEvalConfig) -> dict[str, Any]:
    """Evaluate every configured mode; commit results, report and plot under ``config.output``."""
    import tempfile
    from pathlib import Path

    import pyarrow as pa
    import ray

    from actors.cipher_agent import CipherAgent
    from actors.text_agent import TextAgent, TextAgentConfig
    from embedforge import storage
    from embedforge.runtime import check_resources, init_ray

    init_ray(config.ray)
    problems = gsm8k_problems(config.data.gsm8k_limit) + arithmetic_problems(
        config.data.arithmetic_count, config.data.arithmetic_seed, config.data.arithmetic_max)
    records: list[dict] = []
    for mode in config.modes:
        temps = [min(config.temperatures)] if mode == "single" else list(config.temperatures)
        rounds = 1 if mode == "single" else config.rounds
        if mode == "cipher":
            cfg = config.cipher.model_copy(update={"model": config.model})
            check_resources(cfg.num_cpus, 0, "debate_eval cipher agent", config.ray.fail_fast_on_missing_gpus)
            agent = ray.remote(num_cpus=cfg.num_cpus)(CipherAgent).remote(cfg)
            receivers = {config.model: config.model}
        else:
            eng = config.engine.model_copy(update={"model": config.model})
            check_resources(eng.num_cpus, 0, "debate_eval text agent", config.ray.fail_fast_on_missing_gpus)
            agent = ray.remote(**eng.ray_options())(TextAgent).remote(TextAgentConfig(engine=eng))
            receivers = None
        ray.get(agent.__ray_ready__.remote(), timeout=config.timeout_s)
        log.info("mode %s: %d problems, %d agents x %d rounds, %d tokens", mode, len(problems), len(temps), rounds,
                 config.max_tokens)
        for start in range(0, len(problems), config.batch_size):
            batch = problems[start:start + config.batch_size]
            t0 = time.perf_counter()
            outs = debate_batch(agent, mode, [p["question"] for p in batch], temps, rounds, config.max_tokens,
                                config.model, receivers, config.timeout_s)
            per_q = (time.perf_counter() - t0) / len(batch)
            for p, o in zip(batch, outs, strict=True):
                records.append({**p, "mode": mode, "final_answer": o["final_answer"],
                                "correct": P.answers_equal(o["final_answer"], p["gold"]),
                                "completion_tokens": o["completion_tokens"], "prompt_tokens": o["prompt_tokens"],
                                "seconds": per_q, "transcript": json.dumps(o["transcript"])})
            log.info("mode %s: %d/%d done (%.2fs per question)", mode, start + len(batch), len(problems), per_q)
        ray.kill(agent)
    rows = summarize(records)
    by_mode = {r["mode"]: r for r in rows if r["dataset"] == "all"}
    ratio = (by_mode["cipher"]["seconds_per_q"] / by_mode["natural"]["seconds_per_q"]
             if "cipher" in by_mode and "natural" in by_mode else None)
    summary = {"model": config.model, "temperatures": list(config.temperatures), "rounds": config.rounds,
               "max_tokens": config.max_tokens, "table": rows, "cipher_over_natural_wall_time": ratio}
    report = (f"# Debate evaluation: {config.model}\n\nAgents' temperatures {list(config.temperatures)} "
              f"(single: {min(config.temperatures)}), {config.rounds} rounds, {config.max_tokens} tokens per "
              f"response. CIPHER on transformers, natural/single on vLLM.\n\n{markdown_table(rows)}\n\n"
              f"CIPHER wall time per debate / natural-language debate: "
              f"{'n/a' if ratio is None else f'{ratio:.2f}x'}\n")
    out = config.output
    storage.write_parquet(storage.join(out, "results.parquet"), pa.Table.from_pylist(records))
    storage.write_json(storage.join(out, "summary.json"), summary)
    storage.write_bytes(storage.join(out, "report.md"), report.encode())
    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / "accuracy.png"
        plot_accuracy(rows, str(png))
        storage.write_bytes(storage.join(out, "accuracy.png"), png.read_bytes())
    manifest = storage.commit(out, {"kind": "debate_eval", "files": ["results.parquet", "summary.json", "report.md",
                                                                     "accuracy.png"],
                                    "rows": len(records), "config": config.model_dump(mode="json")})
    return {**summary, "output": out, "manifest": manifest, "report": report}
