"""The OpenAI-compatible embeddings application on Ray Serve.

``build_app(config)`` returns a Serve application. Default ``topology: fused``: one autoscaled
deployment answers HTTP (auth, limits, validation, metrics, OpenAI error bodies) and runs the
multiplexed, batching model server (:mod:`workflows.serve.model_server`) in the same replica;
``topology: split``: an autoscaled FastAPI ingress in front of the autoscaled model deployment.
Routes:

* ``POST /v1/embeddings``: OpenAI's embeddings API (texts or token ids) plus ``layers`` (early
  exit); the answer's ``Server-Timing`` header gives its phases (app, model, tokenize, queue,
  forward, in ms);
* ``GET /v1/models`` and ``GET /v1/models/{id}``: served models with their elastic grids and limits;
* ``GET /health`` and ``/healthz`` and ``GET /metrics`` (Prometheus, cluster-wide; no key needed,
  so probes and scrapers work).

Every error is OpenAI's JSON error body, 500 included; overload is 503 with ``Retry-After``.

Start it with ``python -m jobs.serve --config configs/serve.yaml`` or
``serve run configs/serve_embeddings.yaml`` (which calls :func:`app_builder`).
"""

import asyncio
import base64
import logging
import time
from typing import Any

from workflows.serve.config import ServeConfig
from workflows.serve.limits import RequestError, install_error_handlers

log = logging.getLogger(__name__)

AUTH_SLOT = "embeddings"  # this app's API-key checker in workflows.serve.auth

INFO_TIMEOUT_S = 300.0  # the first call for a model may load (or download) it
EMBED_TIMEOUT_S = 300.0


def encode_embedding(vector: Any, encoding_format: str) -> list[float] | str:
    """One embedding as OpenAI returns it: floats, or base64 of little-endian float32 bytes."""
    import numpy as np

    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return [float(x) for x in vector]


def server_timing(phases: dict[str, float]) -> str:
    """A ``Server-Timing`` header value (W3C): ``name;dur=<ms>`` per phase."""
    return ", ".join(f"{name};dur={seconds * 1000:.2f}" for name, seconds in phases.items())


def embeddings_body(result: dict[str, Any], name: str, encoding_format: str) -> bytes:
    """The OpenAI response as JSON bytes (built directly: no per-float pydantic validation)."""
    import json

    emb = result["embeddings"]
    if encoding_format == "base64":
        vectors: list[Any] = [encode_embedding(v, "base64") for v in emb]
    else:
        vectors = emb.tolist()
    data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]
    tokens = result["prompt_tokens"]
    return json.dumps({"object": "list", "data": data, "model": name,
                       "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                       "dimensions": result["dimensions"], "layers": result["layers"]},
                      separators=(",", ":")).encode()


def make_fastapi_app(config: ServeConfig) -> tuple[Any, type]:
    """The FastAPI app and the ingress class whose methods serve its routes.

    (No ``from __future__ import annotations`` in this module: FastAPI reads the route
    annotations, which name classes imported locally here, at decoration time.)
    """
    from fastapi import Depends, FastAPI
    from fastapi.responses import PlainTextResponse, Response
    from ray import serve
    from ray.serve.exceptions import BackPressureError

    from workflows.serve.auth import ApiKeyAuth, replica_bearer_dependency, set_replica_auth
    from workflows.serve.limits import BodySizeLimitMiddleware, check_inputs, overloaded
    from workflows.serve.metrics import HttpMetrics, cluster_metrics
    from workflows.serve.model_server import unwrap_error
    from workflows.serve.schemas import EmbeddingRequest, EmbeddingResponse, ErrorResponse, ModelCard, ModelList

    app = FastAPI(title="embedforge embeddings", version="1", description=__doc__)
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=config.limits.max_body_bytes)
    require_key = replica_bearer_dependency(AUTH_SLOT)
    errors = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 500, 503)}

    install_error_handlers(app, validation_status=400)

    @serve.ingress(app)
    class EmbeddingsIngress:
        def __init__(self, config_data: dict[str, Any], model_handle: Any = None):
            """``model_handle``: the model deployment's handle; None (fused): run the model server here."""
            from workflows.serve.model_server import make_model_server

            self.config = ServeConfig.model_validate(config_data)
            a = self.config.auth
            set_replica_auth(AUTH_SLOT, ApiKeyAuth.from_settings(a.mode, a.api_keys_env, a.api_keys_file))
            self.metrics = HttpMetrics()
            self.model = model_handle
            self.local = make_model_server(self.config)(config_data) if model_handle is None else None
            self._info: dict[str, dict[str, Any]] = {}

        async def _call(self, model: str, method: str, *args: Any, timeout_s: float, **kwargs: Any) -> Any:
            retry = self.config.limits.retry_after_s
            try:
                if self.local is not None:
                    call = getattr(self.local, method)(*args, model_id=model, **kwargs)
                else:
                    handle = getattr(self.model.options(multiplexed_model_id=model), method)
                    call = _awaited(handle.remote(*args, **kwargs))
                return await asyncio.wait_for(call, timeout_s)
            except BackPressureError as e:
                raise overloaded(str(e), retry) from None
            except asyncio.TimeoutError:
                raise overloaded(f"model {model!r} did not answer within {timeout_s:.0f}s", retry,
                                 code="timeout") from None
            except Exception as e:  # noqa: BLE001 - Ray wraps replica errors; re-raise the user-level one
                cause = unwrap_error(e)
                if isinstance(cause, RequestError):
                    raise RequestError(cause.message, cause.status_code, cause.param, cause.code,
                                       cause.headers) from None
                if isinstance(cause, BackPressureError):
                    raise overloaded(str(cause), retry) from None
                raise

        def _model_name(self, requested: str | None) -> str:
            name = requested or self.config.default_model_name
            if name not in self.config.models:
                raise RequestError(f"model {name!r} is not served; served: {', '.join(self.config.models)}",
                                   status_code=404, param="model", code="model_not_found")
            return name

        @app.post("/v1/embeddings", response_model=EmbeddingResponse, responses=errors,
                  dependencies=[Depends(require_key)])
        async def embeddings(self, body: EmbeddingRequest) -> Any:
            started = time.perf_counter()
            name = body.model or self.config.default_model_name
            status = 200
            try:
                name = self._model_name(body.model)
                inputs = body.inputs()
                check_inputs(inputs, self.config.limits.max_inputs_per_request)
                called = time.perf_counter()
                result = await self._call(name, "embed", inputs, body.dimensions, body.layers,
                                          timeout_s=EMBED_TIMEOUT_S)
                model_s = time.perf_counter() - called
                content = embeddings_body(result, name, body.encoding_format)
            except RequestError as e:
                status = e.status_code
                raise
            except Exception:
                status = 500
                raise
            finally:
                self.metrics.observe(name if name in self.config.models else "unknown", status,
                                     time.perf_counter() - started)
            phases = {"app": time.perf_counter() - started, "model": model_s, **result["timings"]}
            return Response(content, media_type="application/json", headers={"Server-Timing": server_timing(phases)})

        async def _card(self, name: str) -> dict[str, Any]:
            if name not in self._info:
                self._info[name] = await self._call(name, "info", timeout_s=INFO_TIMEOUT_S)
            info = self._info[name]
            return {"id": name, "object": "model", "created": 0, "owned_by": "embedforge",
                    "elastic": {k: info[k] for k in ("layers", "dimensions", "max_layers", "max_dimensions",
                                                     "max_tokens", "vocab_size", "long_inputs")},
                    "backend": info.get("backend", "sentence-transformers")}

        @app.get("/v1/models", response_model=ModelList, responses=errors, dependencies=[Depends(require_key)])
        async def models(self) -> Any:
            return {"object": "list", "data": [await self._card(name) for name in self.config.models]}

        @app.get("/v1/models/{model_id}", response_model=ModelCard, responses=errors,
                 dependencies=[Depends(require_key)])
        async def model(self, model_id: str) -> Any:
            return await self._card(self._model_name(model_id))

        @app.get("/health")
        async def health(self) -> dict[str, str]:
            return {"status": "ok"}

        @app.get("/healthz")
        async def healthz(self) -> dict[str, str]:
            return {"status": "ok"}

        @app.get("/metrics", response_class=PlainTextResponse)
        async def prometheus(self) -> Any:
            text = await asyncio.to_thread(cluster_metrics)
            return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    return app, EmbeddingsIngress


async def _awaited(response: Any) -> Any:
    return await response


def _autoscaling(scale: Any) -> dict[str, Any]:
    return {
        "min_replicas": scale.min_replicas,
        "max_replicas": scale.max_replicas,
        "initial_replicas": scale.initial_replicas,
        "target_ongoing_requests": scale.target_ongoing_requests,
        "upscale_delay_s": scale.upscale_delay_s,
        "downscale_delay_s": scale.downscale_delay_s,
        "metrics_interval_s": scale.metrics_interval_s,
        "look_back_period_s": scale.look_back_period_s,
    }


def backend_fallbacks(config: ServeConfig) -> dict[str, str]:
    """Models asked for the vLLM backend that it cannot serve, with the reason (checked on local folders;
    other sources are checked when a replica loads them, with the same message in its log)."""
    from pathlib import Path

    from actors.vllm_embedder import vllm_pooling_support
    from embedforge.models import PACKAGED, resolve_model

    out = {}
    for name, backend in config.backends.items():
        source = config.models[name]
        if backend != "vllm" or not (Path(source).is_dir() or source.lower() in PACKAGED):
            continue
        reason = vllm_pooling_support(resolve_model(source))
        if reason is not None:
            out[name] = reason
    return out


def build_app(config: ServeConfig) -> Any:
    """The Serve application for ``config`` (one fused deployment, or autoscaled ingress -> model deployment)."""
    from ray import serve
    from ray.serve.config import BackpressureConfig

    from workflows.serve.model_server import make_model_server

    for name, reason in backend_fallbacks(config).items():
        log.warning("model %s: vLLM's pooling runner cannot serve it (%s); serving it with sentence-transformers",
                    name, reason)

    data = config.model_dump(mode="json")
    # Serve's own 503 (its queue past max_queued_requests) is the last resort: plain text, so say when to retry.
    backpressure = BackpressureConfig(status_code=503, retry_after_s=config.limits.retry_after_s)
    md = config.model_deployment
    model_options = dict(
        ray_actor_options={"num_cpus": md.num_cpus, "num_gpus": md.num_gpus},
        max_ongoing_requests=md.max_ongoing_requests,
        max_queued_requests=md.max_queued_requests,
        autoscaling_config=_autoscaling(config.autoscaling),
        backpressure_config=backpressure,
    )
    _, ingress_cls = make_fastapi_app(config)
    if config.auth.mode == "disabled":
        log.warning("AUTH DISABLED for application %r: anyone who reaches %s:%d can use it",
                    config.serve.app_name, config.http.host, config.http.port)
    if config.topology == "fused":
        return serve.deployment(ingress_cls, name="EmbeddingModel", **model_options).bind(data)
    model = serve.deployment(make_model_server(config), name="EmbeddingModel", **model_options)
    ing = config.ingress
    ingress = serve.deployment(
        ingress_cls,
        name="EmbeddingsIngress",
        ray_actor_options={"num_cpus": ing.num_cpus},
        max_ongoing_requests=ing.max_ongoing_requests,
        max_queued_requests=ing.max_queued_requests,
        autoscaling_config=_autoscaling(config.ingress_autoscaling),
        backpressure_config=backpressure,
    )
    return ingress.bind(data, model.bind(data))


def app_builder(args: dict[str, Any]) -> Any:
    """Serve config entry (``import_path: workflows.serve.app:app_builder``).

    ``args`` is either ``{"config": "configs/serve.yaml", "set": ["a.b=c", ...]}`` or the
    ServeConfig fields themselves.
    """
    from embedforge.config import config_from_app_args

    return build_app(config_from_app_args(ServeConfig, args))
