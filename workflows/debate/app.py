"""The debate application on Ray Serve: ``POST /v1/debate``.

``build_debate_app(config)`` returns a Serve application: a FastAPI ingress deployment (API keys,
body-size limit, validation, error bodies -- the same rules as the embeddings service, from
:mod:`workflows.serve.auth` and :mod:`workflows.serve.limits`) in front of one autoscaled agent
deployment per (engine, served model): ``cipher-<model>`` (transformers, :class:`CipherAgent`) and
``text-<model>`` (vLLM, :class:`TextAgent`). Each round the ingress calls every agent's deployment
concurrently through DeploymentHandles, then builds the next round's conversations with
:mod:`workflows.debate.protocol`.

Request::

    {"question": "...", "mode": "cipher" | "natural" | "single",
     "agents": [{"model": "smollm2-135m-instruct", "temperature": 0.2}, ...],
     "rounds": 3, "max_tokens": 128}

Response: ``final_answer`` (CIPHER: the lowest-temperature agent's; natural: majority vote) and
``vote`` (the last round's answer counts, whether the top count was tied),
``rounds[r].messages[i]`` (each agent's decoded message, its parsed answer, tokens, seconds),
``usage`` and ``timings``. Routes ``GET /v1/models`` and ``GET /healthz`` need no key.

(No ``from __future__ import annotations`` here: FastAPI reads the route annotations at decoration.)
"""

import asyncio
import logging
import re
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from workflows.debate.config import DebateConfig
from workflows.serve.limits import RequestError, install_error_handlers

log = logging.getLogger(__name__)

AUTH_SLOT = "debate"  # this app's API-key checker in workflows.serve.auth


class AgentRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(None, description="Served model name; None: the default model")
    temperature: float = Field(ge=0, le=2, description="Temperature of this agent (0: greedy)")


class DebateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    question: str = Field(min_length=1, description="The problem to debate")
    mode: Literal["cipher", "natural", "single"] = Field("cipher", description="How agents talk (single: one agent)")
    agents: list[AgentRequest] | None = Field(None, min_length=1, description="Agents; None: the server's defaults")
    rounds: int | None = Field(None, ge=1, description="Debate rounds; None: the server's default (single: 1)")
    max_tokens: int | None = Field(None, ge=1, description="Tokens per response; None: the server's default")


def deployment_name(kind: str, model: str) -> str:
    return f"{kind}-{re.sub(r'[^A-Za-z0-9_.-]', '_', model)}"


def assigned_gpus() -> list:
    """GPU ids Ray assigned to the current actor or replica (empty outside Ray or without GPUs)."""
    try:
        import ray

        if not ray.is_initialized():
            return []
        return list(ray.get_runtime_context().get_accelerator_ids().get("GPU", []))
    except Exception:  # noqa: BLE001 - outside a worker the runtime context has no accelerators
        return []


class DebateAgentServer:
    """One agent deployment: a CipherAgent (``kind='cipher'``) or a TextAgent (``kind='text'``)."""

    def __init__(self, kind: str, source: str, config_data: dict[str, Any]):
        config = DebateConfig.model_validate(config_data)
        self.kind = kind
        dep = config.agent_deployment
        # GPUs: the configured num_gpus, or those Ray gave this replica (a Serve config / RayService
        # `deployments: ray_actor_options: {num_gpus: 1}` override changes the replica, not the YAML)
        num_gpus = dep.num_gpus or float(len(assigned_gpus()))
        if kind == "cipher":
            from actors.cipher_agent import CipherAgent

            self.agent: Any = CipherAgent(config.cipher.model_copy(update={
                "model": source, "num_cpus": dep.num_cpus, "num_gpus": num_gpus, "torch_threads": dep.torch_threads}))
        else:
            from actors.text_agent import TextAgent, TextAgentConfig

            self.agent = TextAgent(TextAgentConfig(engine=config.engine.model_copy(update={
                "model": source, "num_cpus": dep.num_cpus, "num_gpus": num_gpus, "num_threads": dep.torch_threads})))
        # vLLM's LLM object is not thread-safe; CIPHER's torch forward passes are.
        self._lock = asyncio.Lock() if kind == "text" else None

    async def respond(self, conversations: list, temperature: float, max_tokens: int,
                      receivers: dict[str, str] | None = None) -> list:
        if self._lock is None:
            return await asyncio.to_thread(self.agent.respond, conversations, temperature, max_tokens, receivers)
        async with self._lock:
            return await asyncio.to_thread(self.agent.respond, conversations, temperature, max_tokens, receivers)

    def check_health(self) -> None:
        """Serve's health check: alive while the event loop answers."""


def _user_error(err: BaseException) -> RequestError | None:
    from embedforge.errors import ConfigError, InputError
    from embedforge.runtime import unwrap_error

    cause = unwrap_error(err)
    if isinstance(cause, RequestError):
        return RequestError(cause.message, cause.status_code, cause.param, cause.code)
    if isinstance(cause, (ConfigError, InputError)):
        return RequestError(str(cause), 400, "agents", type(cause).__name__)
    return None


def make_fastapi_app(config: DebateConfig) -> tuple[Any, type]:
    """The FastAPI app and the ingress class whose methods serve its routes."""
    from fastapi import Depends, FastAPI
    from ray import serve

    from workflows.debate import protocol as P
    from workflows.serve.auth import ApiKeyAuth, replica_bearer_dependency, set_replica_auth
    from workflows.serve.limits import BodySizeLimitMiddleware

    app = FastAPI(title="embedforge debate", version="1", description=__doc__)
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=config.limits.max_body_bytes)
    require_key = replica_bearer_dependency(AUTH_SLOT)

    install_error_handlers(app, validation_status=422)

    @serve.ingress(app)
    class DebateIngress:
        def __init__(self, config_data: dict[str, Any], handles: dict[str, Any]):
            self.config = DebateConfig.model_validate(config_data)
            a = self.config.auth
            set_replica_auth(AUTH_SLOT, ApiKeyAuth.from_settings(a.mode, a.api_keys_env, a.api_keys_file))
            self.handles = handles

        def _plan(self, body: DebateRequest) -> tuple[list[tuple[str, float]], int, int]:
            cfg, lim = self.config, self.config.limits
            if body.mode not in cfg.modes:
                raise RequestError(f"mode {body.mode!r} is not served; served: {', '.join(cfg.modes)}", param="mode")
            if len(body.question) > lim.max_question_chars:
                raise RequestError(f"question has {len(body.question)} characters; at most {lim.max_question_chars}",
                                   param="question", code="question_too_long")
            d = cfg.defaults
            temps = {"cipher": d.temperatures, "natural": d.natural_temperatures}.get(body.mode,
                                                                                      [min(d.temperatures)])
            agents = [(a.model or cfg.default_model, a.temperature) for a in body.agents] if body.agents else \
                [(cfg.default_model, t) for t in temps]
            for i, (model, _) in enumerate(agents):
                if model not in cfg.models:
                    raise RequestError(f"agents[{i}].model {model!r} is not served; served: {', '.join(cfg.models)}",
                                       status_code=404, param=f"agents.{i}.model", code="model_not_found")
            rounds = body.rounds or (1 if body.mode == "single" else cfg.defaults.rounds)
            max_tokens = body.max_tokens or cfg.defaults.max_tokens
            for name, value, most in (("agents", len(agents), lim.max_agents), ("rounds", rounds, lim.max_rounds),
                                      ("max_tokens", max_tokens, lim.max_tokens)):
                if value > most:
                    raise RequestError(f"{name}={value} is above this server's limit {most}", param=name,
                                       code="above_limit")
            try:
                P.check_debate(body.mode, len(agents), rounds)
            except ValueError as e:
                raise RequestError(str(e), param="agents" if "agent" in str(e) else "rounds") from None
            return agents, rounds, max_tokens

        async def _round(self, kind: str, convs: list, agents: list, max_tokens: int, receivers: dict,
                         deadline: float) -> list:
            calls = [self.handles[deployment_name(kind, m)].respond.remote([c], t, max_tokens, receivers)
                     for c, (m, t) in zip(convs, agents, strict=True)]
            try:
                return await asyncio.wait_for(asyncio.gather(*calls), max(1.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise RequestError("the debate did not finish within the server's request timeout; lower rounds or "
                                   "max_tokens", status_code=504, code="timeout") from None
            except Exception as e:  # noqa: BLE001 - Ray wraps agent errors; answer 4xx for the user's ones
                user = _user_error(e)
                if user is not None:
                    raise user from None
                raise

        @app.post("/v1/debate", dependencies=[Depends(require_key)])
        async def debate(self, body: DebateRequest) -> Any:
            started = time.monotonic()
            deadline = started + self.config.limits.request_timeout_s
            agents, rounds, max_tokens = self._plan(body)
            kind = "cipher" if body.mode == "cipher" else "text"
            models = [m for m, _ in agents]
            receivers = {m: self.config.models[m] for m in models} if kind == "cipher" else None
            d = self.config.defaults
            history: list = []  # [round][agent][question=0]
            transcript, round_s = [], []
            for r in range(rounds):
                t0 = time.monotonic()
                convs = P.next_round([body.question], body.mode, models, history, prompts=d.prompts, memory=d.history)
                replies = await self._round(kind, [c[0] for c in convs], agents, max_tokens, receivers, deadline)
                history.append(replies)
                round_s.append(round(time.monotonic() - t0, 4))
                transcript.append({"round": r, "messages": [
                    {"agent": i, "model": m, "temperature": t, "text": rep[0].text,
                     "answer": P.extract_answer(rep[0].text), "completion_tokens": rep[0].completion_tokens,
                     "prompt_tokens": rep[0].prompt_tokens, "seconds": round(rep[0].seconds, 4)}
                    for i, ((m, t), rep) in enumerate(zip(agents, replies, strict=True))]})
            answers = [msg["answer"] for msg in transcript[-1]["messages"]]
            decision = P.decide(body.mode, [t for _, t in agents], answers, cipher_final=d.cipher_final,
                                tie_break=d.tie_break)
            prompt = sum(msg["prompt_tokens"] for rnd in transcript for msg in rnd["messages"])
            completion = sum(msg["completion_tokens"] for rnd in transcript for msg in rnd["messages"])
            return {
                "id": f"debate-{uuid.uuid4().hex[:16]}", "object": "debate", "mode": body.mode,
                "final_answer": decision.answer,
                "vote": {"counts": decision.counts, "tie": decision.tie, "tied": decision.tied},
                "agents": [{"model": m, "temperature": t} for m, t in agents],
                "rounds": transcript,
                "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                          "total_tokens": prompt + completion},
                "timings": {"total_s": round(time.monotonic() - started, 4), "rounds_s": round_s},
            }

        @app.get("/v1/models")
        async def models(self) -> Any:
            return {"object": "list", "modes": list(self.config.modes),
                    "data": [{"id": name, "object": "model"} for name in self.config.models]}

        @app.get("/healthz")
        async def healthz(self) -> Any:
            return {"status": "ok"}

    return app, DebateIngress


def build_debate_app(config: DebateConfig) -> Any:
    """The Serve application for ``config``: ingress -> one autoscaled deployment per (engine, model)."""
    from ray import serve

    # only the keys given: the replicas validate it again, and keys a DebateConfig sets itself
    # (cipher.model, ...) are refused when given
    data = config.model_dump(mode="json", exclude_unset=True)
    dep, scale = config.agent_deployment, config.autoscaling
    kinds = (["cipher"] if "cipher" in config.modes else []) + \
        (["text"] if {"natural", "single"} & set(config.modes) else [])
    handles = {}
    for kind in kinds:
        for name, source in config.models.items():
            dname = deployment_name(kind, name)
            handles[dname] = serve.deployment(
                DebateAgentServer, name=dname,
                ray_actor_options={"num_cpus": dep.num_cpus, "num_gpus": dep.num_gpus},
                max_ongoing_requests=dep.max_ongoing_requests, max_queued_requests=dep.max_queued_requests,
                autoscaling_config=scale.model_dump(),
            ).bind(kind, source, data)
    _, ingress_cls = make_fastapi_app(config)
    ing = config.ingress
    ingress = serve.deployment(
        ingress_cls, name="DebateIngress", num_replicas=1, ray_actor_options={"num_cpus": ing.num_cpus},
        max_ongoing_requests=ing.max_ongoing_requests, max_queued_requests=ing.max_queued_requests)
    if config.auth.mode == "disabled":
        log.warning("AUTH DISABLED for application %r", config.serve.app_name)
    return ingress.bind(data, handles)


def app_builder(args: dict[str, Any]) -> Any:
    """Serve config entry (``import_path: workflows.debate.app:app_builder``), as in
    ``serve run configs/serve_apps.yaml`` or a RayService's ``serveConfigV2``.

    ``args`` is ``{"config": "configs/debate.yaml", "set": ["a.b=c", ...]}`` or the DebateConfig
    fields themselves. The route prefix comes from the Serve config, not from ``http``.
    """
    from embedforge.config import config_from_app_args

    return build_debate_app(config_from_app_args(DebateConfig, args))


def run_debate_service(config: DebateConfig) -> dict[str, Any]:
    """Start Serve, deploy the debate app, wait until healthy, commit endpoint.json (when ``output``)."""
    from ray import serve

    from embedforge import storage
    from embedforge.runtime import check_resources, init_ray
    from workflows.serve.endpoint import endpoint_url, wait_healthy

    init_ray(config.ray)
    check_resources(config.agent_deployment.num_cpus, config.agent_deployment.num_gpus, "debate agent deployment",
                    config.ray.fail_fast_on_missing_gpus)
    serve.start(http_options={"host": config.http.host, "port": config.http.port})
    serve.run(build_debate_app(config), name=config.serve.app_name, route_prefix=config.http.route_prefix,
              blocking=False)
    url = endpoint_url(config)
    wait_healthy(url, config.serve.startup_timeout_s)
    summary: dict[str, Any] = {"url": url, "debate": f"{url}/v1/debate", "models": list(config.models),
                               "modes": list(config.modes), "auth": config.auth.mode, "output": config.output}
    if config.output:
        storage.write_json(storage.join(config.output, "endpoint.json"), summary)
        summary["manifest"] = storage.commit(config.output, {"kind": "debate_service", "files": ["endpoint.json"],
                                                             "url": url})
    log.info("debate server ready at %s", url)
    return summary
