"""The evaluation report: JSON (machine readable), Markdown, and PNG plots.

``report.json`` holds, per model, ``metrics`` (main metric per dataset, x 100), ``details`` (every
metric the evaluator returned), ``tasks`` (task means), ``mean`` (mean of task means) and
``grid`` (one entry per (layers, dims) cell with its metrics and encode throughput); the
candidate's numbers sit at the top level, the baseline's under ``baseline``, with ``deltas`` and
the ``gate`` decision. Plots: ``per_dataset.png`` (bars per dataset/language, candidate beside
baseline), ``grid_<task>.png`` (layers x dims heatmap of the task mean, throughput in each cell),
``deltas.png`` (candidate minus baseline per dataset).
"""

from __future__ import annotations

import io
import logging
from typing import Any

from embedforge import storage

log = logging.getLogger(__name__)


def _fmt(v: Any) -> str:
    return "—" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))


def deltas(candidate: dict[str, Any], baseline: dict[str, Any]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {"metrics": {}, "tasks": {}}
    for section in ("metrics", "tasks"):
        for k in sorted(set(candidate[section]) & set(baseline[section])):
            out[section][k] = round(candidate[section][k] - baseline[section][k], 4)
    if candidate.get("mean") is not None and baseline.get("mean") is not None:
        out["mean"] = round(candidate["mean"] - baseline["mean"], 4)
    return out


def _cell_label(v: int | None) -> str:
    return "full" if v is None else str(v)


def to_markdown(report: dict[str, Any]) -> str:
    base = report.get("baseline")
    lines = [f"# Evaluation: {report['model']}", "",
             f"split **{report['split']}** · model fingerprint `{report['fingerprint']}` · "
             f"prompts {report['prompts']}", ""]
    header = "| dataset | metric | candidate |" + (" baseline | delta |" if base else "")
    lines += [header, "|---|---|---|" + ("---|---|" if base else "")]
    for key, value in report["metrics"].items():
        row = f"| {key} | {report['main_metric_names'][key]} | {_fmt(value)} |"
        if base:
            b = base["metrics"].get(key)
            row += f" {_fmt(b)} | {_fmt(None if b is None else value - b)} |"
        lines.append(row)
    lines += ["", "| task | candidate |" + (" baseline | delta |" if base else ""),
              "|---|---|" + ("---|---|" if base else "")]
    for task, value in {**report["tasks"], "mean": report["mean"]}.items():
        row = f"| {task} | {_fmt(value)} |"
        if base:
            b = base["mean"] if task == "mean" else base["tasks"].get(task)
            row += f" {_fmt(b)} | {_fmt(None if b is None else value - b)} |"
        lines.append(row)
    if report.get("grid"):
        tasks = list(report["tasks"])
        lines += ["", "## 2DMSE grid", "", "| layers | dims | sentences/s | " + " | ".join(tasks) + " | mean |",
                  "|---|---|---|" + "---|" * (len(tasks) + 1)]
        for cell in report["grid"]:
            lines.append(f"| {_cell_label(cell['layers'])} | {_cell_label(cell['dims'])} | "
                         f"{_fmt(cell.get('throughput'))} | "
                         + " | ".join(_fmt(cell["tasks"].get(t)) for t in tasks) + f" | {_fmt(cell['mean'])} |")
    if report.get("gate"):
        gate = report["gate"]
        lines += ["", f"## Gate: **{gate['decision'].upper()}**", ""] + [f"- {r}" for r in gate["reasons"]]
    lines += ["", "Plots: " + ", ".join(f"`{p}`" for p in report.get("plots", []))]
    return "\n".join(lines) + "\n"


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def plot_per_dataset(report: dict[str, Any]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    keys = list(report["metrics"])
    base = report.get("baseline")
    x = np.arange(len(keys))
    width = 0.4 if base else 0.7
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(keys) + 2), 4))
    ax.bar(x - (width / 2 if base else 0), [report["metrics"][k] for k in keys], width, label=report["model"])
    if base:
        ax.bar(x + width / 2, [base["metrics"].get(k, np.nan) for k in keys], width, label=base["model"])
    ax.set_xticks(x, keys, rotation=45, ha="right")
    ax.set_ylabel("main metric (x100)")
    ax.set_title(f"per dataset / language ({report['split']})")
    ax.legend()
    return _png(fig)


def plot_grid(report: dict[str, Any], task: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers = sorted({c["layers"] for c in report["grid"]}, key=lambda v: (v is None, v or 0))
    dims = sorted({c["dims"] for c in report["grid"]}, key=lambda v: (v is None, v or 0))
    values = np.full((len(layers), len(dims)), np.nan)
    speed = np.full_like(values, np.nan)
    for c in report["grid"]:
        i, j = layers.index(c["layers"]), dims.index(c["dims"])
        values[i, j] = c["tasks"].get(task, np.nan) if task != "mean" else c["mean"]
        speed[i, j] = c.get("throughput") or np.nan
    fig, ax = plt.subplots(figsize=(1.4 * len(dims) + 3, 1.0 * len(layers) + 2))
    im = ax.imshow(values, cmap="viridis", aspect="auto")
    for i in range(len(layers)):
        for j in range(len(dims)):
            text = f"{values[i, j]:.1f}" + ("" if np.isnan(speed[i, j]) else f"\n{speed[i, j]:.0f}/s")
            ax.text(j, i, text, ha="center", va="center", color="w", fontsize=8)
    ax.set_xticks(range(len(dims)), [_cell_label(d) for d in dims])
    ax.set_yticks(range(len(layers)), [_cell_label(v) for v in layers])
    ax.set_xlabel("dims")
    ax.set_ylabel("layers")
    ax.set_title(f"2DMSE grid: {task} (value, sentences/s)")
    fig.colorbar(im, ax=ax)
    return _png(fig)


def plot_deltas(report: dict[str, Any]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = report["deltas"]["metrics"]
    keys = list(d)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(keys) + 2), 4))
    ax.bar(keys, [d[k] for k in keys], color=["tab:green" if d[k] >= 0 else "tab:red" for k in keys])
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(keys)), keys, rotation=45, ha="right")
    ax.set_ylabel("candidate - baseline (points)")
    ax.set_title(f"{report['model']} vs {report['baseline']['model']}")
    return _png(fig)


def render_plots(report: dict[str, Any]) -> dict[str, bytes]:
    """``{relative file name: PNG bytes}`` for every plot the report supports."""
    plots = {"plots/per_dataset.png": plot_per_dataset(report)}
    if report.get("grid"):
        for task in [*report["tasks"], "mean"]:
            plots[f"plots/grid_{task}.png"] = plot_grid(report, task)
    if report.get("baseline"):
        plots["plots/deltas.png"] = plot_deltas(report)
    return plots


def write_report(output: str, report: dict[str, Any]) -> dict[str, Any]:
    """Write plots, report.md and report.json under ``output``, then commit the manifest."""
    plots = render_plots(report)
    report = {**report, "plots": sorted(plots)}
    for rel, data in plots.items():
        storage.write_bytes(storage.join(output, rel), data)
    storage.write_bytes(storage.join(output, "report.md"), to_markdown(report).encode())
    storage.write_json(storage.join(output, "report.json"), report)
    files = ["report.json", "report.md", *sorted(plots)]
    gate = report.get("gate") or {}
    return storage.commit(output, {"kind": "evaluation", "files": files, "model": report["model"],
                                   "split": report["split"], "decision": gate.get("decision"),
                                   "config_hash": report.get("config_hash")})
