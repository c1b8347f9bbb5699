"""ServeConfig: what the embeddings server serves, its limits, batching, autoscaling and auth.

Pure (no Ray import), so ``python -m jobs.serve --dry-run`` and config tests are instant.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from embedforge.config import StrictModel
from embedforge.runtime import RayConfig


class LimitsConfig(StrictModel):
    """Per-request and per-replica bounds; together they bound memory (queued sentences x tokens), so
    neither one request nor a flood of them can OOM a replica."""

    max_inputs_per_request: int = Field(256, ge=1, le=65536,
                                        description="Most inputs (strings or token-id lists) in one request (more: 400)")
    max_tokens_per_input: int = Field(256, ge=8, le=32768,
                                      description="Most tokens per input; also capped by the model's max_seq_length")
    long_inputs: Literal["reject", "truncate"] = Field(
        "reject", description="Inputs longer than the token limit: 'reject' answers 400 naming the input and the "
                              "limit (as OpenAI does); 'truncate' keeps the first tokens (TEI's auto_truncate)")
    max_body_bytes: int = Field(2 * 1024 * 1024, ge=1024, description="Largest request body in bytes (more: 413)")
    max_queued_sentences: int = Field(
        4096, ge=1, description="Sentences one model replica holds queued or in its forward pass; a request that "
                                "would exceed it is answered 503 with Retry-After (a lone request always runs)")
    retry_after_s: float = Field(1, gt=0, le=3600, description="Retry-After of 503 answers (rounded up to seconds)")


class BatchingConfig(StrictModel):
    """Dynamic batching in each model replica (workflows.serve.forward_queue), counted in sentences."""

    max_batch_size: int = Field(64, ge=1, le=4096, description="Most sentences in one forward batch")
    batch_wait_timeout_s: float = Field(
        0, ge=0, le=10, description="When work reaches an idle model, wait this long for more (0: start at once; "
                                    "work arriving while a pass runs always joins the next pass)")
    encode_batch_size: int = Field(64, ge=1, le=4096, description="Sentences per torch forward pass inside a batch")
    max_models_per_replica: int = Field(3, ge=1, le=64,
                                        description="Models one replica keeps loaded (least recently used evicted)")


class AutoscalingConfig(StrictModel):
    """Serve ``autoscaling_config`` of the model deployment."""

    min_replicas: int = Field(1, ge=0, description="Fewest model replicas")
    max_replicas: int = Field(2, ge=1, description="Most model replicas")
    initial_replicas: int | None = Field(None, ge=0, description="Replicas at start; None: min_replicas")
    target_ongoing_requests: float = Field(4, gt=0, description="Ongoing requests per replica the autoscaler aims at")
    upscale_delay_s: float = Field(5, ge=0, description="Load must stay high this long before scaling up")
    downscale_delay_s: float = Field(30, ge=0, description="Load must stay low this long before scaling down")
    metrics_interval_s: float = Field(2, gt=0, description="How often replicas report load")
    look_back_period_s: float = Field(5, gt=0, description="Window over which load is averaged")

    @model_validator(mode="after")
    def _order(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})")
        return self


class DeploymentConfig(StrictModel):
    """Replica resources and back-pressure of one deployment."""

    num_cpus: float = Field(1, gt=0, description="CPUs per replica (fractional allowed, e.g. 0.5)")
    num_gpus: float = Field(0, ge=0, description="GPUs per replica; the model runs on cuda when it gets one")
    torch_threads: int | None = Field(None, ge=1, description="torch threads per model replica; None: ceil(num_cpus)")
    max_ongoing_requests: int = Field(
        256, ge=1, description="Requests Serve hands one replica at once; keep it above what the replica admits "
                               "(limits.max_queued_sentences) so overload gets the app's JSON 503")
    max_queued_requests: int = Field(
        512, ge=-1, description="Requests queued per caller beyond that before Serve's own 503 (-1: unbounded; avoid)")


class AuthConfig(StrictModel):
    """Bearer API keys. Keys come from the environment or a secret file, never from configs or logs."""

    mode: Literal["api_keys", "disabled"] = Field(
        "api_keys", description="'disabled' turns auth off (local use only; logged loudly at start)")
    api_keys_env: str | None = Field("EMBEDFORGE_API_KEYS",
                                     description="Environment variable holding comma-separated keys")
    api_keys_file: str | None = Field(None, description="Secret file with one key per line (e.g. a mounted Secret)")


class HttpConfig(StrictModel):
    host: str = Field("127.0.0.1", description="Address the Serve HTTP proxy binds ('0.0.0.0' in a cluster)")
    port: int = Field(8000, ge=0, le=65535, description="HTTP port of the Serve proxy")
    route_prefix: str = Field("/", description="Route prefix of the application")


class ServeSection(StrictModel):
    """How the job runs the server."""

    app_name: str = Field("embeddings", description="Serve application name")
    blocking: bool = Field(True, description="Block until SIGINT/SIGTERM; false: start, print the URL and return")
    startup_timeout_s: float = Field(300, gt=0, description="Give up when the app is not healthy by then")
    http_front: Literal["proxy", "haproxy"] = Field(
        "proxy", description="What answers HTTP on http.port: 'proxy': Ray Serve's Python HTTP proxy (one per "
                             "node); 'haproxy': Ray Serve's HAProxy front with direct ingress (replicas serve HTTP "
                             "themselves, HAProxy balances onto them) and Serve's throughput-optimized settings. "
                             "Ray Serve reads it from its environment when Ray starts: on a running cluster set "
                             "workflows.serve.run.serve_environment() on the nodes")


class VLLMBackendConfig(StrictModel):
    """Settings of the vLLM pooling-runner backend (models listed in ``backends`` as ``vllm``)."""

    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="auto: bfloat16 where the hardware computes it natively, float32 elsewhere")
    kv_cache_gb: float = Field(1.0, gt=0, description="CPU KV cache per engine, GiB")
    enforce_eager: bool = Field(True, description="Skip torch.compile (fast start; right on CPU)")


class ServeConfig(StrictModel):
    """Serve sentence embeddings over an OpenAI-compatible API with Ray Serve."""

    models: dict[str, str] = Field(
        default_factory=lambda: {"all-minilm-l6-v2": "all-minilm-l6-v2"},
        description="Served model name -> source (packaged short name, local folder, s3:// folder, hub id)")
    default_model: str | None = Field(None, description="Model used when a request names none; None: the first")
    backends: dict[str, Literal["sentence-transformers", "vllm"]] = Field(
        default_factory=dict, description="Backend per served model name (unnamed: sentence-transformers). vllm: "
                                          "vLLM's pooling runner; a model whose pooling vLLM cannot run (e.g. "
                                          "multilayer_trainable) is served with sentence-transformers, said at deploy")
    vllm: VLLMBackendConfig = Field(default_factory=VLLMBackendConfig, description="The vLLM backend's settings")
    normalize: bool = Field(True, description="L2-normalize embeddings")
    limits: LimitsConfig = LimitsConfig()
    batching: BatchingConfig = BatchingConfig()
    autoscaling: AutoscalingConfig = AutoscalingConfig()
    model_deployment: DeploymentConfig = DeploymentConfig()
    topology: Literal["split", "fused"] = Field(
        "fused", description="fused: one autoscaled deployment answers HTTP and runs the model (model_deployment "
                             "settings; no ingress -> model hop; every replica may load every model it is asked "
                             "for); split: an autoscaled FastAPI ingress in front of the autoscaled model "
                             "deployment (requests routed to replicas holding their model: many models)")
    ingress: DeploymentConfig = Field(
        DeploymentConfig(num_cpus=0.25, max_ongoing_requests=512, max_queued_requests=1024),
        description="The FastAPI ingress replicas of topology split (light)")
    ingress_autoscaling: AutoscalingConfig = Field(
        AutoscalingConfig(min_replicas=1, max_replicas=2, target_ongoing_requests=32),
        description="Serve autoscaling_config of the ingress (topology split)")
    auth: AuthConfig = AuthConfig()
    http: HttpConfig = HttpConfig()
    serve: ServeSection = ServeSection()
    ray: RayConfig = RayConfig()
    output: str | None = Field(None, description="URI where the job commits endpoint.json (URL, models); None: none")

    @model_validator(mode="after")
    def _check(self) -> ServeConfig:
        if not self.models:
            raise ValueError("models: serve at least one model, e.g. models: {minilm: all-minilm-l6-v2}")
        unknown = sorted(set(self.backends) - set(self.models))
        if unknown:
            raise ValueError(f"backends names {unknown}, which are not in models ({', '.join(self.models)})")
        if self.default_model is not None and self.default_model not in self.models:
            raise ValueError(f"default_model {self.default_model!r} is not in models ({', '.join(self.models)})")
        if self.auth.mode == "api_keys" and not (self.auth.api_keys_env or self.auth.api_keys_file):
            raise ValueError("auth: set api_keys_env or api_keys_file, or mode: disabled for local use")
        # The ingress only parses, checks and forwards: it runs no model, so these keys would do nothing.
        if self.ingress.num_gpus > 0:
            raise ValueError("ingress.num_gpus: the ingress runs no model; give GPUs to model_deployment.num_gpus")
        if self.ingress.torch_threads is not None:
            raise ValueError("ingress.torch_threads: the ingress runs no model; set model_deployment.torch_threads")
        return self

    @property
    def default_model_name(self) -> str:
        return self.default_model or next(iter(self.models))
