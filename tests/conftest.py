"""Shared test fixtures: one S3 server, one local Ray, one vLLM engine, packaged models.

Everything heavy is session-scoped and started only when a test asks for it. Unit tests that
need none of it run without Ray.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Test environment: set before anything imports Ray, vLLM or the hub client.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("EMBEDFORGE_CACHE", str(REPO / ".cache"))
os.environ.setdefault("EMBEDFORGE_MODEL_CACHE", str(REPO / ".cache" / "models"))
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="session")
def s3():
    """A real S3 server on 127.0.0.1 (SeaweedFS) with its credentials in the AWS environment."""
    from tests.s3server import S3Server

    server = S3Server().start()
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    try:
        yield server
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def ray_local(s3):
    """One local Ray for the session (4 logical CPUs on 2 cores; workers inherit the S3 env)."""
    import ray

    from embedforge.runtime import RayConfig, init_ray

    temp_dir = tempfile.mkdtemp(prefix="ef-ray-", dir="/tmp")
    init_ray(RayConfig(num_cpus=4, object_store_memory_mb=512, include_dashboard=True, temp_dir=temp_dir))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def minilm_path() -> str:
    from embedforge.models import resolve_model

    return resolve_model("all-minilm-l6-v2")


@pytest.fixture(scope="session")
def smollm_path() -> str:
    from embedforge.models import resolve_model

    return resolve_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def llm_engine(smollm_path):
    """A real vLLM engine (CPU) on SmolLM2-135M-Instruct, in-process, prompt embeddings on."""
    from actors.llm_engine import LLMEngine, LLMEngineConfig

    return LLMEngine(LLMEngineConfig(model=smollm_path, enable_prompt_embeds=True, max_model_len=2048, num_cpus=2))
