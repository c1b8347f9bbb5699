"""The multi-agent debate protocol, free of Ray and of models.

A debate runs ``rounds`` rounds over ``n`` agents, as in Du et al. 2023 (official code:
composable-models/llm_multiagent_debate, ``gsm/gen_gsm.py``, ``math/gen_math.py``). In round 0
every agent answers the question alone; in round ``r > 0`` every agent reads the others' answers of
round ``r - 1`` in a new user turn appended to *its own full history*::

    user:      <question prompt>
    assistant: <own answer, round 0>
    user:      These are the solutions to the problem from other agents: One agent solution: ```<answer of j, round 0>``` ...
    assistant: <own answer, round 1>
    user:      ... the others' answers of round 1 ...

``history="full"`` (Du et al.'s code: each agent's context list grows by two turns a round) or
``history="last"`` (only the question, the agent's previous answer and the others' previous
answers; prompts stay bounded for any number of rounds -- our earlier behaviour, kept as an option).

Prompts (:data:`PROMPTS`): ``du_gsm`` and ``du_arithmetic`` are Du et al.'s GSM8K and arithmetic
prompts verbatim (``\\boxed{answer}`` / "state your answer at the end"); ``hash`` asks for
``#### <number>`` (GSM8K's own convention).

A message is a list of *segments*: ``str`` (text) or a :class:`Vectors` slot holding a
``[n, hidden]`` array. Natural-language debate fills the answer slots with text, CIPHER with the
sender's expected-embedding sequence (its own past answers too, as the vectors it fed back);
:func:`render_segments` turns a conversation into the chat-templated token stream with each vector
slot at its exact place, so "vectors between the embeddings of the text prompt" is explicit and
testable.

Answers: :func:`extract_answer` reads ``#### N``, ``\\boxed{N}``, ``The answer is N``, ``= N`` and
falls back to the last number (Du et al.: ``\\boxed{}``, else the last number).
Final answer (:func:`decide`): natural debate takes the majority vote over the agents' last-round
answers (Du et al.'s ``most_frequent``: ties go to the answer of the first agent in agent order; the
tie is reported); CIPHER takes the lowest-temperature agent's answer (Pham et al.'s setup: one
low-temperature and one high-temperature debater), or the majority vote when configured; a single
agent its own answer.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

# The message types are shared with the agents (actors/), so they live in embedforge; re-exported here.
from embedforge.dialogue import AgentReply, Segment, Turn, Vectors, render_segments, to_chat

__all__ = ["AgentReply", "Segment", "Turn", "Vectors", "render_segments", "to_chat", "round_conversation",
           "extract_answer", "answers_equal", "majority_vote", "vote", "Vote", "decide", "final_answer",
           "check_debate", "next_round", "normalize_number", "QUESTION_PROMPT", "PROMPTS", "Prompts"]

Mode = Literal["cipher", "natural", "single"]
History = Literal["full", "last"]
CipherFinal = Literal["lowest_temperature", "majority"]
TieBreak = Literal["first", "lowest_temperature", "none"]


@dataclass(frozen=True)
class Prompts:
    """One prompt set. ``question`` and ``update`` are formatted with ``question=``; each other
    agent's message sits between ``solution_open`` and ``solution_close``."""

    question: str
    others_intro: str
    solution_open: str
    solution_close: str
    update: str


PROMPTS: dict[str, Prompts] = {
    # Du et al., gsm/gen_gsm.py (verbatim)
    "du_gsm": Prompts(
        question="Can you solve the following math problem? {question} Explain your reasoning. Your final answer "
                 "should be a single numerical number, in the form \\boxed{{answer}}, at the end of your response. ",
        others_intro="These are the solutions to the problem from other agents: ",
        solution_open="\n\n One agent solution: ```",
        solution_close="```",
        update="\n\n Using the solutions from other agents as additional information, can you provide your answer "
               "to the math problem? \n The original math problem is {question}. Your final answer should be a "
               "single numerical number, in the form \\boxed{{answer}}, at the end of your response.",
    ),
    # Du et al., math/gen_math.py (verbatim; the question is "What is the result of ...?")
    "du_arithmetic": Prompts(
        question="{question} Make sure to state your answer at the end of the response.",
        others_intro="These are the recent/updated opinions from other agents: ",
        solution_open="\n\n One agent response: ```",
        solution_close="```",
        update="\n\n Use these opinions carefully as additional advice, can you provide an updated answer? Make sure "
               "to state your answer at the end of the response.",
    ),
    # GSM8K's '#### N' convention (this project's first prompt set)
    "hash": Prompts(
        question="Can you solve the following math problem? {question}\n"
                 "Explain your reasoning step by step. End your response with the final answer as a single number "
                 "on its own line, in the form '#### <number>'.",
        others_intro="These are the solutions to the problem from other agents:",
        solution_open="\n\nOne agent solution: ",
        solution_close="",
        update="\n\nUsing the solutions from other agents as additional information, can you give an updated "
               "response? Examine your solution and the solutions of the other agents step by step. End your "
               "response with the final answer as a single number on its own line, in the form '#### <number>'.",
    ),
}
DEFAULT_PROMPTS = "du_gsm"
QUESTION_PROMPT = PROMPTS["hash"].question
OTHERS_INTRO = PROMPTS["hash"].others_intro
ONE_SOLUTION = PROMPTS["hash"].solution_open
UPDATE_PROMPT = PROMPTS["hash"].update


def _prompts(prompts: str | Prompts) -> Prompts:
    if isinstance(prompts, Prompts):
        return prompts
    if prompts not in PROMPTS:
        raise ValueError(f"unknown prompt set {prompts!r}; use one of {', '.join(PROMPTS)}")
    return PROMPTS[prompts]


def _others_turn(question: str, agent: int, replies: Sequence[AgentReply], receiver: str | None,
                 p: Prompts) -> Turn:
    segments: list[Segment] = [p.others_intro]
    for j, reply in enumerate(replies):
        if j != agent:
            segments += [p.solution_open, reply.message(receiver, j)]
            if p.solution_close:
                segments.append(p.solution_close)
    segments.append(p.update.format(question=question))
    return Turn("user", segments)


def round_conversation(
    question: str,
    agent: int,
    history: Sequence[Sequence[AgentReply]] | None,
    receiver: str | None = None,
    *,
    prompts: str | Prompts = "hash",
    memory: History = "full",
) -> list[Turn]:
    """Agent ``agent``'s conversation for the next round.

    ``history[r]`` holds every agent's reply of round ``r`` (None or empty before round 0).
    ``memory="full"``: the question, then per past round the agent's own answer (assistant turn)
    and the others' answers of that round (user turn), as Du et al.'s code keeps it;
    ``memory="last"``: only the last round's own answer and the others' answers. ``receiver`` is
    this agent's model name in CIPHER mode (messages become vector slots averaged over its
    embedding matrix) and None in natural-language mode (messages are text).
    """
    p = _prompts(prompts)
    question = question.strip()
    turns = [Turn("user", [p.question.format(question=question)])]
    if not history:
        return turns
    if memory not in ("full", "last"):
        raise ValueError(f"memory must be 'full' or 'last', got {memory!r}")
    rounds = list(history) if memory == "full" else [history[-1]]
    for replies in rounds:
        if not 0 <= agent < len(replies):
            raise IndexError(f"agent {agent} out of range for {len(replies)} replies in a round")
        turns.append(Turn("assistant", [replies[agent].message(receiver, agent)]))
        turns.append(_others_turn(question, agent, replies, receiver, p))
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


@dataclass
class Vote:
    """A majority vote over agents' answers: the winner, the counts, and whether the top count was tied."""

    answer: str | None
    counts: dict[str, int] = field(default_factory=dict)
    tie: bool = False
    tied: list[str] = field(default_factory=list)


def vote(answers: Sequence[str | None], tie_break: TieBreak = "first",
         temperatures: Sequence[float] | None = None) -> Vote:
    """Majority vote over the non-None answers (Du et al.'s ``most_frequent``, with None skipped).

    Tie rules: ``first`` (Du et al.: the tied answer given first in agent order), ``lowest_temperature``
    (the tied answer of the lowest-temperature agent; needs ``temperatures``), ``none`` (no answer).
    """
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return Vote(None)
    best = max(counts.values())
    tied = [a for a in dict.fromkeys(a for a in answers if a is not None) if counts[a] == best]
    if len(tied) == 1:
        return Vote(tied[0], dict(counts))
    if tie_break == "first":
        winner: str | None = tied[0]
    elif tie_break == "lowest_temperature":
        if temperatures is None or len(temperatures) != len(answers):
            raise ValueError("tie_break 'lowest_temperature' needs one temperature per answer")
        order = sorted(range(len(answers)), key=lambda i: (temperatures[i], i))
        winner = next(answers[i] for i in order if answers[i] in tied)
    elif tie_break == "none":
        winner = None
    else:
        raise ValueError(f"unknown tie_break {tie_break!r}; use first, lowest_temperature or none")
    return Vote(winner, dict(counts), True, tied)


def majority_vote(answers: Sequence[str | None]) -> str | None:
    """The most frequent non-None answer; ties go to the answer given first (agent order)."""
    return vote(answers).answer


def decide(mode: Mode, temperatures: Sequence[float], answers: Sequence[str | None], *,
           cipher_final: CipherFinal = "lowest_temperature", tie_break: TieBreak = "first") -> Vote:
    """The debate's final answer from the last round's answers, with the vote behind it.

    natural: majority vote (``tie_break``); cipher: the lowest-temperature agent's answer (first on
    equal temperatures), or the majority vote with ``cipher_final="majority"``; single: its own.
    The returned :class:`Vote` always carries the counts and whether the top count was tied.
    """
    if len(temperatures) != len(answers) or not answers:
        raise ValueError(f"{len(temperatures)} temperatures for {len(answers)} answers")
    tally = vote(answers, tie_break, temperatures)
    if mode == "natural" or (mode == "cipher" and cipher_final == "majority"):
        return tally
    if mode == "cipher":
        if cipher_final != "lowest_temperature":
            raise ValueError(f"unknown cipher_final {cipher_final!r}; use lowest_temperature or majority")
        low = min(range(len(temperatures)), key=lambda i: (temperatures[i], i))
        return Vote(answers[low], tally.counts, tally.tie, tally.tied)
    if mode == "single":
        if len(answers) != 1:
            raise ValueError(f"single mode has one agent, got {len(answers)}")
        return Vote(answers[0], tally.counts)
    raise ValueError(f"unknown mode {mode!r}; use cipher, natural or single")


def final_answer(mode: Mode, temperatures: Sequence[float], answers: Sequence[str | None], *,
                 cipher_final: CipherFinal = "lowest_temperature", tie_break: TieBreak = "first") -> str | None:
    """:func:`decide`'s answer alone."""
    return decide(mode, temperatures, answers, cipher_final=cipher_final, tie_break=tie_break).answer


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
    history: Sequence[Sequence[Sequence[AgentReply]]] | None,
    *,
    prompts: str | Prompts | Sequence[str | Prompts] = "hash",
    memory: History = "full",
) -> list[list[list[Turn]]]:
    """Conversations of the next round: ``[agent][question] -> turns``.

    ``history[r][agent][question]`` holds round ``r``'s replies (None or empty before round 0).
    ``prompts`` is one prompt set or one per question. In CIPHER mode every agent receives vectors
    averaged over its own model's matrix (``agent_models[i]``).
    """
    per_question = list(prompts) if isinstance(prompts, (list, tuple)) else [prompts] * len(questions)
    if len(per_question) != len(questions):
        raise ValueError(f"{len(per_question)} prompt sets for {len(questions)} questions")
    out = []
    for i, model in enumerate(agent_models):
        receiver = model if mode == "cipher" else None
        per_q = []
        for q, question in enumerate(questions):
            past = [[rnd[j][q] for j in range(len(agent_models))] for rnd in history] if history else None
            per_q.append(round_conversation(question, i, past, receiver, prompts=per_question[q], memory=memory))
        out.append(per_q)
    return out
