"""Request and response bodies of ``/v1/embeddings`` and ``/v1/models`` in OpenAI's schema.

Extensions (ignored by OpenAI clients): request ``layers`` (early exit after the first k
transformer layers), response ``dimensions``/``layers`` (what was actually used) and each
model's elastic grid in ``/v1/models``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: str | list[str] = Field(description="A string or a list of strings to embed (token arrays unsupported)")
    model: str | None = Field(None, description="Served model name (GET /v1/models); None: the default model")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="'float': lists of floats; 'base64': little-endian float32 bytes, base64-encoded")
    dimensions: int | None = Field(None, ge=1, description="Matryoshka truncation to this many dims, renormalized")
    user: str | None = Field(None, max_length=512, description="End-user id (logged nowhere; accepted for compat)")
    layers: int | None = Field(None, ge=1, description="Extension: early exit after the first k transformer layers")

    @field_validator("input", mode="before")
    @classmethod
    def _no_token_arrays(cls, value: Any) -> Any:
        if isinstance(value, list) and value and (
            isinstance(value[0], int) or (isinstance(value[0], list) and value[0] and isinstance(value[0][0], int))
        ):
            raise ValueError("token-id arrays are not supported; send the text as a string or a list of strings")
        return value

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


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


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "embedforge"
    elastic: ElasticGrid


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
