"""Starting Ray the same way everywhere: locally by default, a cluster when an address is set.

``ray.init()`` on one machine needs a few settings to behave on small boxes (more logical
CPUs than cores so a read task can run beside actors, a bounded object store); on a cluster
(``address`` or ``RAY_ADDRESS``, as ``ray job submit`` sets it) none of them apply.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from pydantic import Field

from embedforge.config import StrictModel
from embedforge.errors import ResourceError

log = logging.getLogger(__name__)

# Environment every Ray worker gets: one BLAS/torch thread per CPU a task asked for, quiet tokenizers.
WORKER_ENV = {
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
}


class RayConfig(StrictModel):
    """How to reach (or start) Ray."""

    address: str | None = Field(
        None, description="Cluster address ('auto', 'ray://host:10001'); None: RAY_ADDRESS or a new local Ray"
    )
    num_cpus: int | None = Field(
        None, ge=1, description="Logical CPUs of a new local Ray; default max(4, 2 x cores) so reads run beside actors"
    )
    object_store_memory_mb: int = Field(1024, ge=78, description="Object store of a new local Ray, MiB")
    include_dashboard: bool = Field(True, description="Needed by Ray Train (state API) and the Jobs REST API")
    temp_dir: str | None = Field(None, description="Ray's temp/session folder for a new local Ray")
    fail_fast_on_missing_gpus: bool = Field(
        True, description="Raise at once when a stage asks for GPUs the cluster lacks; turn off on autoscaling clusters"
    )


def _without_submitted_env_vars(runtime_env: dict[str, Any]) -> dict[str, Any]:
    """Drop the env vars a submitted job already sets (``ray job submit --runtime-env-json``).

    Inside a Ray job, ``ray.init`` merges the job's runtime env with ours and refuses any key
    set by both; the job's value is the user's explicit choice, so it wins.
    """
    import json

    blob = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not blob:
        return runtime_env
    job_env = (json.loads(blob).get("runtime_env") or {}).get("env_vars") or {}
    env_vars = {k: v for k, v in runtime_env.get("env_vars", {}).items() if k not in job_env}
    return {**runtime_env, "env_vars": env_vars}


# Fields of RayConfig that take effect only when this process connects to or starts Ray.
START_FIELDS = ("address", "num_cpus", "object_store_memory_mb", "include_dashboard", "temp_dir")
_started_with: RayConfig | None = None


def ignored_start_fields(config: RayConfig, started_with: RayConfig | None) -> list[str]:
    """The start fields ``config`` sets explicitly that cannot apply because Ray already runs with
    other settings (those of ``started_with``, or of whoever started it when None)."""
    out = []
    for name in START_FIELDS:
        if name not in config.model_fields_set:
            continue
        if started_with is not None and getattr(started_with, name) == getattr(config, name):
            continue
        out.append(f"ray.{name}={getattr(config, name)!r}")
    return out


def init_ray(config: RayConfig | None = None, runtime_env: dict[str, Any] | None = None) -> dict[str, float]:
    """Connect to or start Ray; return the cluster's resources. Idempotent.

    When Ray already runs in this process, the start settings of ``config`` cannot apply; each one
    set explicitly that differs from how Ray was started is named in a warning (never silently
    dropped). ``fail_fast_on_missing_gpus`` applies either way.
    """
    import ray

    global _started_with
    config = config or RayConfig()
    if ray.is_initialized():
        ignored = ignored_start_fields(config, _started_with)
        if ignored:
            log.warning("Ray already runs in this process, so %s from this config do not apply (it was started "
                        "%s); start the job in a fresh process for them to take effect", ", ".join(ignored),
                        "with " + _describe(_started_with) if _started_with else "outside init_ray")
        return ray.cluster_resources()
    env = {"env_vars": {**WORKER_ENV, **(runtime_env or {}).get("env_vars", {})}}
    runtime_env = {**(runtime_env or {}), **env}
    address = config.address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("connecting to Ray at %s", address)
        runtime_env = _without_submitted_env_vars(runtime_env)
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        num_cpus = config.num_cpus or max(4, 2 * (os.cpu_count() or 1))
        log.info("starting a local Ray with %d logical CPUs", num_cpus)
        ray.init(
            num_cpus=num_cpus,
            object_store_memory=config.object_store_memory_mb * 1024 * 1024,
            include_dashboard=config.include_dashboard,
            _temp_dir=config.temp_dir,
            runtime_env=runtime_env,
        )
    _started_with = config
    return ray.cluster_resources()


def _describe(config: RayConfig) -> str:
    return ", ".join(f"{n}={getattr(config, n)!r}" for n in START_FIELDS)


def unwrap_error(err: BaseException) -> BaseException:
    """The user-level exception behind a Ray task or actor error (Ray wraps the remote exception)."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, BaseException) else err


def check_resources(num_cpus: float, num_gpus: float, what: str, fail_fast: bool = True) -> None:
    """Fail fast (instead of hanging forever) when a request can never be scheduled."""
    import ray

    total = ray.cluster_resources()
    if num_gpus > 0 and total.get("GPU", 0) < num_gpus and fail_fast:
        raise ResourceError(
            f"{what} asks for num_gpus={num_gpus} but the cluster has {total.get('GPU', 0):g} GPUs; "
            f"set num_gpus=0 to run on CPU, or set ray.fail_fast_on_missing_gpus=false on an autoscaling GPU cluster"
        )
    if num_cpus > total.get("CPU", 0):
        raise ResourceError(
            f"{what} asks for num_cpus={num_cpus} but the cluster has {total.get('CPU', 0):g} CPUs; lower num_cpus"
        )


def remote_actor(cls: type, config: Any, ray_config: RayConfig | None = None, **options: Any):
    """Start ``cls(config)`` as a Ray actor with the resources its config asks for.

    ``config`` must have ``num_cpus``, ``num_gpus`` and ``ray_options()``; the request is
    checked first so a GPU ask on a CPU-only cluster fails at once instead of hanging.
    """
    import ray

    fail_fast = (ray_config or RayConfig()).fail_fast_on_missing_gpus
    check_resources(config.num_cpus, config.num_gpus, cls.__name__, fail_fast)
    return ray.remote(**config.ray_options(), **options)(cls).remote(config)


def resolve_dtype_on_cluster(requested: str, num_cpus: float, num_gpus: float, timeout_s: float = 300) -> str:
    """What ``dtype: auto`` resolves to on a worker placed like the model's replicas.

    The driver may run on a CPU head node while engines run on GPU workers (or the reverse), so
    ``auto`` is resolved by a task with the replicas' resources; the pipeline passes the concrete
    dtype to its workers and records it in the manifest. Explicit dtypes are returned unchanged.
    """
    if requested != "auto":
        return requested
    import ray

    from embedforge.hardware import resolve_dtype

    def probe() -> str:
        return resolve_dtype("auto", "cuda" if num_gpus > 0 else "cpu")

    ref = ray.remote(num_cpus=min(num_cpus, 1), num_gpus=num_gpus)(probe).remote()
    dtype = ray.get(ref, timeout=timeout_s)
    log.info("dtype auto resolves to %s on workers with num_gpus=%g", dtype, num_gpus)
    return dtype
