"""DebateConfig (the Serve app) and DebateEvalConfig (the evaluation job). Pure: no Ray, no torch."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from actors.cipher_agent import CipherAgentConfig
from actors.llm_engine import LLMEngineConfig
from embedforge.config import StrictModel, forbid_keys
from embedforge.runtime import RayConfig
from workflows.serve.config import AuthConfig, AutoscalingConfig, DeploymentConfig, HttpConfig, ServeSection

ModeName = Literal["cipher", "natural", "single"]


class AgentSpec(StrictModel):
    """One debate agent: which served model, at which temperature."""

    model: str = Field(description="Served model name (a key of DebateConfig.models)")
    temperature: float = Field(ge=0, le=2, description="Sampling / CIPHER temperature (0: greedy)")


class DebateLimits(StrictModel):
    """Per-request bounds; together they bound a debate's time and memory."""

    max_agents: int = Field(4, ge=1, le=16, description="Most agents per debate (more: 422)")
    max_rounds: int = Field(5, ge=1, le=20, description="Most rounds per debate (more: 422)")
    max_tokens: int = Field(512, ge=1, le=8192, description="Largest max_tokens per response (more: 422)")
    max_question_chars: int = Field(4000, ge=16, description="Longest question, characters (more: 422)")
    max_body_bytes: int = Field(64 * 1024, ge=1024, description="Largest request body in bytes (more: 413)")
    request_timeout_s: float = Field(600, gt=0, description="A debate taking longer answers 504")


class DebateDefaults(StrictModel):
    """What a request that omits fields gets (the paper's 2 agents x 3 rounds, one low-T and one high-T)."""

    rounds: int = Field(3, ge=1, description="Rounds when the request names none")
    max_tokens: int = Field(128, ge=1, description="Tokens per response when the request names none")
    temperatures: list[float] = Field([0.2, 1.0], min_length=1,
                                      description="Agent temperatures (default model) when the request names no agents")


class DebateConfig(StrictModel):
    """Serve multi-agent debate (CIPHER, natural language, single agent) over HTTP with Ray Serve."""

    models: dict[str, str] = Field(
        default_factory=lambda: {"smollm2-135m-instruct": "smollm2-135m-instruct"},
        description="Served model name -> source (packaged short name, local folder, s3:// folder, hub id)")
    modes: list[ModeName] = Field(["cipher", "natural", "single"], min_length=1,
                                  description="Modes served: cipher deploys transformers agents, natural/single vLLM agents")
    defaults: DebateDefaults = DebateDefaults()
    limits: DebateLimits = DebateLimits()
    cipher: CipherAgentConfig = Field(
        CipherAgentConfig(), description="CIPHER agents; model is set per served model (`models`), CPUs and torch "
                                         "threads by agent_deployment")
    engine: LLMEngineConfig = Field(
        LLMEngineConfig(max_model_len=4096),
        description="vLLM engine of natural-language agents; model is set per served model (`models`), CPUs, GPUs "
                    "and threads by agent_deployment")
    autoscaling: AutoscalingConfig = Field(AutoscalingConfig(min_replicas=1, max_replicas=2, target_ongoing_requests=2),
                                           description="Serve autoscaling of every agent deployment")
    agent_deployment: DeploymentConfig = Field(
        DeploymentConfig(num_cpus=1, max_ongoing_requests=4, max_queued_requests=64),
        description="Replica resources of every agent deployment (num_gpus: natural/single vLLM agents only; "
                    "CIPHER agents decode on CPU)")
    ingress: DeploymentConfig = Field(
        DeploymentConfig(num_cpus=0.25, max_ongoing_requests=64, max_queued_requests=256),
        description="The FastAPI debate ingress replica (runs no model: num_gpus and torch_threads do not apply)")
    auth: AuthConfig = AuthConfig()
    http: HttpConfig = HttpConfig()
    serve: ServeSection = ServeSection(app_name="debate")
    ray: RayConfig = RayConfig()
    output: str | None = Field(None, description="URI where the job commits endpoint.json (URL, models); None: none")

    @model_validator(mode="after")
    def _check(self) -> DebateConfig:
        if not self.models:
            raise ValueError("models: serve at least one model, e.g. models: {smollm: smollm2-135m-instruct}")
        if self.defaults.rounds > self.limits.max_rounds or self.defaults.max_tokens > self.limits.max_tokens:
            raise ValueError("defaults.rounds / defaults.max_tokens must be within limits.max_rounds / max_tokens")
        if self.auth.mode == "api_keys" and not (self.auth.api_keys_env or self.auth.api_keys_file):
            raise ValueError("auth: set api_keys_env or api_keys_file, or mode: disabled for local use")
        forbid_keys(self.cipher, ["model"], "cipher", "each served model's source (`models`) is its CIPHER agent's model")
        forbid_keys(self.cipher, ["num_cpus", "torch_threads"], "cipher",
                    "agent_deployment.num_cpus / agent_deployment.torch_threads set them for every agent replica")
        forbid_keys(self.engine, ["model"], "engine", "each served model's source (`models`) is its engine's model")
        forbid_keys(self.engine, ["num_cpus", "num_gpus", "num_threads"], "engine",
                    "agent_deployment.num_cpus / num_gpus / torch_threads set them for every agent replica")
        forbid_keys(self.ingress, ["num_gpus", "torch_threads"], "ingress", "the ingress runs no model")
        if "cipher" in self.modes and self.agent_deployment.num_gpus > 0:
            raise ValueError("agent_deployment.num_gpus: CIPHER agents decode with transformers on CPU, so a GPU "
                             "would sit idle; set it to 0, or serve only modes natural/single (vLLM agents)")
        return self

    @property
    def default_model(self) -> str:
        return next(iter(self.models))


class EvalDataConfig(StrictModel):
    """What the evaluation asks: a GSM8K test subset and Du et al.'s arithmetic problems."""

    gsm8k_limit: int = Field(20, ge=0, description="First N GSM8K test problems (0: none); evaluation only")
    arithmetic_count: int = Field(20, ge=0, description="Arithmetic problems a+b*c+d-e*f (0: none)")
    arithmetic_seed: int = Field(0, description="Seed of the arithmetic generator")
    arithmetic_max: int = Field(30, ge=1, description="Operands are drawn from [0, arithmetic_max)")


class DebateEvalConfig(StrictModel):
    """Evaluate CIPHER vs natural-language debate vs a single agent (same model, same token budget)."""

    model: str = Field("smollm2-135m-instruct", description="Model of every agent (short name, folder, s3://)")
    modes: list[ModeName] = Field(["cipher", "natural", "single"], min_length=1, description="Modes to compare")
    temperatures: list[float] = Field([0.2, 1.0], min_length=2,
                                      description="Debate agents' temperatures; single uses the lowest")
    rounds: int = Field(3, ge=1, le=10, description="Debate rounds (single: 1)")
    max_tokens: int = Field(128, ge=1, le=2048, description="Tokens per response (the same budget in every mode)")
    batch_size: int = Field(20, ge=1, description="Questions decoded together by each agent")
    data: EvalDataConfig = EvalDataConfig()
    cipher: CipherAgentConfig = Field(CipherAgentConfig(num_cpus=1), description="CIPHER agent (its model is `model`)")
    engine: LLMEngineConfig = Field(LLMEngineConfig(max_model_len=4096), description="vLLM engine (its model is `model`)")
    timeout_s: float = Field(3600, gt=0, description="Give up on one batch of one mode after this long")
    ray: RayConfig = RayConfig()
    output: str = Field("outputs/debate_eval", description="URI where results, report and plot are committed")

    @model_validator(mode="after")
    def _check(self) -> DebateEvalConfig:
        if any(t < 0 or t > 2 for t in self.temperatures):
            raise ValueError(f"temperatures must be in [0, 2], got {self.temperatures}")
        if self.data.gsm8k_limit + self.data.arithmetic_count == 0:
            raise ValueError("data: set gsm8k_limit or arithmetic_count above 0")
        forbid_keys(self.cipher, ["model"], "cipher", "`model` is every agent's model")
        forbid_keys(self.engine, ["model"], "engine", "`model` is every agent's model")
        return self
