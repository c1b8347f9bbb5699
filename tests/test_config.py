import subprocess
import sys
from typing import Literal

import pytest
from pydantic import Field

from embedforge.config import StrictModel, apply_overrides, build_config, load_config, run_job
from embedforge.errors import ConfigError

from tests.conftest import REPO


class OptimConfig(StrictModel):
    lr: float = Field(2e-5, gt=0)
    schedule: Literal["linear", "cosine"] = "linear"


class DemoConfig(StrictModel):
    name: str = "demo"
    steps: int = Field(10, ge=1)
    optim: OptimConfig = OptimConfig()


def test_defaults_and_overrides():
    cfg = build_config(DemoConfig, {"steps": 3}, ["optim.lr=0.001", "optim.schedule=cosine"])
    assert cfg.steps == 3 and cfg.optim.lr == 0.001 and cfg.optim.schedule == "cosine"


def test_unknown_key_names_field_and_allowed():
    with pytest.raises(ConfigError, match=r"optim\.lrr: unknown key .*allowed keys here: lr, schedule"):
        build_config(DemoConfig, {"optim": {"lrr": 1}})


def test_bad_literal_names_value_and_choices():
    with pytest.raises(ConfigError, match=r"optim\.schedule = \"step\": Input should be 'linear' or 'cosine'"):
        build_config(DemoConfig, {}, ["optim.schedule=step"])


def test_bound_violation():
    with pytest.raises(ConfigError, match=r"steps = 0: Input should be greater than or equal to 1"):
        build_config(DemoConfig, {"steps": 0})


def test_frozen_and_hash_stable():
    a = build_config(DemoConfig, {})
    with pytest.raises(Exception):
        a.steps = 5
    assert a.config_hash() == build_config(DemoConfig, {}).config_hash()
    assert a.config_hash() != build_config(DemoConfig, {"steps": 2}).config_hash()


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_overrides({}, ["steps"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"steps": 1}, ["steps.x=2"])


def test_override_list_items_by_index():
    data = {"inputs": [{"limit": 1}, {"limit": 2}]}
    assert apply_overrides(data, ["inputs.1.limit=5"]) == {"inputs": [{"limit": 1}, {"limit": 5}]}
    assert data["inputs"][1]["limit"] == 2  # the input is not mutated
    with pytest.raises(ConfigError, match=r"inputs has items 0..1; '2' is not one of them"):
        apply_overrides(data, ["inputs.2.limit=5"])


def test_yaml_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("steps: 7\noptim:\n  lr: 0.5\n")
    assert load_config(DemoConfig, p).optim.lr == 0.5
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(DemoConfig, tmp_path / "missing.yaml")
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(DemoConfig, p)


def test_run_job_exit_codes(capsys):
    seen = []
    assert run_job(DemoConfig, seen.append, ["--set", "steps=2"]) == 0
    assert seen[0].steps == 2
    assert run_job(DemoConfig, seen.append, ["--set", "steps=-1"]) == 2
    assert "steps = -1" in capsys.readouterr().err
    assert run_job(DemoConfig, seen.append, ["--dry-run"]) == 0
    assert "steps: 10" in capsys.readouterr().out
    assert len(seen) == 1


def test_real_job_exits_2_before_cluster_work():
    """A job entrypoint with a bad config exits 2 in a fresh interpreter (no Ray started)."""
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.pipeline", "--config", "configs/quickstart.yaml", "--set", "ray.num_cpus=0"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "ray.num_cpus = 0" in proc.stderr
