"""A sentence-transformers embedder: encode texts, optionally shallower (layers) and narrower (dims).

Plain class; wrap where used: ``ray.remote(num_cpus=1)(Embedder)`` or
``ds.map_batches(Embedder, fn_constructor_kwargs={"config": cfg}, compute=ActorPoolStrategy(...))``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from pydantic import Field

from embedforge.config import StrictModel
from embedforge.elastic import read_grid, truncate_dims, truncated_layers

log = logging.getLogger(__name__)

TEXT_COLUMN = "text"
EMBEDDING_COLUMN = "embedding"


class EmbedderConfig(StrictModel):
    """One embedder replica."""

    model: str = Field("all-minilm-l6-v2", description="Packaged short name, local folder, s3:// folder or hub id")
    batch_size: int = Field(64, ge=1, le=4096, description="Sentences per forward pass")
    normalize: bool = Field(True, description="L2-normalize embeddings")
    prompt: str | None = Field(None, description="Text prefix, e.g. 'query: ' for e5; None: the model's default prompt")
    prompt_name: str | None = Field(None, description="Name of a prompt stored in the model's config (e.g. 'query')")
    max_seq_length: int | None = Field(None, ge=8, description="Truncate inputs to this many tokens; None: the model's")
    device: str = Field("cpu", description="torch device: cpu, cuda, cuda:0")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Inference dtype; auto: bfloat16 on GPUs and CPUs with native bf16, float32 elsewhere "
                            "(embeddings are returned as float32 either way)")
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads; None: one per CPU asked for")
    num_cpus: float = Field(1, ge=0, description="CPUs this embedder asks Ray for")
    num_gpus: float = Field(0, ge=0, description="GPUs this embedder asks Ray for")
    text_column: str = Field(TEXT_COLUMN, description="Input column for map_batches")
    output_column: str = Field(EMBEDDING_COLUMN, description="Output column for map_batches")

    def ray_options(self) -> dict[str, float]:
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}


class Embedder:
    """Loads a SentenceTransformer once; thread-safe encode with elastic layers/dims."""

    def __init__(self, config: EmbedderConfig | dict[str, Any] | None = None):
        if not isinstance(config, EmbedderConfig):
            config = EmbedderConfig.model_validate(config or {})
        self.config = config
        import torch

        from embedforge.models import resolve_model
        from embedforge.st_modules import load_sentence_transformer

        self.threads = config.torch_threads or max(1, int(config.num_cpus or 1))
        torch.set_num_threads(self.threads)
        self.model_path = resolve_model(config.model)
        self.model = load_sentence_transformer(self.model_path, device=config.device)
        from embedforge.hardware import resolve_dtype

        self.dtype = resolve_dtype(config.dtype, config.device)
        if self.dtype != "float32":
            self.model.to(getattr(torch, self.dtype))
        log.info("embedder %s on %s: dtype %s (asked %s)", config.model, config.device, self.dtype, config.dtype)
        if config.max_seq_length:
            self.model.max_seq_length = config.max_seq_length
        self.model.eval()
        self.grid = read_grid(self.model_path)
        self._lock = threading.Lock()
        from embedforge.elastic import num_layers

        self.num_layers = num_layers(self.model)
        self.dimension = self.model.get_embedding_dimension()

    def tokenize_lengths(self, texts: Sequence[str]) -> list[int]:
        tok = self.model.tokenizer
        return [len(ids) for ids in tok(list(texts), add_special_tokens=True, truncation=True,
                                        max_length=self.model.max_seq_length)["input_ids"]]

    def encode(
        self,
        texts: Sequence[str],
        dimensions: int | None = None,
        layers: int | None = None,
        prompt: str | None = None,
    ) -> np.ndarray:
        """Embeddings as float32 [n, dims]; ``layers`` = early exit after the first k layers."""
        import torch

        prompt = prompt if prompt is not None else self.config.prompt
        # torch's thread count is per calling thread (OpenMP): a call from another thread (an
        # executor, a threaded actor) would otherwise run on OMP_NUM_THREADS=1 in Ray workers.
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        with self._lock, torch.inference_mode(), truncated_layers(self.model, layers):
            emb = self.model.encode(
                list(texts),
                batch_size=self.config.batch_size,
                prompt=prompt,
                prompt_name=self.config.prompt_name if prompt is None else None,
                convert_to_numpy=True,
                normalize_embeddings=False,
                show_progress_bar=False,
            )
        return truncate_dims(emb.astype(np.float32), dimensions, normalize=self.config.normalize)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Ray Data map_batches: reads ``text_column``, adds ``output_column``."""
        from embedforge.schemas import require_columns

        require_columns(batch.keys(), [self.config.text_column], "Embedder batch")
        texts = [str(t) for t in batch[self.config.text_column]]
        out = dict(batch)
        out[self.config.output_column] = self.encode(texts)
        return out
