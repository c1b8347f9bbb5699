"""TextAgent: a natural-language debate agent on vLLM (``actors.llm_engine.LLMEngine`` chat).

The baseline of Du et al. (2023): each round the agent reads the other agents' previous answers
as text and writes a new answer by ordinary sampling at its own temperature. Conversations come
from :func:`workflows.debate.protocol.round_conversation` with text-only segments.

Sampled turns (temperature > 0) are submitted in groups whose prompts fit in one vLLM scheduler
step (``max_num_batched_tokens``). Why: ``LLMEngine`` gives every sampled request its own seed,
and vLLM on CPU cannot rewind a per-request generator when it splits a prompt over several steps
(chunked prefill): ``RuntimeError: CPU Generator does not use offset``. Round-2 debate prompts of
a 20-question batch (~7,000 tokens) hit that; groups that prefill in one step never do.

Example::

    agent = TextAgent(TextAgentConfig(engine=LLMEngineConfig(model="smollm2-135m-instruct")))
    reply = agent.respond([round_conversation("What is 2+3*4?", 0, None)], 0.2, 64)[0]
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from pydantic import Field

from actors.llm_engine import LLMEngine, LLMEngineConfig
from embedforge.config import StrictModel
from embedforge.errors import InputError

log = logging.getLogger(__name__)


class TextAgentConfig(StrictModel):
    """One vLLM engine answering debate turns in text."""

    engine: LLMEngineConfig = Field(LLMEngineConfig(), description="The vLLM engine of this agent")


class TextAgent:
    """Natural-language debate turns on vLLM; one engine serves any temperature."""

    def __init__(self, config: TextAgentConfig | dict[str, Any] | None = None, engine: LLMEngine | None = None):
        if not isinstance(config, TextAgentConfig):
            config = TextAgentConfig.model_validate(config or {})
        self.config = config
        self.engine = engine or LLMEngine(config.engine)
        self.model_path = self.engine.model_path

    def step_token_budget(self) -> int:
        """Prompt tokens vLLM prefills in one scheduler step (``max_num_batched_tokens``)."""
        return int(self.engine.llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens)

    def _groups(self, chats: list[list[dict[str, str]]], temperature: float) -> list[list[list[dict[str, str]]]]:
        """Greedy: one group. Sampled: consecutive groups whose prompts prefill in one step (module docstring)."""
        if temperature == 0 or not chats:
            return [chats]
        budget = self.step_token_budget()
        lengths = self.engine.count_tokens([self.engine.apply_chat_template(c) for c in chats])
        groups: list[list[list[dict[str, str]]]] = [[]]
        used = 0
        for i, (chat, n) in enumerate(zip(chats, lengths, strict=True)):
            if n > budget:
                raise InputError(f"conversation {i} has {n} prompt tokens, above the engine's {budget} tokens per "
                                 "step; sampled vLLM turns on CPU must prefill in one step: lower rounds or max_tokens")
            if used + n > budget and groups[-1]:
                groups.append([])
                used = 0
            groups[-1].append(chat)
            used += n
        return groups

    def respond(
        self,
        conversations: Sequence[Sequence[Any]],
        temperature: float,
        max_tokens: int,
        receivers: dict[str, str] | None = None,
    ) -> list[Any]:
        """One debate round for a batch of conversations -> ``AgentReply`` each (``receivers`` unused)."""
        from embedforge.dialogue import AgentReply, to_chat

        chats = [to_chat(turns) for turns in conversations]
        start = time.perf_counter()
        outs: list[dict[str, Any]] = []
        for group in self._groups(chats, temperature):
            outs += self.engine.chat(group, max_tokens=max_tokens, temperature=temperature)
        seconds = time.perf_counter() - start
        return [AgentReply(text=o["text"], completion_tokens=len(o["token_ids"]),
                           prompt_tokens=int(o.get("num_prompt_tokens", 0)), seconds=seconds) for o in outs]
