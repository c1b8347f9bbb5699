"""Prompt building for LLM-feedback rewards and the LLM cross-encoder (pure: no model, no Ray).

A prompt is a user message; :func:`render` turns it into the text the engine scores, either
through the model's chat template (an instruct model answers in the assistant turn) or as plain
text followed by a prefix (``"\\nAnswer:"`` style prompts). The continuation that is scored
(the answer, or a score digit) is never part of the prompt: the engine tokenizes it on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

ChatRenderer = Callable[[Sequence[dict[str, str]]], str]


def feedback_message(template: str, query: str, passage: str) -> str:
    """The user message asking the LLM to answer ``query`` from ``passage``."""
    return template.format(query=query.strip(), passage=passage.strip())


def cross_encoder_message(template: str, sentence1: str, sentence2: str) -> str:
    """The user message asking the LLM to rate the similarity of two sentences."""
    return template.format(sentence1=sentence1.strip(), sentence2=sentence2.strip())


def render(message: str, chat: ChatRenderer | None, plain_suffix: str) -> str:
    """Text to score: the chat-templated user turn (ready for the assistant), or message + suffix."""
    if chat is not None:
        return chat([{"role": "user", "content": message}])
    return message + plain_suffix


def answer_continuation(answer: str, chat: bool, answer_prefix: str) -> str:
    """The scored continuation: the answer as the assistant's first words, or after ``answer_prefix``."""
    answer = answer.strip()
    return answer if chat else answer_prefix + answer


def score_strings(max_score: int, prefix: str) -> list[str]:
    """The score continuations ``prefix + '0'`` .. ``prefix + str(max_score)``."""
    return [f"{prefix}{i}" for i in range(max_score + 1)]
