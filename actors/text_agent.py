"""TextAgent: a natural-language debate agent on vLLM (``actors.llm_engine.LLMEngine`` chat).

The baseline of Du et al. (2023): each round the agent reads the other agents' previous answers
as text and writes a new answer by ordinary sampling at its own temperature. Conversations come
from :func:`workflows.debate.protocol.round_conversation` with text-only segments.

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

    def respond(
        self,
        conversations: Sequence[Sequence[Any]],
        temperature: float,
        max_tokens: int,
        receivers: dict[str, str] | None = None,
    ) -> list[Any]:
        """One debate round for a batch of conversations -> ``AgentReply`` each (``receivers`` unused)."""
        from workflows.debate.protocol import AgentReply, to_chat

        chats = [to_chat(turns) for turns in conversations]
        start = time.perf_counter()
        outs = self.engine.chat(chats, max_tokens=max_tokens, temperature=temperature)
        seconds = time.perf_counter() - start
        return [AgentReply(text=o["text"], completion_tokens=len(o["token_ids"]),
                           prompt_tokens=int(o.get("num_prompt_tokens", 0)), seconds=seconds) for o in outs]
