"""The OpenAI-compatible embeddings application on Ray Serve.

``build_app(config)`` returns a Serve application: a FastAPI ingress deployment (auth, limits,
validation, metrics, OpenAI error bodies) in front of the autoscaled, multiplexed, batching
model deployment (:mod:`workflows.serve.model_server`); with ``topology: fused`` one autoscaled
deployment does both (the routes call the model server in the same replica). Routes:

* ``POST /v1/embeddings``: OpenAI's embeddings API plus ``layers`` (early exit);
* ``GET /v1/models``: served models with their elastic grids;
* ``GET /healthz`` and ``GET /metrics`` (Prometheus; no key needed, so probes and scrapers work).

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


def make_fastapi_app(config: ServeConfig) -> tuple[Any, type]:
    """The FastAPI app and the ingress class whose methods serve its routes.

    (No ``from __future__ import annotations`` in this module: FastAPI reads the route
    annotations, which name classes imported locally here, at decoration time.)
    """
    from fastapi import Depends, FastAPI
    from fastapi.responses import Response
    from ray import serve
    from ray.serve.exceptions import BackPressureError

    from workflows.serve.auth import ApiKeyAuth, replica_bearer_dependency, set_replica_auth
    from workflows.serve.limits import BodySizeLimitMiddleware, check_inputs
    from workflows.serve.metrics import ServeMetrics, ray_node_metrics
    from workflows.serve.model_server import unwrap_error
    from workflows.serve.schemas import EmbeddingRequest, EmbeddingResponse, ErrorResponse, ModelList

    app = FastAPI(title="embedforge embeddings", version="1", description=__doc__)
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=config.limits.max_body_bytes)
    require_key = replica_bearer_dependency(AUTH_SLOT)
    errors = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 503)}

    install_error_handlers(app, validation_status=400)

    @serve.ingress(app)
    class EmbeddingsIngress:
        def __init__(self, config_data: dict[str, Any], model_handle: Any = None):
            """``model_handle``: the model deployment's handle; None (fused): run the model server here."""
            from workflows.serve.model_server import make_model_server

            self.config = ServeConfig.model_validate(config_data)
            a = self.config.auth
            set_replica_auth(AUTH_SLOT, ApiKeyAuth.from_settings(a.mode, a.api_keys_env, a.api_keys_file))
            self.metrics = ServeMetrics()
            self.model = model_handle
            self.local = make_model_server(self.config)(config_data) if model_handle is None else None
            self._info: dict[str, dict[str, Any]] = {}

        async def _call(self, model: str, method: str, *args: Any, timeout_s: float, **kwargs: Any) -> Any:
            try:
                if self.local is not None:
                    call = getattr(self.local, method)(*args, model_id=model, **kwargs)
                else:
                    handle = getattr(self.model.options(multiplexed_model_id=model), method)
                    call = _awaited(handle.remote(*args, **kwargs))
                return await asyncio.wait_for(call, timeout_s)
            except BackPressureError as e:
                raise RequestError(f"server overloaded ({e}); retry later", status_code=503,
                                   code="overloaded") from None
            except asyncio.TimeoutError:
                raise RequestError(f"model {model!r} did not answer within {timeout_s:.0f}s; retry later",
                                   status_code=503, code="timeout") from None
            except Exception as e:  # noqa: BLE001 - Ray wraps replica errors; re-raise the user-level one
                cause = unwrap_error(e)
                if isinstance(cause, RequestError):
                    raise RequestError(cause.message, cause.status_code, cause.param, cause.code) from None
                if isinstance(cause, BackPressureError):
                    raise RequestError("server overloaded; retry later", status_code=503, code="overloaded") from None
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
            started = time.monotonic()
            name = body.model or self.config.default_model_name
            status = 200
            try:
                name = self._model_name(body.model)
                texts = body.texts()
                check_inputs(texts, self.config.limits.max_inputs_per_request)
                result = await self._call(name, "embed", texts, body.dimensions, body.layers,
                                          timeout_s=EMBED_TIMEOUT_S)
            except RequestError as e:
                status = e.status_code
                raise
            except Exception:
                status = 500
                raise
            finally:
                label = name if name in self.config.models else "unknown"
                self.metrics.requests.labels(label, str(status)).inc()
                self.metrics.latency_seconds.labels(label).observe(time.monotonic() - started)
            self.metrics.inputs.labels(name).inc(len(texts))
            self.metrics.tokens.labels(name).inc(result["prompt_tokens"])
            for size in result["batch_sizes"]:
                self.metrics.batch_size.observe(size)
            self.metrics.queue_seconds.observe(result["queue_s"])
            data = [{"object": "embedding", "index": i, "embedding": encode_embedding(v, body.encoding_format)}
                    for i, v in enumerate(result["embeddings"])]
            return {"object": "list", "data": data, "model": name,
                    "usage": {"prompt_tokens": result["prompt_tokens"], "total_tokens": result["prompt_tokens"]},
                    "dimensions": result["dimensions"], "layers": result["layers"]}

        @app.get("/v1/models", response_model=ModelList, responses=errors, dependencies=[Depends(require_key)])
        async def models(self) -> Any:
            cards = []
            for name in self.config.models:
                if name not in self._info:
                    self._info[name] = await self._call(name, "info", timeout_s=INFO_TIMEOUT_S)
                info = self._info[name]
                cards.append({"id": name, "object": "model", "created": 0, "owned_by": "embedforge",
                              "elastic": {"layers": info["layers"], "dimensions": info["dimensions"],
                                          "max_layers": info["max_layers"],
                                          "max_dimensions": info["max_dimensions"],
                                          "max_tokens": info["max_tokens"]}})
            return {"object": "list", "data": cards}

        @app.get("/healthz")
        async def healthz(self) -> dict[str, str]:
            return {"status": "ok"}

        @app.get("/metrics", response_class=Response)
        async def prometheus(self) -> Any:
            ours = self.metrics.render()
            ray_text = await asyncio.to_thread(ray_node_metrics)
            return Response(ours + b"\n" + ray_text, media_type="text/plain; version=0.0.4; charset=utf-8")

    return app, EmbeddingsIngress


async def _awaited(response: Any) -> Any:
    return await response


def build_app(config: ServeConfig) -> Any:
    """The Serve application for ``config`` (ingress -> autoscaled model deployment, or one fused deployment)."""
    from ray import serve

    from workflows.serve.model_server import make_model_server

    data = config.model_dump(mode="json")
    md, scale = config.model_deployment, config.autoscaling
    model_options = dict(
        ray_actor_options={"num_cpus": md.num_cpus, "num_gpus": md.num_gpus},
        max_ongoing_requests=md.max_ongoing_requests,
        max_queued_requests=md.max_queued_requests,
        autoscaling_config={
            "min_replicas": scale.min_replicas,
            "max_replicas": scale.max_replicas,
            "initial_replicas": scale.initial_replicas,
            "target_ongoing_requests": scale.target_ongoing_requests,
            "upscale_delay_s": scale.upscale_delay_s,
            "downscale_delay_s": scale.downscale_delay_s,
            "metrics_interval_s": scale.metrics_interval_s,
            "look_back_period_s": scale.look_back_period_s,
        },
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
        num_replicas=1,
        ray_actor_options={"num_cpus": ing.num_cpus},
        max_ongoing_requests=ing.max_ongoing_requests,
        max_queued_requests=ing.max_queued_requests,
    )
    return ingress.bind(data, model.bind(data))


def app_builder(args: dict[str, Any]) -> Any:
    """Serve config entry (``import_path: workflows.serve.app:app_builder``).

    ``args`` is either ``{"config": "configs/serve.yaml", "set": ["a.b=c", ...]}`` or the
    ServeConfig fields themselves.
    """
    from embedforge.config import build_config, load_config
    from embedforge.errors import ConfigError

    args = dict(args or {})
    if "config" in args:
        config = load_config(ServeConfig, args.pop("config"), list(args.pop("set", [])))
        if args:
            raise ConfigError(f"app args: unexpected keys {sorted(args)} beside 'config' (put overrides in 'set')")
    else:
        config = build_config(ServeConfig, args)
    return build_app(config)
