"""Request and response bodies of ``/v1/embeddings`` and ``/v1/models`` in OpenAI's schema.

``input`` is what OpenAI, TEI and vLLM accept: a string, a list of strings, a list of token ids
(one input) or a list of lists of token ids (several inputs). Token ids are ids of the served
model's own tokenizer and reach the model exactly as sent (as in vLLM: include the special
tokens, e.g. ``tokenizer(text)["input_ids"]`` for a BERT model); the server checks them against
the vocabulary. Every OpenAI field (``input``, ``model``, ``encoding_format``, ``dimensions``,
``user``) is accepted; any other field is refused with a 400 in OpenAI's error shape.

Extensions (ignored by OpenAI clients): request ``layers`` (early exit after the first k
transformer layers), response ``dimensions``/``layers`` (what was actually used) and each
model's elastic grid in ``/v1/models``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Inputs = list[str] | list[list[int]]  # texts, or token-id sequences


def _is_id(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: str | list[str] | list[int] | list[list[int]] = Field(
        description="A string, a list of strings, a list of token ids (one input), or a list of lists of token ids "
                    "(ids of the served model's tokenizer, special tokens included)")
    model: str | None = Field(None, description="Served model name (GET /v1/models); None: the default model")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="'float': lists of floats; 'base64': little-endian float32 bytes, base64-encoded")
    dimensions: int | None = Field(None, ge=1, description="Matryoshka truncation to this many dims, renormalized")
    user: str | None = Field(None, max_length=512, description="End-user id (logged nowhere; accepted for compat)")
    layers: int | None = Field(None, ge=1, description="Extension: early exit after the first k transformer layers")

    @field_validator("input", mode="before")
    @classmethod
    def _one_kind(cls, value: Any) -> Any:
        """One clear message instead of pydantic's four union branches for mixed or negative input."""
        if not isinstance(value, list) or not value:
            return value
        if all(isinstance(x, str) for x in value):
            return value
        if all(_is_id(x) for x in value):
            rows = [value]
        elif all(isinstance(x, list) for x in value):
            rows = value
            for i, row in enumerate(rows):
                if not row:
                    raise ValueError(f"input[{i}] is an empty token list; every input needs at least one token id")
                if not all(_is_id(x) for x in row):
                    raise ValueError(f"input[{i}] must be a list of integer token ids")
        else:
            raise ValueError("a list input must hold only strings, only token ids (integers), or only lists of "
                             "token ids; do not mix them")
        for i, row in enumerate(rows):
            for j, x in enumerate(row):
                if x < 0:
                    raise ValueError(f"token id {x} (input[{i}][{j}]) is negative; ids start at 0")
        return value

    def inputs(self) -> Inputs:
        """The inputs as a list: texts, or token-id sequences (a flat id list is one input)."""
        if isinstance(self.input, str):
            return [self.input]
        if self.input and _is_id(self.input[0]):
            return [list(self.input)]
        return list(self.input)


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: Usage
    dimensions: int = Field(description="Extension: dims of each returned embedding")
    layers: int = Field(description="Extension: transformer layers that were run")


class ElasticGrid(BaseModel):
    layers: list[int] = Field(description="Trained depths (the model's grid), or [full depth]")
    dimensions: list[int] = Field(description="Trained widths (the model's grid), or [full width]")
    max_layers: int = Field(description="`layers` accepts 1..max_layers")
    max_dimensions: int = Field(description="`dimensions` accepts 1..max_dimensions")
    max_tokens: int = Field(description="Tokens per input the server embeds")
    vocab_size: int = Field(description="Token ids accepted in `input`: 0..vocab_size-1")
    long_inputs: Literal["reject", "truncate"] = Field(description="What happens to inputs over max_tokens")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "embedforge"
    elastic: ElasticGrid
    backend: Literal["sentence-transformers", "vllm"] = "sentence-transformers"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
