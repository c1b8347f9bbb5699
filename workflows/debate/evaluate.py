"""Evaluate CIPHER debate against natural-language debate and a single agent.

Problems come from a *dev pool* (``data.split: dev``: GSM8K train problems, arithmetic from
``dev_seed``), where the regime is chosen, or the *final pool* (``split: test``: GSM8K test
problems, arithmetic from ``arithmetic_seed`` with every dev-pool expression left out). Arithmetic is
Du et al.'s task (``a+b*c+d-e*f``, operands in [0, 30)) or a shorter form of it
(``data.arithmetic_form``), generated with a seed, each expression at most once.

Every mode uses the same model and the same token budget per response (``max_tokens``). CIPHER
debates with ``temperatures`` (Pham et al.: one low, one high; final answer: the lowest-temperature
agent's), natural-language debate with ``natural_temperatures`` (Du et al.: 3 agents; final answer:
majority vote, ties reported), a single agent at ``single_temperature``. Agents run as Ray actors
(one CipherAgent on transformers for CIPHER, one TextAgent on vLLM for the others) and decode a
batch of questions at a time; agents at the same temperature (natural) or all agents (CIPHER, one
temperature per row) share one call per round.

Resumable: every finished batch is written to ``output/parts/<mode>-<batch>.json`` with a plan
(``parts/plan.json``: the configuration and item ids). A rerun of the same command skips the
finished batches; ``max_seconds`` stops before a batch that would likely end past it (judged by the
longest batch so far), so a long evaluation runs as several
short chunks that add up. A different configuration in the same output is refused.

Outputs, once every batch is done (committed under ``output`` with a manifest):
``results.parquet`` (one row per question and mode, with votes and the transcript), ``summary.json``
(table, paired tests, wall-time ratio), ``report.md`` and ``accuracy.png`` (accuracy with 95% Wilson
intervals). Paired tests: McNemar's exact test (two-sided binomial test on the discordant pairs) and a
paired bootstrap interval of the accuracy difference, for every pair of modes on the same items.
Wall time of a mode: the sum of its batches' wall times over the same items.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import time
from typing import Any

from workflows.debate import protocol as P
from workflows.debate.config import DebateEvalConfig, EvalDataConfig

log = logging.getLogger(__name__)

ARITHMETIC_PROMPT = "What is the result of {expression}?"
_EXPR = re.compile(r"\d+(?:[+\-*]\d+)*")


def evaluate_expression(expression: str) -> int:
    """Value of ``a+b*c-d...`` (non-negative integers, + - *, the usual precedence), without eval()."""
    if not _EXPR.fullmatch(expression):
        raise ValueError(f"not an expression of integers joined by + - *: {expression!r}")
    total, sign = 0, 1
    for term in re.split(r"([+\-])", expression):
        if term == "+":
            sign = 1
        elif term == "-":
            sign = -1
        else:
            product = 1
            for factor in term.split("*"):
                product *= int(factor)
            total += sign * product
    return total


def arithmetic_problems(count: int, seed: int, high: int = 30, form: str = "{}+{}*{}+{}-{}*{}",
                        exclude: set[str] | frozenset[str] = frozenset(), prefix: str = "arith") -> list[dict[str, str]]:
    """``count`` distinct expressions of ``form`` with operands in [0, high), seeded; none in ``exclude``.

    ``form`` has one ``{}`` per operand (Du et al.: ``{}+{}*{}+{}-{}*{}``). Raises when the form has
    fewer distinct expressions than asked.
    """
    slots = form.count("{}")
    available = high ** slots - len(exclude)
    if count > available:
        raise ValueError(f"{count} distinct problems asked, but {form!r} with operands in [0, {high}) has only "
                         f"{available} outside the excluded ones; raise arithmetic_max or lower the count")
    rng = random.Random(seed)
    seen: set[str] = set(exclude)
    out = []
    while len(out) < count:
        expression = form.format(*(rng.randrange(high) for _ in range(slots)))
        if expression in seen:
            continue
        seen.add(expression)
        out.append({"qid": f"{prefix}-{seed}-{len(out)}", "dataset": "arithmetic", "expression": expression,
                    "question": ARITHMETIC_PROMPT.format(expression=expression),
                    "gold": str(evaluate_expression(expression))})
    return out


def gsm8k_problems(limit: int, split: str = "test") -> list[dict[str, str]]:
    """The first ``limit`` GSM8K problems of ``split`` (train or test) with their ``####`` final answers."""
    from embedforge import schemas as S
    from embedforge.data.spec import DatasetSpec, load_dataset

    if limit == 0:
        return []
    df = load_dataset(DatasetSpec(source="gsm8k", split=split, limit=limit))
    return [{"qid": f"gsm8k-{split}-{i}", "dataset": "gsm8k", "question": row[S.QUESTION], "gold": row[S.FINAL]}
            for i, row in enumerate(df.iter_rows(named=True))]


def eval_problems(data: EvalDataConfig) -> list[dict[str, str]]:
    """The pool of ``data.split``: the dev pool, or the final pool with the dev pool's expressions left out."""
    form = data.expression_form
    if data.split == "dev":
        return gsm8k_problems(data.gsm8k_limit, "train") + arithmetic_problems(
            data.dev_count, data.dev_seed, data.arithmetic_max, form, prefix="arith-dev")
    dev = arithmetic_problems(data.dev_count, data.dev_seed, data.arithmetic_max, form, prefix="arith-dev")
    return gsm8k_problems(data.gsm8k_limit, "test") + arithmetic_problems(
        data.arithmetic_count, data.arithmetic_seed, data.arithmetic_max, form,
        exclude={p["expression"] for p in dev})


def wilson_interval(correct: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (scipy's ``binomtest``)."""
    from scipy.stats import binomtest

    if n == 0:
        return float("nan"), float("nan")
    ci = binomtest(correct, n).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """McNemar's exact test: two-sided binomial p-value of the discordant pairs (1.0 when there are none)."""
    from scipy.stats import binomtest

    n = only_a + only_b
    return 1.0 if n == 0 else float(binomtest(only_a, n, 0.5).pvalue)


def paired_bootstrap(a: list[bool], b: list[bool], resamples: int = 10000, seed: int = 0,
                     confidence: float = 0.95) -> tuple[float, float]:
    """Percentile interval of mean(a) - mean(b) over items resampled with replacement (pairs kept)."""
    import numpy as np

    if len(a) != len(b) or not a:
        raise ValueError(f"paired samples need equal non-zero lengths, got {len(a)} and {len(b)}")
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diff), size=(resamples, len(diff)))
    means = diff[idx].mean(axis=1)
    tail = (1 - confidence) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def paired_tests(records: list[dict], resamples: int = 10000) -> list[dict]:
    """Every pair of modes on the items both answered, per dataset and over all: McNemar and bootstrap."""
    modes = sorted({r["mode"] for r in records})
    by: dict[tuple[str, str], dict[str, bool]] = {}
    for r in records:
        for dataset in (r["dataset"], "all"):
            by.setdefault((dataset, r["mode"]), {})[r["qid"]] = bool(r["correct"])
    rows = []
    order = ["cipher", "natural", "single"]
    pairs = [(a, b) for i, a in enumerate(order) for b in order[i + 1:] if a in modes and b in modes]
    for dataset in sorted({d for d, _ in by}):
        for a, b in pairs:
            ra, rb = by.get((dataset, a), {}), by.get((dataset, b), {})
            common = sorted(ra.keys() & rb.keys())
            if not common:
                continue
            xa, xb = [ra[q] for q in common], [rb[q] for q in common]
            only_a = sum(x and not y for x, y in zip(xa, xb))
            only_b = sum(y and not x for x, y in zip(xa, xb))
            low, high = paired_bootstrap(xa, xb, resamples)
            rows.append({"dataset": dataset, "a": a, "b": b, "n": len(common), "acc_a": sum(xa) / len(common),
                         "acc_b": sum(xb) / len(common), "diff": (sum(xa) - sum(xb)) / len(common),
                         "both": sum(x and y for x, y in zip(xa, xb)), "only_a": only_a, "only_b": only_b,
                         "neither": sum(not x and not y for x, y in zip(xa, xb)),
                         "mcnemar_p": mcnemar_exact(only_a, only_b), "bootstrap_low": low, "bootstrap_high": high})
    return rows


def debate_batch(agent: Any, mode: str, problems: list[dict], temperatures: list[float], rounds: int,
                 max_tokens: int, model_name: str, receivers: dict[str, str] | None, timeout_s: float,
                 config: DebateEvalConfig) -> list[dict]:
    """Run one batch of debates; one dict per question.

    ``agent`` is a Ray actor handle with ``respond`` (or an object with a plain ``respond``, as in
    tests). Natural/single: agents at the same temperature share one ``respond`` call (one vLLM
    batch). CIPHER: all agents decode in one call with one temperature per conversation.
    """
    remote = hasattr(agent.respond, "remote")

    questions = [p["question"] for p in problems]
    prompts = [config.data.gsm8k_prompts if p["dataset"] == "gsm8k" else config.data.arithmetic_prompts
               for p in problems]
    models = [model_name] * len(temperatures)
    history: list[list[list[Any]]] = []  # [round][agent][question]
    nq = len(questions)
    if mode == "cipher":
        groups = [list(range(len(temperatures)))]
    else:
        groups = [[i for i, t in enumerate(temperatures) if t == temp] for temp in dict.fromkeys(temperatures)]
    for _ in range(rounds):
        convs = P.next_round(questions, mode, models, history, prompts=prompts, memory=config.history)
        replies: list[list[Any]] = [[] for _ in temperatures]
        refs = []
        for group in groups:
            flat = [c for i in group for c in convs[i]]
            temps: Any = [temperatures[i] for i in group for _ in range(nq)] if mode == "cipher" else \
                temperatures[group[0]]
            refs.append(agent.respond.remote(flat, temps, max_tokens, receivers) if remote else
                        agent.respond(flat, temps, max_tokens, receivers))
        if remote:
            import ray

            refs = ray.get(refs, timeout=timeout_s)
        for group, out in zip(groups, refs, strict=True):
            for k, i in enumerate(group):
                replies[i] = out[k * nq:(k + 1) * nq]
        history.append(replies)
    out = []
    for q in range(nq):
        transcript = [[{"text": rnd[i][q].text, "answer": P.extract_answer(rnd[i][q].text),
                        "completion_tokens": rnd[i][q].completion_tokens, "prompt_tokens": rnd[i][q].prompt_tokens}
                       for i in range(len(temperatures))] for rnd in history]
        answers = [m["answer"] for m in transcript[-1]]
        decision = P.decide(mode, temperatures, answers, cipher_final=config.cipher_final, tie_break=config.tie_break)
        out.append({"final_answer": decision.answer, "tie": decision.tie, "votes": decision.counts,
                    "agent_answers": answers, "transcript": transcript,
                    "completion_tokens": sum(m["completion_tokens"] for rnd in transcript for m in rnd),
                    "prompt_tokens": sum(m["prompt_tokens"] for rnd in transcript for m in rnd)})
    return out


def summarize(records: list[dict]) -> list[dict]:
    """Per (dataset, mode) and per mode over all datasets: accuracy, Wilson CI, tokens and seconds per question."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        groups.setdefault((r["dataset"], r["mode"]), []).append(r)
        groups.setdefault(("all", r["mode"]), []).append(r)
    rows = []
    for (dataset, mode), rs in sorted(groups.items()):
        k, n = sum(bool(r["correct"]) for r in rs), len(rs)
        low, high = wilson_interval(k, n)
        rows.append({"dataset": dataset, "mode": mode, "n": n, "correct": k, "accuracy": k / n, "ci_low": low,
                     "ci_high": high, "completion_tokens_per_q": sum(r["completion_tokens"] for r in rs) / n,
                     "prompt_tokens_per_q": sum(r["prompt_tokens"] for r in rs) / n,
                     "seconds_per_q": sum(r["seconds"] for r in rs) / n,
                     "ties": sum(bool(r.get("tie")) for r in rs),
                     "no_answer": sum(r.get("final_answer") is None for r in rs)})
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = ["| dataset | mode | n | accuracy | 95% CI | vote ties | completion tokens / q | prompt tokens / q | "
             "wall s / q |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['mode']} | {r['n']} | {r['accuracy']:.3f} | "
                     f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}] | {r.get('ties', 0)} | "
                     f"{r['completion_tokens_per_q']:.1f} | {r['prompt_tokens_per_q']:.1f} | "
                     f"{r['seconds_per_q']:.2f} |")
    return "\n".join(lines)


def paired_table(rows: list[dict]) -> str:
    lines = ["| dataset | A vs B | n | acc A | acc B | A - B | 95% paired bootstrap | only A | only B | "
             "McNemar exact p |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['a']} vs {r['b']} | {r['n']} | {r['acc_a']:.3f} | {r['acc_b']:.3f} | "
                     f"{r['diff']:+.3f} | [{r['bootstrap_low']:+.3f}, {r['bootstrap_high']:+.3f}] | {r['only_a']} | "
                     f"{r['only_b']} | {r['mcnemar_p']:.3g} |")
    return "\n".join(lines)


def plot_accuracy(rows: list[dict], path: str, title: str | None = None) -> None:
    """Grouped bars (dataset x mode) with Wilson-interval error bars, written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({r["dataset"] for r in rows})
    modes = sorted({r["mode"] for r in rows})
    width = 0.8 / len(modes)
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(datasets) * max(1, len(modes) / 3), 3.8))
    for j, mode in enumerate(modes):
        xs, ys, err, labels = [], [], [[], []], []
        for i, d in enumerate(datasets):
            r = next((r for r in rows if r["dataset"] == d and r["mode"] == mode), None)
            if r:
                xs.append(i + (j - (len(modes) - 1) / 2) * width)
                ys.append(r["accuracy"])
                err[0].append(r["accuracy"] - r["ci_low"])
                err[1].append(r["ci_high"] - r["accuracy"])
                labels.append(f"{r['accuracy']:.2f}\nn={r['n']}")
        bars = ax.bar(xs, ys, width, yerr=err, capsize=3, label=mode)
        ax.bar_label(bars, labels, fontsize=7, padding=2)
    ax.set_xticks(range(len(datasets)), datasets)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy (95% Wilson CI)")
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- resumable parts

def _plan(config: DebateEvalConfig, problems: list[dict]) -> dict[str, Any]:
    """What fixes the items' results: the configuration minus where and how long it runs, and the items."""
    cfg = config.model_dump(mode="json", exclude={"output", "max_seconds", "timeout_s", "ray"})
    body = {"config": cfg, "qids": [p["qid"] for p in problems]}
    body["fingerprint"] = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
    return body


def _check_plan(parts: str, plan: dict[str, Any]) -> None:
    from embedforge import storage
    from embedforge.errors import ConfigError

    uri = storage.join(parts, "plan.json")
    if not storage.exists(uri):
        storage.write_json(uri, plan)
        return
    old = storage.read_json(uri)
    if old.get("fingerprint") == plan["fingerprint"]:
        return
    flat = lambda d, p="": {f"{p}{k}": v for k0, v0 in d.items()  # noqa: E731
                            for k, v in (flat(v0, f"{k0}.").items() if isinstance(v0, dict) else [(k0, v0)])}
    a, b = flat(old.get("config", {})), flat(plan["config"])
    changed = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    if old.get("qids") != plan["qids"]:
        changed.append("items")
    raise ConfigError(f"output {parts} holds finished batches of another configuration (differs in: "
                      f"{', '.join(changed) or 'unknown'}); set output to a new location, or delete it to start over")


def run_debate_eval(config: DebateEvalConfig) -> dict[str, Any]:
    """Evaluate every configured mode (resuming finished batches); when all are done, commit results,
    report and plot under ``config.output``."""
    import ray

    from actors.cipher_agent import CipherAgent
    from actors.text_agent import TextAgent, TextAgentConfig
    from embedforge import storage
    from embedforge.runtime import check_resources, init_ray

    started = time.perf_counter()
    problems = eval_problems(config.data)
    out = config.output
    parts = storage.join(out, "parts")
    plan = _plan(config, problems)
    _check_plan(parts, plan)
    batches = [problems[s:s + config.batch_size] for s in range(0, len(problems), config.batch_size)]
    part_uri = lambda mode, b: storage.join(parts, f"{mode}-{b:04d}.json")  # noqa: E731
    stopped_early = False
    for mode in config.modes:
        todo = [b for b in range(len(batches)) if not storage.exists(part_uri(mode, b))]
        if not todo:
            continue
        # a new mode starts an agent (a model load) and runs a batch of unknown length: leave it a quarter
        if config.max_seconds is not None and time.perf_counter() - started > 0.75 * config.max_seconds:
            stopped_early = True
            break
        init_ray(config.ray)
        temps, rounds = config.mode_plan(mode)
        if mode == "cipher":
            cfg = config.cipher.model_copy(update={"model": config.model})
            check_resources(cfg.num_cpus, cfg.num_gpus, "debate_eval cipher agent",
                            config.ray.fail_fast_on_missing_gpus)
            agent = ray.remote(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus)(CipherAgent).remote(cfg)
            receivers = {config.model: config.model}
        else:
            eng = config.engine.model_copy(update={"model": config.model})
            check_resources(eng.num_cpus, eng.num_gpus, "debate_eval text agent", config.ray.fail_fast_on_missing_gpus)
            agent = ray.remote(**eng.ray_options())(TextAgent).remote(TextAgentConfig(engine=eng))
            receivers = None
        ray.get(agent.__ray_ready__.remote(), timeout=config.timeout_s)
        log.info("mode %s: %d of %d batches to run, %d agents x %d rounds, %d tokens", mode, len(todo), len(batches),
                 len(temps), rounds, config.max_tokens)
        longest = 0.0
        for b in todo:
            # stop before a batch that would likely end past max_seconds (the longest batch so far)
            if config.max_seconds is not None and time.perf_counter() - started + longest > config.max_seconds:
                stopped_early = True
                break
            batch = batches[b]
            t0 = time.perf_counter()
            outs = debate_batch(agent, mode, batch, temps, rounds, config.max_tokens, config.model, receivers,
                                config.timeout_s, config)
            wall = time.perf_counter() - t0
            longest = max(longest, wall)
            recs = [{**p, "mode": mode, "batch": b, "final_answer": o["final_answer"],
                     "correct": P.answers_equal(o["final_answer"], p["gold"]), "tie": o["tie"],
                     "votes": json.dumps(o["votes"]), "agent_answers": json.dumps(o["agent_answers"]),
                     "completion_tokens": o["completion_tokens"], "prompt_tokens": o["prompt_tokens"],
                     "seconds": wall / len(batch), "transcript": json.dumps(o["transcript"])}
                    for p, o in zip(batch, outs, strict=True)]
            storage.write_json(part_uri(mode, b), {"mode": mode, "batch": b, "wall_s": wall, "finished_at": time.time(),
                                                   "records": recs})
            log.info("mode %s: batch %d/%d done in %.1fs (%.2fs per question)", mode, b + 1, len(batches), wall,
                     wall / len(batch))
        ray.kill(agent)
        if stopped_early:
            break
    return finish(config, problems, plan, batches, part_uri)


def finish(config: DebateEvalConfig, problems: list[dict], plan: dict, batches: list, part_uri) -> dict[str, Any]:
    """Gather the finished parts; write the report (and commit everything once every batch is done)."""
    import tempfile
    from pathlib import Path

    import pyarrow as pa

    from embedforge import storage

    records: list[dict] = []
    walls: dict[str, dict[int, float]] = {}
    for mode in config.modes:
        for b in range(len(batches)):
            if storage.exists(part_uri(mode, b)):
                part = storage.read_json(part_uri(mode, b))
                records += part["records"]
                walls.setdefault(mode, {})[b] = float(part["wall_s"])
    total = len(config.modes) * len(batches)
    done = sum(len(v) for v in walls.values())
    complete = done == total
    rows = summarize(records) if records else []
    tests = paired_tests(records, config.bootstrap) if records else []
    ratio = None
    common = sorted(walls.get("cipher", {}).keys() & walls.get("natural", {}).keys())
    if common:
        c = sum(walls["cipher"][b] for b in common)
        n = sum(walls["natural"][b] for b in common)
        ratio = {"batches": len(common), "questions": sum(len(batches[b]) for b in common), "cipher_s": c,
                 "natural_s": n, "ratio": c / n if n else None}
    cipher_t, _ = config.mode_plan("cipher")
    natural_t, rounds = config.mode_plan("natural")
    single_t, _ = config.mode_plan("single")
    setup = (f"Model {config.model}; {config.max_tokens} tokens per response in every mode; {rounds} rounds; history "
             f"{config.history}. CIPHER: {len(cipher_t)} agents at T={cipher_t} (transformers), final answer "
             f"{config.cipher_final}. Natural-language debate: {len(natural_t)} agents at T={natural_t} (vLLM), "
             f"majority vote (ties: {config.tie_break}). Single agent: T={single_t[0]} (vLLM). Pool: split "
             f"{config.data.split}, arithmetic form {config.data.expression_form!r}, operands in "
             f"[0, {config.data.arithmetic_max}), {len(problems)} items.")
    summary = {"model": config.model, "complete": complete, "batches_done": done, "batches_total": total,
               "plan": plan["fingerprint"], "setup": setup, "table": rows, "paired_tests": tests,
               "wall_time": ratio, "cipher_over_natural_wall_time": ratio["ratio"] if ratio else None}
    ratio_line = ("n/a" if not ratio or ratio["ratio"] is None else
                  f"{ratio['ratio']:.2f}x ({ratio['cipher_s']:.0f} s vs {ratio['natural_s']:.0f} s on the same "
                  f"{ratio['questions']} questions; wall time on a shared machine, batches run at different times)")
    report = (f"# Debate evaluation: {config.model}\n\n{'' if complete else f'**Incomplete: {done}/{total} batches.**'}"
              f"\n\n{setup}\n\n{markdown_table(rows)}\n\n## Paired tests\n\n{paired_table(tests)}\n\n"
              f"CIPHER wall time / natural-language debate: {ratio_line}\n")
    out = config.output
    storage.write_json(storage.join(out, "summary.json"), summary)
    storage.write_bytes(storage.join(out, "report.md"), report.encode())
    if records:
        storage.write_parquet(storage.join(out, "results.parquet"), pa.Table.from_pylist(records))
        with tempfile.TemporaryDirectory() as tmp:
            png = Path(tmp) / "accuracy.png"
            plot_accuracy(rows, str(png), title=f"{config.model}, {config.data.split} pool, "
                                               f"{config.data.expression_form}, {config.max_tokens} tokens/response")
            storage.write_bytes(storage.join(out, "accuracy.png"), png.read_bytes())
    manifest = None
    if complete:
        manifest = storage.commit(out, {"kind": "debate_eval", "files": ["results.parquet", "summary.json",
                                                                         "report.md", "accuracy.png"],
                                        "rows": len(records), "config": config.model_dump(mode="json")})
    return {**summary, "output": out, "manifest": manifest, "report": report}
