"""Every stage runs unchanged through Ray job submission against a real ``ray start --head``.

One head node on 127.0.0.1 for the module (started and stopped by its process group). Jobs are
submitted with the repo as ``working_dir`` (uploaded; .gitignore keeps .venv and caches out):

* every entrypoint of the KubeRay manifests (infra/k8s) plus the two Serve jobs, with
  ``--dry-run``: the module and config resolve in the cluster's copy of the repo and validate;
* the ``ray job submit`` CLI itself, the way the README shows it;
* one real stage end to end (evaluate on a tiny STS slice): the job joins the cluster through
  the RAY_ADDRESS that job submission sets, and commits its output manifest.

Run under ``flock /tmp/embedforge-heavy.lock`` on shared machines: this starts Ray.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.raycluster import HeadNode
from tests.manifests import entrypoints, parse_entrypoint

REPO = Path(__file__).resolve().parents[1]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}

# The Serve jobs have no RayJob manifest (the RayService serves them): submit their configs too.
EXTRA_ENTRYPOINTS = [
    ("serve", "python -m jobs.serve --config configs/serve.yaml"),
    ("debate", "python -m jobs.debate --config configs/debate.yaml"),
]


def job_env() -> dict[str, str]:
    """What a job needs to find data and models from the uploaded copy of the repo."""
    from embedforge.data._files import data_root

    env = {
        "EMBEDFORGE_DATA": str(data_root()),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
        "TQDM_DISABLE": "1",
        # The serving configs take their API keys from this variable (a Secret on the cluster); a
        # missing key is a config error even on --dry-run.
        "EMBEDFORGE_API_KEYS": "key-for-the-dry-run",
    }
    if os.environ.get("EMBEDFORGE_MODEL_CACHE"):
        env["EMBEDFORGE_MODEL_CACHE"] = os.environ["EMBEDFORGE_MODEL_CACHE"]
    return env


def with_interpreter(entrypoint: str) -> str:
    """`python -m ...` with this environment's interpreter (a bare `python` may be another one)."""
    module, args = parse_entrypoint(entrypoint)
    return shlex.join([sys.executable, "-m", module, *args])


@pytest.fixture(scope="module")
def head():
    os.environ["RAY_AUTH_MODE"] = "disabled"
    node = HeadNode().start(num_cpus=4)
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture(scope="module")
def client(head):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(head.dashboard_url)


def wait(client, job_id: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL:
            return status
        time.sleep(1)
    client.stop_job(job_id)
    raise TimeoutError(f"job {job_id} not finished after {timeout_s}s; logs:\n{client.get_job_logs(job_id)[-3000:]}")


def submit(client, entrypoint: str) -> str:
    return client.submit_job(entrypoint=entrypoint,
                             runtime_env={"working_dir": str(REPO), "env_vars": job_env()})


@pytest.mark.timeout(600)
def test_every_stage_entrypoint_resolves_in_the_cluster_working_dir(client):
    cases = [(where, e) for where, e in entrypoints()] + EXTRA_ENTRYPOINTS
    stages = {parse_entrypoint(e)[0] for _, e in cases}
    assert {f"jobs.{s}" for s in ("synthesize", "reward", "train", "evaluate", "serve", "debate",
                                   "debate_eval", "pipeline")} <= stages
    jobs = {where: submit(client, with_interpreter(e) + " --dry-run") for where, e in cases}
    failures = []
    for where, job_id in jobs.items():
        status = wait(client, job_id, timeout_s=300)
        logs = client.get_job_logs(job_id)
        if status != "SUCCEEDED" or "Config (hash " not in logs:
            failures.append(f"{where}: {status}\n{logs[-2000:]}")
    assert not failures, "\n\n".join(failures)


@pytest.mark.timeout(300)
def test_a_bad_config_fails_the_submitted_job(client):
    job_id = submit(client, f"{sys.executable} -m jobs.train --config configs/train.yaml "
                            "--set train.batch_size=0 --dry-run")
    assert wait(client, job_id, timeout_s=120) == "FAILED"
    assert "train.batch_size" in client.get_job_logs(job_id)


@pytest.mark.timeout(300)
def test_ray_job_submit_cli_runs_a_stage(head):
    ray_cli = str(Path(sys.executable).parent / "ray")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    cmd = [ray_cli, "job", "submit", "--address", head.dashboard_url, "--working-dir", ".", "--",
           sys.executable, "-m", "jobs.train", "--config", "configs/train.yaml",
           "--set", "train.max_steps=5", "--dry-run"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "# TrainConfig (hash " in out and "max_steps: 5" in out, out[-3000:]
    assert "succeeded" in out.lower(), out[-3000:]


@pytest.mark.timeout(600)
def test_evaluate_runs_end_to_end_through_job_submission(client, tmp_path):
    from embedforge import storage

    output = str(tmp_path / "evaluate")
    entrypoint = shlex.join([
        sys.executable, "-m", "jobs.evaluate", "--config", "configs/evaluate.yaml",
        "--set", "tasks=[{kind: sts, datasets: [{source: stsb, langs: [en], limit: 24}]}]",
        "--set", "grid.from_model=false", "--set", "grid.layers=null", "--set", "grid.dims=null",
        "--set", "embed.mode=ray", "--set", "embed.actors=1", "--set", "embed.batch_size=16",
        "--set", "embed.cache_dir=null", "--set", f"output={output}",
    ])
    job_id = submit(client, entrypoint)
    status = wait(client, job_id, timeout_s=540)
    logs = client.get_job_logs(job_id)
    assert status == "SUCCEEDED", logs[-4000:]
    assert "connecting to Ray at" in logs, "the job must join the submitted-to cluster, not start its own Ray"
    manifest = storage.read_manifest(output)
    assert manifest, f"no manifest at {output}"
    assert "report" in logs
