"""Jobs submitted the way a user submits them find the offline datasets and configs on the nodes.

``ray job submit --working-dir . -- python ...`` runs the job in an uploaded copy of the repo
(under the node's session folder), where the datasets folder beside the repo does not exist; no
``runtime_env`` is passed. What makes the data visible is the node's own environment:
``EMBEDFORGE_DATA`` set on every node (infra/aws/cluster.yaml: the containers' ``--env``;
infra/k8s: every Ray container's env and the image's ENV). A real ``ray start --head`` with that
variable runs the job, in the driver and in a Ray worker process; the same head without it fails
with the loader's message (negative control).

Run under the machine's heavy-work lock on shared machines: this starts Ray.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.raycluster import HeadNode

REPO = Path(__file__).resolve().parents[1]

# Reads STS-B dev through the project's loader in the driver and in a Ray task, and a config
# file relative to the working directory.
JOB = """
import ray
from embedforge.config import load_config
from embedforge.data.spec import DatasetSpec, load_dataset
from workflows.pipeline.config import PipelineConfig

def rows():
    return load_dataset(DatasetSpec(source="stsb", split="dev", limit=7)).height

ray.init()
cfg = load_config(PipelineConfig, "configs/nightly.yaml")
print("driver rows", rows(), "config", cfg.name)
print("worker rows", ray.get(ray.remote(num_cpus=1)(rows).remote(), timeout=120))
"""


def submit(head: HeadNode) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    for name in ("RAY_ADDRESS", "EMBEDFORGE_DATA"):   # the user's machine has neither
        env.pop(name, None)
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", head.dashboard_url,
           "--working-dir", ".", "--", sys.executable, "-c", JOB]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)


@pytest.mark.timeout(900)
def test_working_dir_jobs_find_data_and_configs_through_the_node_environment():
    from embedforge.data._files import data_root

    head = HeadNode().start(num_cpus=4, env={"EMBEDFORGE_DATA": str(data_root())})
    try:
        proc = submit(head)
    finally:
        head.stop()
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "driver rows 7 config nightly" in out and "worker rows 7" in out, out[-4000:]

    bare = HeadNode().start(num_cpus=4)
    try:
        proc = submit(bare)
    finally:
        bare.stop()
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, "without EMBEDFORGE_DATA on the node the uploaded copy cannot see the data"
    assert "offline datasets not found" in out, out[-4000:]
