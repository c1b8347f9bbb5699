"""Export a checkpoint as the run's model: a plain sentence-transformers folder with a model card.

The folder loads with ``SentenceTransformer(path)`` alone; beside the weights it carries

* ``README.md``: the model card (base model, one line per training dataset: name, rows,
  objective and source URI; the resolved config, dev metrics, the elastic grid);
* ``embedforge_training.json``: the same facts, machine-readable;
* ``elastic_grid.json`` (:mod:`embedforge.elastic`) when a 2D Matryoshka objective trained it;

and is committed under ``<output>/model`` with a manifest (:func:`embedforge.storage.upload_dir`),
locally or on S3.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import yaml

from embedforge import storage

log = logging.getLogger(__name__)

TRAINING_FILE = "embedforge_training.json"


def data_source(manifest: dict[str, Any]) -> str:
    """Where a mixture item's rows came from, in words: a named dataset split, a file, or a committed output."""
    if "source" in manifest:  # a DatasetSpec
        spec = manifest["source"]
        parts = [f"split {spec.get('split')}"] + [f"{k} {spec[k]}" for k in ("lang", "lang2", "kind", "limit")
                                                  if spec.get(k) is not None]
        return f"`{spec['source']}` ({', '.join(parts)})"
    facts = [f"output `{manifest.get('output', 'data')}`"]
    if manifest.get("kind"):
        facts.append(f"kind {manifest['kind']}")
    committed = manifest.get("manifest") or {}
    if committed.get("kind"):
        facts.append(f"a {committed['kind']} output")
    if committed.get("config_hash"):
        facts.append(f"config hash {committed['config_hash']}")
    return f"`{manifest.get('uri', '?')}` ({', '.join(facts)})"


def data_line(dataset: dict[str, Any]) -> str:
    """One readable model-card line: name, rows, objective, weight and source URI of a mixture item."""
    return (f"- **{dataset['label']}**: {dataset['rows']} rows, objective `{dataset['objective']['kind']}`, "
            f"weight {dataset['weight']}, from {data_source(dataset.get('manifest') or {})}")


def model_card(info: dict[str, Any]) -> str:
    """Markdown model card with a Hugging Face style YAML header."""
    header = {"library_name": "sentence-transformers", "pipeline_tag": "sentence-similarity",
              "base_model": info["base_model"], "tags": ["sentence-transformers", "embedforge"]}
    lines = ["---", yaml.safe_dump(header, sort_keys=False).rstrip(), "---", "",
             f"# {info['run_name']}", "",
             f"Fine-tuned from `{info['base_model']}` on Ray Train ({info['num_workers']} workers, "
             f"{info['steps']} steps, checkpoint `{info['checkpoint']}` chosen as `{info['export']}`).", "",
             "```python", "from sentence_transformers import SentenceTransformer",
             "model = SentenceTransformer(\"<this folder>\")", "emb = model.encode([\"a sentence\"])", "```", "",
             "## Training data", ""]
    lines += [data_line(d) for d in info["datasets"]]
    lines += ["", f"Each dataset's full manifest is in `{TRAINING_FILE}`."]
    lines += ["", "## Dev metrics", ""]
    if info["dev_metrics"]:
        base = info.get("base_dev_metrics") or {}
        lines += [f"- {k}: {v:.4f}" + (f" (before training: {base[k]:.4f})" if isinstance(base.get(k), float) else "")
                  if isinstance(v, float) else f"- {k}: {v}" for k, v in info["dev_metrics"].items()]
    else:
        lines.append("- none (no dev set configured)")
    lines += ["", "## Elastic grid", ""]
    grid = info.get("elastic_grid")
    lines.append(f"- layers {grid['layers']}, dims {grid['dims']} (2D Matryoshka; see elastic_grid.json)"
                 if grid else "- none: the model was trained at full depth and width only")
    lines += ["", "## Config", "", "```yaml", yaml.safe_dump(info["config"], sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def export_model(checkpoint, dest_uri: str, info: dict[str, Any], objectives: list[Any]) -> str:
    """Copy the checkpoint's model folder to ``dest_uri`` with the card; return ``dest_uri``.

    The folder is loaded once with ``SentenceTransformer`` before it is published, which
    checks it loads and gives the model's depth and width for the elastic grid.
    """
    from embedforge.st_modules import load_sentence_transformer
    from workflows.train.losses import record_grid
    from workflows.train.loop import MODEL_DIR

    with tempfile.TemporaryDirectory(prefix="ef-export-") as tmp:
        ckpt_dir = Path(checkpoint.to_directory(str(Path(tmp) / "ckpt")))
        folder = ckpt_dir / MODEL_DIR
        model = load_sentence_transformer(folder, device="cpu")
        info["elastic_grid"] = record_grid(folder, objectives, model)
        info["embedding_dim"] = model.get_embedding_dimension()
        del model
        (folder / "README.md").write_text(model_card(info))
        (folder / TRAINING_FILE).write_text(json.dumps(info, indent=2, default=str))
        if not storage.is_s3(dest_uri):
            local = Path(storage.resolve(dest_uri)[1])
            if local.exists():
                storage.uncommit(dest_uri)
        storage.upload_dir(folder, dest_uri)
    log.info("exported model to %s", dest_uri)
    return dest_uri


def plot_curve(history: list[dict[str, Any]], path: Path) -> Path:
    """Training loss (and dev Spearman where measured) against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    loss = [(h["step"], h["train_loss"]) for h in history if "train_loss" in h]
    if loss:
        ax.plot(*zip(*loss), label="train loss", color="tab:blue")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    dev = [(h["step"], h["dev_spearman"]) for h in history if "dev_spearman" in h]
    if dev:
        ax2 = ax.twinx()
        ax2.plot(*zip(*dev), "o-", label="dev Spearman", color="tab:orange")
        ax2.set_ylabel("dev Spearman")
        ax2.legend(loc="upper right")
    ax.legend(loc="upper left")
    ax.set_title("training curve")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
