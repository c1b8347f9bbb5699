"""The multi-agent debate protocol, free of Ray and of models.

A debate runs ``rounds`` rounds over ``n`` agents. In round 0 every agent answers the question
alone; in round ``r > 0`` agent ``i`` sees its own previous answer (as its assistant turn) and the
previous answers of the other agents, spliced into a user turn (Du et al. 2023; Pham et al. 2024)::

    user:      <question prompt>
    assistant: <own answer of round r-1>
    user:      These are the solutions to the problem from other agents:
               One agent solution: <answer of agent j, round r-1> ...
               Using the solutions from other agents as additional information, can you give an
               updated response? ... End with '#### <number>'.

Only the previous round is carried, so prompts stay bounded for any number of rounds.

A message is a list of *segments*: ``str`` (text) or a :class:`Vectors` slot holding a
``[n, hidden]`` array. Natural-language debate fills the answer slots with text, CIPHER with the
sender's expected-embedding sequence; :func:`render_segments` turns a conversation into the
chat-templated token stream with each vector slot at its exact place, so "vectors between the
embeddings of the text prompt" is explicit and testable.

Answers follow the GSM8K ``#### <number>`` convention; :func:`extract_answer` also accepts
``The answer is 42``, ``\\boxed{42}``, ``$1,234``, ``= 42`` and falls back to the last number.
Final answer: CIPHER takes the lowest-temperature agent's answer (the paper's setup), natural
debate the majority vote, a single agent its own answer.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Literal

# The message types are shared with the agents (actors/), so they live in embedforge; re-exported here.
from embedforge.dialogue import AgentReply, Segment, Turn, Vectors, render_segments, to_chat

__all__ = ["AgentReply", "Segment", "Turn", "Vectors", "render_segments", "to_chat", "round_conversation",
           "extract_answer", "answers_equal", "majority_vote", "final_answer", "check_debate", "next_round",
           "normalize_number", "QUESTION_PROMPT"]

Mode = Literal["cipher", "natural", "single"]

QUESTION_PROMPT = (
    "Can you solve the following math problem? {question}\n"
    "Explain your reasoning step by step. End your response with the final answer as a single number "
    "on its own line, in the form '#### <number>'."
)
OTHERS_INTRO = "These are the solutions to the problem from other agents:"
ONE_SOLUTION = "\n\nOne agent solution: "
UPDATE_PROMPT = (
    "\n\nUsing the solutions from other agents as additional information, can you give an updated "
    "response? Examine your solution and the solutions of the other agents step by step. End your "
    "response with the final answer as a single number on its own line, in the form '#### <number>'."
)


def round_conversation(
    question: str, agent: int, previous: Sequence[AgentReply] | None, receiver: str | None = None
) -> list[Turn]:
    """Agent ``agent``'s conversation for one round.

    ``previous`` holds every agent's reply of the previous round (None in round 0). ``receiver``
    is this agent's model name in CIPHER mode (messages become vector slots averaged over its
    embedding matrix) and None in natural-language mode (messages are text).
    """
    turns = [Turn("user", [QUESTION_PROMPT.format(question=question.strip())])]
    if not previous:
        return turns
    if not 0 <= agent < len(previous):
        raise IndexError(f"agent {agent} out of range for {len(previous)} previous replies")
    turns.append(Turn("assistant", [previous[agent].message(receiver, agent)]))
    segments: list[Segment] = [OTHERS_INTRO]
    for j, reply in enumerate(previous):
        if j != agent:
            segments += [ONE_SOLUTION, reply.message(receiver, j)]
    segments.append(UPDATE_PROMPT)
    turns.append(Turn("user", segments))
    return turns


# ---------------------------------------------------------------- answers

_NUM = r"-?\$?\s?\d[\d,]*(?:\.\d+)?|-?\$?\s?\.\d+"
_PATTERNS = [
    re.compile(r"####\s*(" + _NUM + ")"),
    re.compile(r"\\boxed\{\s*(" + _NUM + r")\s*\}"),
    re.compile(r"answer\s*(?:is|:|=)?\s*[:=]?\s*\**\s*(" + _NUM + ")", re.IGNORECASE),
    re.compile(r"=\s*(" + _NUM + r")\s*(?:$|[^\d*/+\-(])", re.MULTILINE),
]
_ANY_NUM = re.compile(_NUM)


def normalize_number(text: str) -> str | None:
    """``'$1,234.50'`` -> ``'1234.5'``, ``'42.0'`` -> ``'42'``; None when it is not a number."""
    t = text.replace("$", "").replace(",", "").replace(" ", "").strip().rstrip(".")
    try:
        value = float(t)
    except ValueError:
        return None
    if value != value or value in (float("inf"), float("-inf")):
        return None
    if value == int(value):
        return str(int(value))
    return repr(value).rstrip("0").rstrip(".")


def extract_answer(text: str) -> str | None:
    """The final numeric answer in a response (normalized), or None when it holds no number.

    Order: the last ``#### N``, the last ``\\boxed{N}``, the last ``answer is N``, the last ``= N``,
    then the last number anywhere.
    """
    for pattern in _PATTERNS:
        hits = pattern.findall(text)
        for hit in reversed(hits):
            value = normalize_number(hit)
            if value is not None:
                return value
    for hit in reversed(_ANY_NUM.findall(text)):
        value = normalize_number(hit)
        if value is not None:
            return value
    return None


def answers_equal(predicted: str | None, gold: str | None, tol: float = 1e-6) -> bool:
    """Numeric equality of two normalized answers (None never matches)."""
    if predicted is None or gold is None:
        return False
    a, b = normalize_number(predicted), normalize_number(gold)
    if a is None or b is None:
        return False
    return abs(float(a) - float(b)) <= tol * max(1.0, abs(float(b)))


def majority_vote(answers: Sequence[str | None]) -> str | None:
    """The most frequent non-None answer; ties go to the answer given first (agent order)."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == best)


def final_answer(mode: Mode, temperatures: Sequence[float], answers: Sequence[str | None]) -> str | None:
    """CIPHER: the lowest-temperature agent's answer (first on ties); natural: majority; single: its own."""
    if len(temperatures) != len(answers) or not answers:
        raise ValueError(f"{len(temperatures)} temperatures for {len(answers)} answers")
    if mode == "cipher":
        low = min(range(len(temperatures)), key=lambda i: (temperatures[i], i))
        return answers[low]
    if mode == "natural":
        return majority_vote(answers)
    if mode == "single":
        if len(answers) != 1:
            raise ValueError(f"single mode has one agent, got {len(answers)}")
        return answers[0]
    raise ValueError(f"unknown mode {mode!r}; use cipher, natural or single")


def check_debate(mode: Mode, n_agents: int, rounds: int) -> None:
    """Shape rules of a debate: single = 1 agent x 1 round; cipher/natural >= 2 agents."""
    if mode == "single":
        if n_agents != 1:
            raise ValueError(f"mode 'single' takes exactly 1 agent, got {n_agents}")
        if rounds != 1:
            raise ValueError(f"mode 'single' runs 1 round, got rounds={rounds}")
    elif n_agents < 2:
        raise ValueError(f"mode {mode!r} needs at least 2 agents to debate, got {n_agents}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")


def next_round(
    questions: Sequence[str],
    mode: Mode,
    agent_models: Sequence[str],
    previous: Sequence[Sequence[AgentReply]] | None,
) -> list[list[list[Turn]]]:
    """Conversations of the next round: ``[agent][question] -> turns``.

    ``previous[agent][question]`` holds the last round's replies (None before round 0). In CIPHER
    mode every agent receives vectors averaged over its own model's matrix (``agent_models[i]``).
    """
    out = []
    for i, model in enumerate(agent_models):
        receiver = model if mode == "cipher" else None
        per_q = []
        for q, question in enumerate(questions):
            prev = [previous[j][q] for j in range(len(agent_models))] if previous else None
            per_q.append(round_conversation(question, i, prev, receiver))
        out.append(per_q)
    return out
