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
    """What a request that omits fields gets: CIPHER as Pham et al. (2 agents, one low-T, one high-T),
    natural-language debate as Du et al. (3 agents, full per-agent history, majority vote)."""

    rounds: int = Field(3, ge=1, description="Rounds when the request names none")
    max_tokens: int = Field(128, ge=1, description="Tokens per response when the request names none")
    temperatures: list[float] = Field([0.2, 1.0], min_length=1,
                                      description="CIPHER agents' temperatures (default model) when the request names "
                                                  "no agents; single mode uses the lowest")
    natural_temperatures: list[float] = Field(
        [1.0, 1.0, 1.0], min_length=1,
        description="Natural-language agents' temperatures when the request names no agents (Du et al.: 3 agents)")
    history: Literal["full", "last"] = Field(
        "full", description="full: each agent keeps its whole history (Du et al.); last: only the previous round")
    prompts: str = Field("du_gsm", description="Prompt set (workflows.debate.protocol.PROMPTS): du_gsm, "
                                               "du_arithmetic or hash")
    cipher_final: Literal["lowest_temperature", "majority"] = Field(
        "lowest_temperature", description="CIPHER's final answer: lowest-temperature agent's (Pham et al.) or majority")
    tie_break: Literal["first", "lowest_temperature", "none"] = Field(
        "first", description="Majority-vote ties: the first agent's answer (Du et al.), the lowest temperature's, none")

    @model_validator(mode="after")
    def _check_prompts(self) -> DebateDefaults:
        from workflows.debate.protocol import PROMPTS

        if self.prompts not in PROMPTS:
            raise ValueError(f"defaults.prompts: unknown prompt set {self.prompts!r}; use one of {', '.join(PROMPTS)}")
        return self


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
        description="Replica resources of every agent deployment (num_gpus > 0: vLLM agents and CIPHER agents "
                    "both run on the GPU)")
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
        return self

    @property
    def default_model(self) -> str:
        return next(iter(self.models))


ARITHMETIC_FORMS = {
    # Du et al.'s task (math/gen_math.py): six operands in [0, 30)
    "du": "{}+{}*{}+{}-{}*{}",
    "three": "{}+{}*{}",
    "four": "{}+{}*{}-{}",
    "sum2": "{}+{}",
    "sum3": "{}+{}+{}",
    "product2": "{}*{}",
    "sum_diff": "{}+{}-{}",
}


class EvalDataConfig(StrictModel):
    """What the evaluation asks: GSM8K problems and Du et al.'s arithmetic, from a dev pool or the final pool.

    ``split: dev`` draws the dev pool (GSM8K *train* problems, arithmetic from ``dev_seed``): choose
    the regime there. ``split: test`` draws the final pool (GSM8K test, arithmetic from
    ``arithmetic_seed`` with every expression of the dev pool left out, so the two never share an item).
    """

    split: Literal["dev", "test"] = Field("test", description="dev: the pool to choose on; test: final numbers only")
    gsm8k_limit: int = Field(20, ge=0, description="First N GSM8K problems of the split (train for dev) (0: none)")
    gsm8k_prompts: str = Field("du_gsm", description="Prompt set of GSM8K problems (workflows.debate.protocol.PROMPTS)")
    arithmetic_count: int = Field(20, ge=0, description="Arithmetic problems in the final pool (0: none)")
    arithmetic_seed: int = Field(0, description="Seed of the final pool's arithmetic generator")
    arithmetic_max: int = Field(30, ge=1, description="Operands are drawn from [0, arithmetic_max)")
    arithmetic_form: str = Field(
        "du", description="Expression: a name of ARITHMETIC_FORMS (du, three, four, sum2, sum3, product2, sum_diff) "
                          "or a pattern like '{}+{}*{}' (operand slots joined by + - *)")
    arithmetic_prompts: str = Field("du_arithmetic", description="Prompt set of arithmetic problems")
    dev_seed: int = Field(1000, description="Seed of the dev pool's arithmetic generator")
    dev_count: int = Field(100, ge=0, description="Arithmetic problems in the dev pool")

    @model_validator(mode="after")
    def _check(self) -> EvalDataConfig:
        import re

        from workflows.debate.protocol import PROMPTS

        for name in ("gsm8k_prompts", "arithmetic_prompts"):
            if getattr(self, name) not in PROMPTS:
                raise ValueError(f"data.{name}: unknown prompt set {getattr(self, name)!r}; use one of "
                                 f"{', '.join(PROMPTS)}")
        form = self.expression_form
        if not re.fullmatch(r"\{\}(?:[+\-*]\{\})*", form):
            raise ValueError(f"data.arithmetic_form {self.arithmetic_form!r}: use one of {', '.join(ARITHMETIC_FORMS)} "
                             "or slots '{}' joined by + - * (e.g. '{}+{}*{}')")
        return self

    @property
    def expression_form(self) -> str:
        return ARITHMETIC_FORMS.get(self.arithmetic_form, self.arithmetic_form)


class DebateEvalConfig(StrictModel):
    """Evaluate CIPHER vs natural-language debate vs a single agent (same model, same token budget per response)."""

    model: str = Field("smollm2-135m-instruct", description="Model of every agent (short name, folder, s3://)")
    modes: list[ModeName] = Field(["cipher", "natural", "single"], min_length=1, description="Modes to compare")
    temperatures: list[float] = Field([0.2, 1.0], min_length=2,
                                      description="CIPHER agents' temperatures (Pham et al.: one low, one high)")
    natural_temperatures: list[float] = Field(
        [1.0, 1.0, 1.0], min_length=2,
        description="Natural-language debate agents' temperatures (Du et al.: 3 agents, the API's default T=1)")
    single_temperature: float | None = Field(None, ge=0, le=2,
                                             description="Single agent's temperature; None: the lowest CIPHER one")
    rounds: int = Field(2, ge=1, le=10, description="Debate rounds of both debates (single: 1)")
    history: Literal["full", "last"] = Field(
        "full", description="full: each agent keeps its whole history (Du et al.); last: only the previous round")
    cipher_final: Literal["lowest_temperature", "majority"] = Field(
        "lowest_temperature", description="CIPHER's final answer: the lowest-temperature agent's (Pham et al.) or "
                                          "the majority vote")
    tie_break: Literal["first", "lowest_temperature", "none"] = Field(
        "first", description="Majority-vote ties: first agent's answer (Du et al.), lowest temperature's, or none")
    max_tokens: int = Field(128, ge=1, le=2048, description="Tokens per response (the same budget in every mode)")
    batch_size: int = Field(20, ge=1, description="Questions decoded together by each agent")
    max_seconds: float | None = Field(
        None, gt=0, description="Start no new batch after this many seconds; rerun the same command to continue "
                                "(finished batches are kept under output/parts)")
    bootstrap: int = Field(10000, ge=100, description="Paired-bootstrap resamples of accuracy differences")
    data: EvalDataConfig = EvalDataConfig()
    cipher: CipherAgentConfig = Field(CipherAgentConfig(num_cpus=1), description="CIPHER agent (its model is `model`)")
    engine: LLMEngineConfig = Field(LLMEngineConfig(max_model_len=4096), description="vLLM engine (its model is `model`)")
    timeout_s: float = Field(3600, gt=0, description="Give up on one batch of one mode after this long")
    ray: RayConfig = RayConfig()
    output: str = Field("outputs/debate_eval", description="URI where results, report and plot are committed")

    @model_validator(mode="after")
    def _check(self) -> DebateEvalConfig:
        for name in ("temperatures", "natural_temperatures"):
            if any(t < 0 or t > 2 for t in getattr(self, name)):
                raise ValueError(f"{name} must be in [0, 2], got {getattr(self, name)}")
        d = self.data
        if (d.dev_count if d.split == "dev" else d.arithmetic_count) + d.gsm8k_limit == 0:
            raise ValueError("data: set gsm8k_limit, or arithmetic_count (split test) / dev_count (split dev), above 0")
        forbid_keys(self.cipher, ["model"], "cipher", "`model` is every agent's model")
        forbid_keys(self.engine, ["model"], "engine", "`model` is every agent's model")
        return self

    def mode_plan(self, mode: str) -> tuple[list[float], int]:
        """(agent temperatures, rounds) of one mode."""
        if mode == "single":
            t = self.single_temperature if self.single_temperature is not None else min(self.temperatures)
            return [t], 1
        return (list(self.temperatures) if mode == "cipher" else list(self.natural_temperatures)), self.rounds
