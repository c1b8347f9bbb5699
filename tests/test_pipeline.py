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


def test_references_must_name_a_field_of_the_stage_result():
    train = {"datasets": [{"dataset": {"source": "stsb"}, "objective": {"kind": "cosent"}}], "train": {"max_steps": 1}}
    with pytest.raises(ConfigError, match=r"reference \$\{train\.modle\}: the train stage's result has no field "
                                          r"'modle' to reference; it has .*model"):
        build_config(PipelineConfig, {"train": train, "evaluate": {"model": "${train.modle}"}})
    with pytest.raises(ConfigError, match=r"\$\{gate\.metrics\}: the gate stage's result has no field 'metrics'"):
        build_config(PipelineConfig, {"gate": {"model": "m", "baseline": {"model": "b"}, "gate": {}},
                                      "evaluate": {"model": "${gate.metrics}"}})
    build_config(PipelineConfig, {"train": train, "evaluate": {"model": "${train.model}"}})


def _evaluate_only(tmp_path, **over):
    section = {"model": "all-minilm-l6-v2", "split": "test", "embed": {"mode": "local", "cache_dir": None},
               "tasks": [{"kind": "sts", "datasets": [{"source": "stsb", "limit": 20}]}], **over}
    return build_config(PipelineConfig, {"output": str(tmp_path / "run"), "evaluate": section})


def test_plan_keys_are_known_before_running_and_follow_upstream(tmp_path):
    cfg = load_config(PipelineConfig, REPO / "configs" / "quickstart.yaml", [f"output={tmp_path}/q"])
    plan = {p.section: p for p in cfg.plan()}
    assert list(plan) == ["synthesize", "train", "gate", "evaluate"]  # deploy serves, it is not keyed
    assert plan["train"].output == f"{tmp_path}/q/train/{plan['train'].key}"
    assert all(len(p.key) == 12 for p in plan.values()) and "stsb[train]" in plan["synthesize"].inputs
    assert {p.section: p.key for p in cfg.plan()} == {s: p.key for s, p in plan.items()}  # deterministic
    # a change upstream changes every key downstream; a change downstream leaves upstream keys alone
    up = {p.section: p.key for p in load_config(PipelineConfig, REPO / "configs" / "quickstart.yaml",
                                                 [f"output={tmp_path}/q", "synthesize.qe.min_cosine=0.7"]).plan()}
    assert all(up[s] != plan[s].key for s in plan)
    down = {p.section: p.key for p in load_config(PipelineConfig, REPO / "configs" / "quickstart.yaml",
                                                   [f"output={tmp_path}/q", "evaluate.split=dev"]).plan()}
    assert down["evaluate"] != plan["evaluate"].key and down["train"] == plan["train"].key


def test_dry_run_prints_every_resolved_stage_with_its_key(tmp_path, capsys):
    import yaml

    from jobs.pipeline import main

    assert main(["--config", "configs/quickstart.yaml", "--set", f"output={tmp_path}/q", "--dry-run"]) == 0
    header, _, body = capsys.readouterr().out.partition("\n")
    assert header.startswith("# PipelineConfig (hash ")
    printed = yaml.safe_load(body)
    cfg = load_config(PipelineConfig, REPO / "configs" / "quickstart.yaml", [f"output={tmp_path}/q"])
    assert printed["output"] == f"{tmp_path}/q" and printed["train"] == cfg.train  # the config itself
    stages = printed["resolved_stages"]
    assert list(stages) == ["synthesize", "train", "gate", "evaluate", "deploy"]
    for p in cfg.plan():
        assert (stages[p.section]["key"], stages[p.section]["output"]) == (p.key, p.output)
        assert stages[p.section]["config"]["output"] == p.output
    synth = stages["synthesize"]["output"]
    assert stages["train"]["config"]["datasets"][0]["dataset"] == synth  # ${synthesize.output} resolved
    assert stages["gate"]["config"]["model"] == "${train.model}"          # known once train has run
    assert stages["synthesize"]["config"]["qe"]["min_cosine"] == 0.8      # every default resolved
    assert stages["deploy"]["key"] is None and stages["deploy"]["config"]["models"] == {
        "quickstart-minilm-de": "${train.model}"}


def test_missing_api_keys_and_few_shot_data_exit_2_before_ray(monkeypatch, capsys):
    import ray

    from jobs.pipeline import main

    def no_cluster_work(*args, **kwargs):
        raise AssertionError("Ray was started before the config error")

    # The session's Ray may already be up from other tests: make any start attempt visible.
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", no_cluster_work)
    monkeypatch.delenv("EMBEDFORGE_TEST_KEYS", raising=False)
    assert main(["--config", "configs/quickstart.yaml", "--set", "deploy.auth.mode=api_keys",
                 "--set", "deploy.auth.api_keys_env=EMBEDFORGE_TEST_KEYS"]) == 2
    assert "deploy.auth: no API keys ($EMBEDFORGE_TEST_KEYS is unset)" in capsys.readouterr().err
    assert main(["--config", "configs/quickstart.yaml", "--set", "synthesize.target_langs=[sw]"]) == 2
    assert "synthesize.translation.few_shot: no built-in few-shot examples for 'sw'" in capsys.readouterr().err


def test_serve_and_debate_jobs_check_their_keys_before_ray(monkeypatch, capsys):
    from jobs.debate import main as debate
    from jobs.serve import main as serve

    monkeypatch.setenv("EMBEDFORGE_TEST_KEYS", "")
    assert serve(["--set", "auth.mode=api_keys", "--set", "auth.api_keys_env=EMBEDFORGE_TEST_KEYS"]) == 2
    assert "$EMBEDFORGE_TEST_KEYS is empty" in capsys.readouterr().err
    assert debate(["--config", "configs/debate.yaml", "--set", "auth.api_keys_env=EMBEDFORGE_TEST_KEYS"]) == 2
    assert "auth: no API keys" in capsys.readouterr().err


@pytest.mark.timeout(600)
def test_pipeline_runs_registered_stages_under_the_committed_run_rule(ray_local, minilm_path, tmp_path):
    """A real (small) pipeline run, rerun and changed: skip on the same key, a new key on a change."""
    from embedforge.committed import read_record
    from workflows.pipeline.plan import REUSE, RUN, plan_pipeline
    from workflows.pipeline.run import run_pipeline

    cfg = _evaluate_only(tmp_path)
    assert [p.action for p in plan_pipeline(cfg)] == [RUN]
    first = run_pipeline(cfg)
    assert first["stages"] == {"evaluate": "ran"}
    result = first["results"]["evaluate"]
    assert type(result).__name__ == "EvaluateResult" and 0 < result.metrics["sts/stsb:en"] <= 100
    key = cfg.plan()[0].key
    assert read_record(result.output)["status"] == "committed" and result.output.endswith(f"/evaluate/{key}")
    assert [p.action for p in plan_pipeline(cfg)] == [REUSE]
    second = run_pipeline(cfg)
    assert second["stages"] == {"evaluate": "skipped (complete)"}
    assert second["results"]["evaluate"].metrics == result.metrics
    changed = _evaluate_only(tmp_path, tasks=[{"kind": "sts", "datasets": [{"source": "stsb", "limit": 25}]}])
    third = run_pipeline(changed)
    assert third["stages"] == {"evaluate": "ran"} and third["results"]["evaluate"].output != result.output
    lineage = json.loads((tmp_path / "run" / "lineage" / "pipeline.json").read_text())
    assert lineage["stages"]["evaluate"]["key"] == changed.plan()[0].key


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
    sets = ["--set", f"output={out}", "--set", "synthesize.inputs.0.limit=40",
            "--set", "train.train.epochs=1", "--set", "train.train.batch_size=4",
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
