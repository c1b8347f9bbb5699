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


# ---------------------------------------------------------------- keys that validated and did nothing


def test_run_job_check_hook_exits_2_and_dry_run_describes(capsys):
    def check(cfg):
        if cfg.steps > 5:
            raise ConfigError("steps: above what the environment allows")

    assert run_job(DemoConfig, print, ["--set", "steps=9"], check=check) == 2
    assert "steps: above what the environment allows" in capsys.readouterr().err
    assert run_job(DemoConfig, print, ["--dry-run", "--set", "steps=3"], check=check,
                   describe=lambda c: f"described {c.steps}\n") == 0
    assert capsys.readouterr().out == "described 3\n"


def test_content_hash_leaves_out_where_and_how_a_stage_runs():
    from embedforge.runtime import RayConfig

    class Staged(StrictModel):
        x: int = 1
        output: str = "/a"
        ray: RayConfig = RayConfig()
        overwrite: bool = False

    a = Staged()
    assert a.content_hash() == Staged(output="/b", ray=RayConfig(num_cpus=8), overwrite=True).content_hash()
    assert a.content_hash() != Staged(x=2).content_hash()


def test_debate_keys_set_by_the_app_are_refused():
    from workflows.debate.config import DebateConfig, DebateEvalConfig

    base = {"auth": {"mode": "disabled"}}
    for over, match in [
        ({"cipher": {"model": "x"}}, r"cipher\.model: each served model's source"),
        ({"cipher": {"num_cpus": 2}}, r"cipher\.num_cpus: agent_deployment"),
        ({"cipher": {"torch_threads": 2}}, r"cipher\.torch_threads: agent_deployment"),
        ({"engine": {"model": "x"}}, r"engine\.model: each served model's source"),
        ({"engine": {"num_gpus": 1}}, r"engine\.num_gpus: agent_deployment"),
        ({"ingress": {"num_gpus": 1}}, r"ingress\.num_gpus: the ingress runs no model"),
        ({"ingress": {"torch_threads": 2}}, r"ingress\.torch_threads: the ingress runs no model"),
    ]:
        with pytest.raises(ConfigError, match=match):
            build_config(DebateConfig, {**base, **over})
    # what stays: cipher decoding settings, engine settings the replica uses, GPUs for vLLM-only modes
    # CIPHER agents run on CUDA when given GPUs, so agent_deployment.num_gpus is kept with cipher mode too
    assert build_config(DebateConfig, {**base, "agent_deployment": {"num_gpus": 1}}).agent_deployment.num_gpus == 1
    cfg = build_config(DebateConfig, {**base, "cipher": {"max_context_tokens": 1024}, "engine": {"max_model_len": 1024},
                                      "modes": ["natural", "single"], "agent_deployment": {"num_gpus": 1}})
    assert cfg.agent_deployment.num_gpus == 1
    with pytest.raises(ConfigError, match=r"cipher\.model: `model` is every agent's model"):
        build_config(DebateEvalConfig, {"cipher": {"model": "x"}})
    assert build_config(DebateEvalConfig, {"cipher": {"num_cpus": 2}}).cipher.num_cpus == 2  # used there
    load_config(DebateConfig, REPO / "configs" / "debate.yaml")
    load_config(DebateEvalConfig, REPO / "configs" / "debate_eval.yaml")


def test_debate_replica_config_round_trips():
    """The app hands replicas only the keys given, and they rebuild the same config."""
    from workflows.debate.config import DebateConfig

    cfg = build_config(DebateConfig, {"auth": {"mode": "disabled"}, "agent_deployment": {"num_cpus": 2}})
    again = DebateConfig.model_validate(cfg.model_dump(mode="json", exclude_unset=True))
    assert again == cfg and again.agent_deployment.num_cpus == 2


def test_checkpoint_metric_is_a_reported_name():
    from workflows.train.config import CheckpointConfig

    with pytest.raises(ValueError, match="dev_spearman"):
        CheckpointConfig(metric="dev_spearmann")
    assert CheckpointConfig(metric="train_loss", mode="min").metric == "train_loss"


def test_init_ray_names_the_settings_it_cannot_apply(monkeypatch, caplog):
    """With Ray already running, explicitly set start fields are named in a warning, never dropped silently."""
    import ray

    from embedforge import runtime
    from embedforge.runtime import RayConfig, ignored_start_fields, init_ray

    started = RayConfig(num_cpus=4)
    assert ignored_start_fields(RayConfig(num_cpus=4), started) == []
    assert ignored_start_fields(RayConfig(), started) == []  # nothing asked for
    assert ignored_start_fields(RayConfig(num_cpus=6, temp_dir="/t"), started) == ["ray.num_cpus=6",
                                                                                    "ray.temp_dir='/t'"]
    assert ignored_start_fields(RayConfig(num_cpus=4), None) == ["ray.num_cpus=4"]  # started outside init_ray
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
    monkeypatch.setattr(runtime, "_started_with", started)
    with caplog.at_level("WARNING", logger="embedforge.runtime"):
        assert init_ray(RayConfig(num_cpus=6)) == {"CPU": 4.0}
    assert "ray.num_cpus=6 from this config do not apply" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="embedforge.runtime"):
        init_ray(RayConfig(num_cpus=4, fail_fast_on_missing_gpus=False))
    assert caplog.text == ""


def test_translation_engine_fields_are_the_engines_own_and_reach_it():
    from actors.llm_engine import LLMEngineConfig
    from workflows.synthesize.config import SynthesizeConfig, TranslationConfig
    from workflows.synthesize.pipeline import translator_config

    assert set(LLMEngineConfig.model_fields) <= set(TranslationConfig.model_fields)
    cfg = build_config(SynthesizeConfig, {"inputs": [{"source": "stsb", "split": "train", "limit": 4}],
                                          "target_langs": ["de"], "output": "/tmp/x",
                                          "translation": {"tensor_parallel_size": 2, "gpu_memory_utilization": 0.5,
                                                          "kv_cache_gb": 2, "num_threads": 3}})
    engine = LLMEngineConfig.model_validate(translator_config(cfg)["engine"])
    assert (engine.tensor_parallel_size, engine.gpu_memory_utilization, engine.kv_cache_gb, engine.num_threads) == \
        (2, 0.5, 2.0, 3)
    assert engine.model == "gemma-3-270m" and engine.max_model_len == 1024  # the translation defaults
    with pytest.raises(ConfigError, match=r"translation\.num_threads: the ray_data_llm backend"):
        build_config(SynthesizeConfig, {"inputs": [{"source": "stsb", "split": "train"}], "target_langs": ["de"],
                                        "output": "/tmp/x", "translation": {"backend": "ray_data_llm",
                                                                            "num_threads": 2}})


@pytest.mark.parametrize("key, fix", [("ingress.num_gpus=1", "model_deployment.num_gpus"),
                                      ("ingress.torch_threads=2", "model_deployment.torch_threads")])
def test_serve_ingress_model_keys_are_refused_with_the_key_that_works(key, fix):
    from embedforge.config import load_config
    from workflows.serve.config import ServeConfig

    with pytest.raises(ConfigError, match=fix):
        load_config(ServeConfig, REPO / "configs" / "serve.yaml", [key])
