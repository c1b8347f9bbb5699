"""The main job: config wiring (pure), the kind filter, and one real end-to-end run (slow)."""

import json
import subprocess
import sys

import pyarrow as pa
import pytest

from embedforge import storage
from embedforge.config import build_config, load_config
from embedforge.errors import ConfigError, InputError
from tests.conftest import REPO
from workflows.pipeline.config import PipelineConfig, references, substitute
from workflows.pipeline.run import stage_key


def test_quickstart_config_validates():
    cfg = load_config(PipelineConfig, REPO / "configs" / "quickstart.yaml")
    assert list(cfg.sections()) == ["synthesize", "train", "gate", "evaluate", "deploy"]
    assert ("synthesize", "output") in references(cfg.train)
    assert cfg.gate["split"] == "dev" and cfg.evaluate["split"] == "test"


def test_substitute_whole_and_embedded_references():
    data = {"a": "${train.model}", "b": ["x-${synthesize.output}-y"], "c": 3}
    out = substitute(data, lambda s, k: f"<{s}:{k}>")
    assert out == {"a": "<train:model>", "b": ["x-<synthesize:output>-y"], "c": 3}


def test_reference_to_a_later_stage_is_rejected():
    with pytest.raises(ConfigError, match=r"train: reference \$\{evaluate...\} must name an earlier configured stage"):
        build_config(PipelineConfig, {
            "train": {"datasets": [{"dataset": "${evaluate.output}", "objective": {"kind": "cosent"}}],
                      "train": {"max_steps": 1}},
            "evaluate": {"model": "all-minilm-l6-v2"},
        })


def test_stage_field_errors_name_the_stage():
    with pytest.raises(ConfigError, match=r"train\.train\.max_steps = 0"):
        build_config(PipelineConfig, {"train": {
            "datasets": [{"dataset": {"source": "stsb"}, "objective": {"kind": "cosent"}}],
            "train": {"max_steps": 0}}})
    with pytest.raises(ConfigError, match=r"evaluate\.output: set by the pipeline"):
        build_config(PipelineConfig, {"evaluate": {"model": "x", "output": "/tmp/x"}})
    with pytest.raises(ConfigError, match="no stage configured"):
        build_config(PipelineConfig, {})


def test_stage_key_ignores_output_and_ray_but_not_inputs():
    a = stage_key("train", {"x": 1, "output": "/a", "ray": {"num_cpus": 4}})
    assert a == stage_key("train", {"x": 1, "output": "/b", "ray": {}})
    assert a != stage_key("train", {"x": 2, "output": "/a"})
    assert a != stage_key("evaluate", {"x": 1})
    # a stage's own content hash (scale fields left out) replaces the config
    assert stage_key("synthesize", {"x": 1}, "h1") == stage_key("synthesize", {"x": 2}, "h1")


def test_bad_pipeline_config_exits_2_before_ray():
    proc = subprocess.run([sys.executable, "-m", "jobs.pipeline", "--config", "configs/quickstart.yaml",
                           "--set", "train.train.lr=-1"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "train.train.lr = -1" in proc.stderr


def test_mixture_kind_filter(tmp_path):
    from workflows.train.config import MixtureItem
    from workflows.train.mixture import load_item

    prefix = str(tmp_path / "synth")
    table = pa.table({"kind": ["scored_pairs", "nli_triplets", "scored_pairs"],
                      "sentence1": ["a", None, "c"], "sentence2": ["b", None, "d"], "score": [0.1, None, 0.9],
                      "anchor": [None, "x", None], "positive": [None, "y", None], "negative": [None, "z", None]})
    w = storage.ShardedWriter(prefix)
    w.write("s0", {"data": table})
    w.finish({})
    item = MixtureItem(dataset=prefix, kind="scored_pairs", objective={"kind": "cosent"})
    rows, info = load_item(item)
    assert rows.column("sentence1").to_pylist() == ["a", "c"] and info["kind"] == "scored_pairs"
    storage.write_parquet(str(tmp_path / "plain" / "d.parquet"), table.drop(["kind"]))
    storage.commit(str(tmp_path / "plain"), {"files": ["d.parquet"]})
    with pytest.raises(InputError, match="has none"):
        load_item(MixtureItem(dataset=str(tmp_path / "plain"), kind="scored_pairs", objective={"kind": "cosent"}))


@pytest.mark.slow
@pytest.mark.timeout(3000)
def test_quickstart_end_to_end_and_rerun_skips(tmp_path):
    """The README's main job on a smaller slice, twice: the second run skips every stage."""
    out = tmp_path / "run"
    sets = ["--set", f"output={out}", "--set", "synthesize.inputs.0.limit=40", "--set", "synthesize.inputs.1.limit=20",
            "--set", "train.train.max_steps=6", "--set", "train.train.batch_size=4", "--set", "train.datasets.2.dataset.limit=200",
            "--set", "deploy.http.port=18123", "--set", "evaluate.tasks.0.datasets.0.limit=200",
            "--set", "evaluate.tasks.0.datasets.1.limit=200", "--set", "evaluate.tasks.0.datasets.2.limit=200"]
    cmd = [sys.executable, "-m", "jobs.pipeline", "--config", "configs/quickstart.yaml", *sets]
    first = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=2400)
    assert first.returncode in (0, 3), first.stderr[-3000:]
    lineage = json.loads((out / "lineage" / "quickstart.json").read_text())
    assert all(lineage["stages"][s]["status"] == "ran" for s in ("synthesize", "train", "gate", "evaluate"))
    second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert second.returncode == first.returncode, second.stderr[-3000:]
    lineage = json.loads((out / "lineage" / "quickstart.json").read_text())
    assert all(lineage["stages"][s]["status"] == "skipped (complete)"
               for s in ("synthesize", "train", "gate", "evaluate"))
    assert "report" in second.stdout
