"""The nightly run: stage keys follow the data snapshot, the plan says what a run would execute
and reuse, a gate rejection is a successful run recorded in the lineage, and the run lease keeps
two runs off one output root.

Unit tests work on copies of the offline datasets; the end-to-end test runs a real (small)
gate + evaluate pipeline on the session's local Ray, changes one dataset file and checks that
exactly the stage reading it runs again.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from embedforge import storage
from embedforge.config import build_config, load_config
from embedforge.data._files import data_root
from embedforge.data.spec import SOURCES
from embedforge.errors import InputError
from workflows.pipeline.config import PipelineConfig
from workflows.pipeline.lease import LeaseHeldError, RunLease
from workflows.pipeline.plan import REUSE, RUN, format_plan, plan_pipeline
from workflows.pipeline.snapshot import SOURCE_FOLDERS, input_snapshot, uri_fingerprint

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def source_data() -> Path:
    """The offline datasets folder of this checkout (before any test points EMBEDFORGE_DATA elsewhere)."""
    return data_root()


@pytest.fixture
def data_copy(source_data, tmp_path, monkeypatch) -> Path:
    """A copy of the STS-B folder as the whole data root ($EMBEDFORGE_DATA)."""
    root = tmp_path / "data"
    shutil.copytree(source_data / "stsbenchmark", root / "stsbenchmark")
    monkeypatch.setenv("EMBEDFORGE_DATA", str(root))
    return root


def _touch_row(path: Path) -> None:
    """A new snapshot of a file: one more copy of its last line."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    path.write_text("".join(lines + lines[-1:]), encoding="utf-8")


# ---------------------------------------------------------------- the snapshot

def test_every_offline_source_has_its_folder(source_data):
    assert set(SOURCE_FOLDERS) == set(SOURCES)
    for source, folder in SOURCE_FOLDERS.items():
        assert (source_data / folder).is_dir(), f"{source}: {folder} missing under the data root"


def test_snapshot_follows_the_files_of_the_split_that_is_read(data_copy):
    dev = {"tasks": [{"datasets": [{"source": "stsb"}]}], "split": "dev"}
    test = {"tasks": [{"datasets": [{"source": "stsb"}]}], "split": "test"}
    before_dev, before_test = input_snapshot(dev), input_snapshot(test)
    assert list(before_dev) == ["stsb[dev]"] and list(before_test) == ["stsb[test]"]
    _touch_row(data_copy / "stsbenchmark" / "sts-dev.csv")
    assert input_snapshot(dev) != before_dev, "a new dev file must change the dev snapshot"
    assert input_snapshot(test) == before_test, "the test snapshot must not depend on the dev file"


def test_snapshot_of_uris_and_of_earlier_stage_outputs(tmp_path):
    drop = tmp_path / "incoming" / "pairs.jsonl"
    drop.parent.mkdir()
    drop.write_text('{"sentence1": "a", "sentence2": "b", "score": 0.5}\n')
    prefix = str(tmp_path / "committed")
    storage.write_bytes(storage.join(prefix, "part-0.parquet"), b"x")
    storage.commit(prefix, {"files": ["part-0.parquet"]})
    root = str(tmp_path / "run")
    upstream = storage.join(root, "synthesize", "abc123")
    cfg = {"inputs": [{"source": str(drop)}], "datasets": [{"dataset": prefix}, {"dataset": upstream}]}
    snap = input_snapshot(cfg, root)
    assert set(snap) == {str(drop), prefix}, "an earlier stage's output is keyed by its URI, not hashed"
    first = uri_fingerprint(str(drop))
    drop.write_text(drop.read_text() + '{"sentence1": "c", "sentence2": "d", "score": 0.1}\n')
    assert uri_fingerprint(str(drop)) != first
    storage.commit(prefix, {"files": ["part-0.parquet", "part-1.parquet"]})
    assert input_snapshot(cfg, root)[prefix] != snap[prefix], "a recommitted prefix is a new snapshot"
    with pytest.raises(InputError, match="neither a file nor a committed prefix"):
        uri_fingerprint(str(tmp_path / "missing.parquet"))


def test_new_data_changes_the_keys_of_the_stages_that_read_it_and_downstream(source_data, data_copy, tmp_path):
    for folder in ("stsb_multi_mt", "snli_esnli"):
        shutil.copytree(source_data / folder, data_copy / folder)
    cfg = load_config(PipelineConfig, REPO / "configs" / "quickstart.yaml", [f"output={tmp_path}/q"])
    before = {p.section: p.key for p in cfg.plan()}
    _touch_row(data_copy / "stsbenchmark" / "sts-test.csv")       # read by evaluate only
    after = {p.section: p.key for p in cfg.plan()}
    assert [s for s in before if before[s] != after[s]] == ["evaluate"]
    _touch_row(data_copy / "stsbenchmark" / "sts-train.csv")      # synthesize input: everything after
    again = {p.section: p.key for p in cfg.plan()}
    assert all(again[s] != after[s] for s in ("synthesize", "train", "gate", "evaluate"))


def test_the_nightly_config_plans_from_its_snapshot(source_data, data_copy, tmp_path):
    """configs/nightly.yaml itself (its S3 drop file replaced by a local one): every stage would run."""
    drop = tmp_path / "pairs-en.jsonl"
    drop.write_text('{"sentence1": "A man plays.", "sentence2": "A man is playing.", "score": 0.9}\n')
    nightly = load_config(PipelineConfig, REPO / "configs" / "nightly.yaml")
    inputs = [dict(i) for i in nightly.synthesize["inputs"]]
    assert any(i["source"].startswith("s3://") for i in inputs), "the nightly reads a drop file"
    inputs = [i if not i["source"].startswith("s3://") else {**i, "source": str(drop)} for i in inputs]
    for folder in ("sick", "stsb_multi_mt"):
        shutil.copytree(source_data / folder, data_copy / folder)
    cfg = build_config(PipelineConfig, {**nightly.model_dump(mode="json"), "output": str(tmp_path / "nightly"),
                                        "synthesize": {**nightly.synthesize, "inputs": inputs}})
    plans = plan_pipeline(cfg)
    assert [(p.stage, p.action) for p in plans] == [(s, RUN) for s in ("synthesize", "train", "gate", "evaluate")]
    assert str(drop) in plans[0].inputs
    text = format_plan(cfg, plans)
    assert "synthesize" in text and f"input {drop}" in text


# ---------------------------------------------------------------- the lease

def test_lease_refuses_a_second_run_until_released_or_expired(tmp_path):
    root = str(tmp_path / "run")
    first = RunLease(root, ttl_s=3600, name="nightly").acquire()
    with pytest.raises(LeaseHeldError, match="holds the lease until"):
        RunLease(root, ttl_s=3600, name="manual").acquire()
    first.release()
    second = RunLease(root, ttl_s=3600, name="manual").acquire()
    first.release()  # not its lease any more: must not remove the second run's
    assert storage.read_json(storage.join(root, "lease.json"))["run_id"] == second.body["run_id"]
    held = storage.read_json(storage.join(root, "lease.json"))
    storage.write_json(storage.join(root, "lease.json"), {**held, "expires_at": time.time() - 1})
    third = RunLease(root, ttl_s=3600, name="nightly").acquire()  # a crashed run's lease expired
    assert storage.read_json(storage.join(root, "lease.json"))["run_id"] == third.body["run_id"]


# ---------------------------------------------------------------- a real nightly-like run

def _gate_and_evaluate(output: str) -> dict:
    """A small real pipeline: the gate (dev) and the report (test) of the packaged MiniLM against itself.
    The gate asks for a rise the same model cannot make, so it rejects."""
    sts = {"kind": "sts", "datasets": [{"source": "stsb", "langs": ["en"], "limit": 40}]}
    return {
        "name": "nightly-test", "output": output, "reject_exit_code": 0, "lease_ttl_s": 600,
        "gate": {"model": "all-minilm-l6-v2", "baseline": {"model": "all-minilm-l6-v2"}, "split": "dev",
                 "tasks": [sts], "gate": {"max_drop": 2.0, "main_metric": "mean", "min_rise": 1.0},
                 "embed": {"mode": "local"}},
        "evaluate": {"model": "all-minilm-l6-v2", "baseline": {"model": "all-minilm-l6-v2"}, "split": "test",
                     "tasks": [sts], "embed": {"mode": "local"}},
    }


@pytest.mark.timeout(600)
def test_nightly_reuses_what_is_unchanged_and_a_rejection_is_a_success(ray_local, data_copy, tmp_path, capsys):
    from jobs.pipeline import pipeline

    output = str(tmp_path / "nightly")
    cfg = build_config(PipelineConfig, _gate_and_evaluate(output))
    assert [(p.stage, p.action) for p in plan_pipeline(cfg)] == [("gate", RUN), ("evaluate", RUN)]

    assert pipeline(cfg) == 0, "a gate rejection must exit 0 with reject_exit_code: 0"
    lineage = json.loads(Path(output, "lineage", "nightly-test.json").read_text())
    assert lineage["gate"]["decision"] == "reject" and lineage["gate"]["reasons"]
    assert [lineage["stages"][s]["status"] for s in ("gate", "evaluate")] == ["ran", "ran"]
    assert "stsb[dev]" in lineage["stages"]["gate"]["inputs"] and "stsb[test]" in lineage["stages"]["evaluate"]["inputs"]
    history = sorted(Path(output, "lineage", "nightly-test").glob("*.json"))
    assert len(history) == 1, "each run keeps its own lineage record"
    assert not Path(output, "lease.json").exists(), "the lease is released after the run"
    assert [p.action for p in plan_pipeline(cfg)] == [REUSE, REUSE]

    # The next night: a new dev file. Only the gate reads it.
    _touch_row(data_copy / "stsbenchmark" / "sts-dev.csv")
    plan = plan_pipeline(cfg)
    assert [(p.stage, p.action) for p in plan] == [("gate", RUN), ("evaluate", REUSE)], format_plan(cfg, plan)
    time.sleep(1.1)  # a distinct per-run lineage file name (second resolution)
    assert pipeline(cfg) == 0
    lineage = json.loads(Path(output, "lineage", "nightly-test.json").read_text())
    assert lineage["stages"]["gate"]["status"] == "ran"
    assert lineage["stages"]["evaluate"]["status"] == "skipped (complete)"
    assert len(list(Path(output, "lineage", "nightly-test").glob("*.json"))) == 2

    # Another run holding the lease: this one refuses to start (exit 1 through the job's main).
    from jobs.pipeline import main

    held = RunLease(output, ttl_s=600, name="other").acquire()
    try:
        config_file = tmp_path / "nightly-test.yaml"
        config_file.write_text(json.dumps(_gate_and_evaluate(output)))
        assert main(["--config", str(config_file)]) == 1
        assert "holds the lease" in capsys.readouterr().err
    finally:
        held.release()
