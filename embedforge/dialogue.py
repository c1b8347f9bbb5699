"""Debate messages whose turns mix text and embedding vectors, as agents read and write them.

A message is a list of *segments*: ``str`` (text) or a :class:`Vectors` slot holding a
``[n, hidden]`` array. :func:`render_segments` turns a conversation into the chat-templated token
stream with each vector slot at its exact place; :func:`to_chat` turns a text-only one into chat
messages. Pure (no Ray, no model). Shared by the debate agents (``actors/``) and the debate
protocol (``workflows/debate/protocol.py``), so it lives below both.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class Vectors:
    """A slot of ``[n, hidden]`` vectors (numpy or torch) inside a message, with who sent it."""

    data: Any
    sender: int = -1

    def __len__(self) -> int:
        return int(self.data.shape[0])


Segment = str | Vectors


@dataclass
class Turn:
    role: Literal["system", "user", "assistant"]
    segments: list[Segment]

    def text(self) -> str:
        """The turn as plain text (raises if it still holds vectors)."""
        if any(isinstance(s, Vectors) for s in self.segments):
            raise TypeError("this turn holds vector segments; render it with render_segments")
        return "".join(self.segments)  # type: ignore[arg-type]


@dataclass
class AgentReply:
    """What one agent answered in one round: decoded text and, for CIPHER, the vectors sent."""

    text: str
    completion_tokens: int
    prompt_tokens: int = 0
    vectors: dict[str, Any] = field(default_factory=dict)  # receiver model -> [n, hidden]
    seconds: float = 0.0

    def message(self, receiver: str | None, sender: int) -> Segment:
        """The segment a receiver gets: the vectors averaged over its embedding matrix, else text."""
        if receiver is not None:
            if receiver not in self.vectors:
                raise KeyError(f"agent {sender} sent no vectors for receiver model {receiver!r}")
            return Vectors(self.vectors[receiver], sender)
        return self.text


def to_chat(turns: Sequence[Turn]) -> list[dict[str, str]]:
    """Text-only turns as chat messages for a chat template / vLLM ``chat``."""
    return [{"role": t.role, "content": t.text()} for t in turns]


SLOT = "\x00slot{}\x00"  # a marker no tokenizer or question produces; split on after templating
_SLOT_RE = re.compile("\x00slot(\\d+)\x00")


def render_segments(turns: Sequence[Turn], apply_template: Callable[[list[dict[str, str]]], str]) -> list[Segment]:
    """The chat-templated prompt as segments: template text, with every vector slot in place.

    Each vector slot is replaced by a marker, the chat template renders the conversation, and the
    result is split on the markers: the text between slots is exactly what the template puts there.
    """
    slots: list[Vectors] = []
    messages = []
    for t in turns:
        parts = []
        for s in t.segments:
            if isinstance(s, Vectors):
                parts.append(SLOT.format(len(slots)))
                slots.append(s)
            else:
                if "\x00" in s:
                    raise ValueError("text segments must not contain NUL characters")
                parts.append(s)
        messages.append({"role": t.role, "content": "".join(parts)})
    rendered = apply_template(messages)
    pieces = _SLOT_RE.split(rendered)
    out: list[Segment] = []
    for k, piece in enumerate(pieces):
        if k % 2 == 0:
            if piece:
                out.append(piece)
        else:
            out.append(slots[int(piece)])
    if sum(isinstance(s, Vectors) for s in out) != len(slots):
        raise ValueError("the chat template dropped or duplicated a vector slot")
    return out
