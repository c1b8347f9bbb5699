"""A translation worker for Ray Data: prompts in, greedy completions out, one vLLM engine per replica.

Plain class; the synthesize pipeline wraps it as
``ds.map_batches(Translator, fn_constructor_kwargs={"config": cfg}, compute=ActorPoolStrategy(size=n),
num_cpus=..., num_gpus=...)``. It knows nothing about languages or prompt formats: the batch
brings ready prompts (column ``prompt``) and a per-row ``max_tokens``; it returns the same
columns as ``ray.data.llm``'s vLLM stage (``generated_text``, ``num_generated_tokens``), so the
two backends are interchangeable downstream. Decoding is greedy and stops at ``stop``.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import Field

from actors.llm_engine import LLMEngine, LLMEngineConfig
from embedforge.config import StrictModel
from embedforge.schemas import require_columns

log = logging.getLogger(__name__)

PROMPT, MAX_TOKENS = "prompt", "max_tokens"
GENERATED_TEXT, NUM_GENERATED_TOKENS = "generated_text", "num_generated_tokens"


class TranslatorConfig(StrictModel):
    """One translation replica: its engine and where decoding stops."""

    engine: LLMEngineConfig = Field(default_factory=LLMEngineConfig, description="The vLLM engine")
    stop: list[str] = Field(default_factory=lambda: ["\n"], description="Stop strings (first line break)")


class Translator:
    """Greedy generation for a batch of prompts with per-row max_tokens."""

    def __init__(self, config: TranslatorConfig | dict[str, Any] | None = None):
        if not isinstance(config, TranslatorConfig):
            config = TranslatorConfig.model_validate(config or {})
        self.config = config
        self.engine = LLMEngine(config.engine)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        require_columns(batch.keys(), [PROMPT, MAX_TOKENS], "Translator batch")
        prompts = [str(p) for p in batch[PROMPT]]
        out = dict(batch)
        if not prompts:
            out[GENERATED_TEXT], out[NUM_GENERATED_TOKENS] = [], []
            return out
        results = self.engine.generate(
            prompts, max_tokens=[int(m) for m in batch[MAX_TOKENS]], temperature=0.0, stop=self.config.stop
        )
        out[GENERATED_TEXT] = [r["text"] for r in results]
        out[NUM_GENERATED_TOKENS] = [len(r["token_ids"]) for r in results]
        return out
