"""An LLM scorer for Ray Data: LLM-feedback rewards and LLM cross-encoder scores, in batches.

Wraps :class:`actors.llm_engine.LLMEngine`; nothing is generated for rewards (prompt
log-probabilities of the answer), and one token is generated for cross-encoder scores (its
top log-probs) unless ``method="score_tokens"`` scores every score token as a continuation.

* reward of a (query, candidate) pair, LLM-Embedder (Zhang et al. 2023, "Retrieve Anything To
  Augment Large Language Models"): ``r = (1/|a|) * sum_t log p(a_t | prompt(candidate, query), a_<t)``;
* LLM cross-encoder (DSE, "Distilled Sentence Embedding"): with the next-token log-probs ``l_k``
  of the score tokens ``k = 0..K``, the expected score is ``sum_k k * softmax(l)_k / K`` in [0, 1]
  (renormalized over the score tokens), and the mass ``sum_k exp(l_k)`` says how much of the
  distribution the score tokens hold.

Prompt building and that math are pure functions at the top of this module (no model), so tests
check them alone. The scorer takes only its prompt configs (:class:`FeedbackPromptConfig`,
:class:`CrossEncoderPromptConfig`); the reward workflow's configs extend them with data and batching.

Use in Ray Data::

    ds.map_batches(RewardScorer, fn_constructor_kwargs={"engine": engine_cfg, "task": "feedback",
                   "feedback": feedback_cfg}, compute=ActorPoolStrategy(size=1), num_cpus=1)

A row that cannot be scored (empty text, prompt longer than the context) gets a non-empty
``reason`` and NaN scores, so the pipeline can quarantine it instead of failing the batch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, TypeVar

import numpy as np
from pydantic import Field, model_validator

from actors.llm_engine import LLMEngine, LLMEngineConfig
from embedforge.config import StrictModel
from embedforge.errors import EngineError, InputError
from embedforge.schemas import ANSWER, REASON, SENTENCE1, SENTENCE2, require_columns

log = logging.getLogger(__name__)

QUERY_COLUMN, PASSAGE_COLUMN = "query", "passage"
REWARD, N_ANSWER_TOKENS = "reward", "n_answer_tokens"
TEACHER_SCORE, SCORE_MASS = "teacher_score", "score_mass"
TOP_LOGPROBS = 20

DEFAULT_FEEDBACK_TEMPLATE = (
    "Read the passage and answer the question.\n\nPassage: {passage}\n\nQuestion: {query}"
)
# Five few-shot examples from the STS-B *train* split (gold scores rounded); the teacher is
# measured on dev. With SmolLM2-135M they lifted dev Spearman from about -0.1 (zero-shot) to
# about 0.2 (150 dev pairs).
DEFAULT_CROSS_ENCODER_TEMPLATE = (
    "Rate how similar in meaning two sentences are, from 0 (unrelated) to 5 (same meaning).\n\n"
    "Sentence 1: A plane is taking off.\nSentence 2: An air plane is taking off.\nSimilarity (0-5): 5\n\n"
    "Sentence 1: A man is playing guitar.\nSentence 2: A boy is playing a guitar.\nSimilarity (0-5): 3\n\n"
    "Sentence 1: A woman is dancing.\nSentence 2: A man is eating.\nSimilarity (0-5): 0\n\n"
    "Sentence 1: Someone is feeding a animal.\nSentence 2: Someone is playing a piano.\nSimilarity (0-5): 0\n\n"
    "Sentence 1: A woman splits garlic cloves.\nSentence 2: A woman is breaking a head of garlic into cloves.\n"
    "Similarity (0-5): 5\n\n"
    "Sentence 1: {sentence1}\nSentence 2: {sentence2}"
)

ChatRenderer = Callable[[Sequence[dict[str, str]]], str]
P = TypeVar("P", bound=StrictModel)


# ---------------------------------------------------------------- configs


class FeedbackPromptConfig(StrictModel):
    """How a (query, passage, answer) row becomes a prompt and a scored continuation."""

    template: str = Field(DEFAULT_FEEDBACK_TEMPLATE, description="Prompt with {passage} and {query}")
    chat_template: bool = Field(True, description="Wrap the prompt in the model's chat template (user turn)")
    answer_prefix: str = Field(" ", description="Text put before the answer when no chat template is used")

    @model_validator(mode="after")
    def _placeholders(self) -> FeedbackPromptConfig:
        if "{passage}" not in self.template or "{query}" not in self.template:
            raise ValueError("llm_feedback.template must contain {passage} and {query}")
        return self


class CrossEncoderPromptConfig(StrictModel):
    """The LLM as a cross-encoder: expected score over the next-token distribution of '0'..'max_score'."""

    method: Literal["top_logprobs", "score_tokens"] = Field(
        "top_logprobs",
        description="top_logprobs: one generated token with its top-20 log-probs (one pass, tokens outside the "
                    "top-20 count as 0); score_tokens: prompt log-prob of every score token (exact, 6 passes)",
    )
    template: str = Field(DEFAULT_CROSS_ENCODER_TEMPLATE, description="Prompt with {sentence1} and {sentence2}")
    chat_template: bool = Field(True, description="Wrap the prompt in the model's chat template (user turn)")
    response_prefix: str = Field("Similarity (0-5): ",
                                 description="Text put after the prompt (the start of the assistant's answer) "
                                             "right before the score digit")
    score_prefix: str = Field("", description="Text inside the score token before the digit (' ' for tokenizers "
                                              "where ' 3' is one token); every score string must be one token")
    max_score: int = Field(5, ge=1, le=9, description="Score tokens are '0'..str(max_score)")

    @model_validator(mode="after")
    def _placeholders(self) -> CrossEncoderPromptConfig:
        if "{sentence1}" not in self.template or "{sentence2}" not in self.template:
            raise ValueError("cross_encoder.template must contain {sentence1} and {sentence2}")
        return self


def prompt_config(cls: type[P], value: StrictModel | dict[str, Any] | None) -> P:
    """``value`` narrowed to ``cls``'s fields (a workflow config that extends ``cls`` passes its own)."""
    if isinstance(value, StrictModel):
        value = value.model_dump(include=set(cls.model_fields))
    return cls.model_validate(value or {})


# ---------------------------------------------------------------- prompts (pure)


def feedback_message(template: str, query: str, passage: str) -> str:
    """The user message asking the LLM to answer ``query`` from ``passage``."""
    return template.format(query=query.strip(), passage=passage.strip())


def cross_encoder_message(template: str, sentence1: str, sentence2: str) -> str:
    """The user message asking the LLM to rate the similarity of two sentences."""
    return template.format(sentence1=sentence1.strip(), sentence2=sentence2.strip())


def render(message: str, chat: ChatRenderer | None, plain_suffix: str) -> str:
    """Text to score: the chat-templated user turn (ready for the assistant), or message + suffix.

    The continuation that is scored (the answer, or a score digit) is never part of the prompt:
    the engine tokenizes it on its own.
    """
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


# ---------------------------------------------------------------- score math (pure)


def mean_logprob(token_logprobs: Sequence[float]) -> float:
    """Mean per-token log-probability of a continuation (the reward)."""
    if len(token_logprobs) == 0:
        raise InputError("a reward needs at least one answer token; the answer is empty")
    return float(np.mean(np.asarray(token_logprobs, dtype=np.float64)))


def expected_score(logprobs: Mapping[int, float], score_token_ids: Sequence[int]) -> tuple[float, float]:
    """``(expected score in [0, 1], probability mass on the score tokens)``.

    ``logprobs`` maps token id -> log-prob (e.g. vLLM's top-20 of one generated step); score
    tokens missing from it count as probability 0. Raises InputError if none is present.
    """
    present = [(k, logprobs[t]) for k, t in enumerate(score_token_ids) if t in logprobs]
    if not present:
        raise InputError("no score token among the top log-probs; the model did not answer with a score")
    ks = np.array([k for k, _ in present], dtype=np.float64)
    lps = np.array([lp for _, lp in present], dtype=np.float64)
    shifted = np.exp(lps - lps.max())
    probs = shifted / shifted.sum()
    max_k = len(score_token_ids) - 1
    return float((probs * ks).sum() / max_k), float(np.exp(lps).sum())


def expected_score_from_list(score_logprobs: Sequence[float]) -> tuple[float, float]:
    """Same as :func:`expected_score` when every score token's log-prob is known (index = score)."""
    return expected_score(dict(enumerate(score_logprobs)), list(range(len(score_logprobs))))


# ---------------------------------------------------------------- the worker


class RewardScorer:
    """Scores (query, passage, answer) rows or (sentence1, sentence2) rows with one vLLM engine."""

    def __init__(
        self,
        engine: LLMEngineConfig | dict[str, Any] | LLMEngine | None = None,
        task: Literal["feedback", "cross_encoder"] = "feedback",
        feedback: FeedbackPromptConfig | dict[str, Any] | None = None,
        cross_encoder: CrossEncoderPromptConfig | dict[str, Any] | None = None,
    ):
        self.engine = engine if isinstance(engine, LLMEngine) else LLMEngine(engine)
        self.task = task
        self.feedback = prompt_config(FeedbackPromptConfig, feedback)
        self.cross_encoder = prompt_config(CrossEncoderPromptConfig, cross_encoder)
        self.max_len = self.engine.config.max_model_len
        if task == "cross_encoder":
            ce = self.cross_encoder
            self.score_strings = score_strings(ce.max_score, ce.score_prefix)
            ids = [self.engine.tokenizer.encode(s, add_special_tokens=False) for s in self.score_strings]
            bad = [s for s, i in zip(self.score_strings, ids) if len(i) != 1]
            if bad:
                raise EngineError(f"score strings {bad} are not single tokens for {self.engine.model_path}; "
                                  "change cross_encoder.score_prefix (e.g. '' or ' ')")
            self.score_token_ids = [i[0] for i in ids]

    # ------------------------------------------------------------------ prompts
    def _chat(self, enabled: bool):
        return self.engine.apply_chat_template if enabled else None

    def feedback_prompt(self, query: str, passage: str) -> str:
        fb = self.feedback
        return render(feedback_message(fb.template, query, passage), self._chat(fb.chat_template), "\n\nAnswer:")

    def feedback_continuation(self, answer: str) -> str:
        return answer_continuation(answer, self.feedback.chat_template, self.feedback.answer_prefix)

    def cross_encoder_prompt(self, sentence1: str, sentence2: str) -> str:
        ce = self.cross_encoder
        return render(cross_encoder_message(ce.template, sentence1, sentence2), self._chat(ce.chat_template),
                        "\n") + ce.response_prefix

    def _too_long(self, prompts: list[str], extra: list[int]) -> list[str]:
        lengths = self.engine.count_tokens(prompts)
        return ["" if n + e + 2 < self.max_len else f"prompt is {n + e} tokens; max_model_len is {self.max_len}"
                for n, e in zip(lengths, extra)]

    # ------------------------------------------------------------------ scoring
    def score_feedback(self, queries: list[str], passages: list[str], answers: list[str]) -> dict[str, np.ndarray]:
        """Rewards (mean answer log-prob), answer token counts and per-row reasons ('' when scored)."""
        n = len(queries)
        rewards, counts = np.full(n, np.nan), np.zeros(n, dtype=np.int64)
        prompts = [self.feedback_prompt(q, p) for q, p in zip(queries, passages)]
        conts = [self.feedback_continuation(a) for a in answers]
        reasons = self._too_long(prompts, self.engine.count_tokens(conts))
        for i, (q, p, a) in enumerate(zip(queries, passages, answers)):
            for name, value in ((QUERY_COLUMN, q), (PASSAGE_COLUMN, p), (ANSWER, a)):
                if not value.strip():
                    reasons[i] = f"{name}: empty"
        ok = [i for i, r in enumerate(reasons) if not r]
        if ok:
            lps = self.engine.continuation_logprobs([prompts[i] for i in ok], [conts[i] for i in ok])
            for i, lp in zip(ok, lps):
                rewards[i], counts[i] = mean_logprob(lp), len(lp)
        return {REWARD: rewards, N_ANSWER_TOKENS: counts, REASON: np.array(reasons, dtype=object)}

    def score_pairs(self, sentences1: list[str], sentences2: list[str]) -> dict[str, np.ndarray]:
        """Expected similarity in [0, 1] from the next-token distribution over the score tokens."""
        n = len(sentences1)
        scores, mass = np.full(n, np.nan), np.full(n, np.nan)
        prompts = [self.cross_encoder_prompt(a, b) for a, b in zip(sentences1, sentences2)]
        reasons = self._too_long(prompts, [1] * n)
        for i, (a, b) in enumerate(zip(sentences1, sentences2)):
            if not a.strip() or not b.strip():
                reasons[i] = f"{SENTENCE1 if not a.strip() else SENTENCE2}: empty"
        ok = [i for i, r in enumerate(reasons) if not r]
        if ok and self.cross_encoder.method == "top_logprobs":
            outs = self.engine.generate([prompts[i] for i in ok], max_tokens=1, logprobs=TOP_LOGPROBS)
            for i, out in zip(ok, outs):
                try:
                    scores[i], mass[i] = expected_score(out["logprobs"][0], self.score_token_ids)
                except InputError as e:
                    reasons[i] = str(e)
        elif ok:
            k = len(self.score_strings)
            flat_prompts = [prompts[i] for i in ok for _ in range(k)]
            lps = self.engine.continuation_logprobs(flat_prompts, self.score_strings * len(ok))
            for j, i in enumerate(ok):
                scores[i], mass[i] = expected_score_from_list([lp[0] for lp in lps[j * k:(j + 1) * k]])
        return {TEACHER_SCORE: scores, SCORE_MASS: mass, REASON: np.array(reasons, dtype=object)}

    # ------------------------------------------------------------------ Ray Data
    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        if self.task == "feedback":
            require_columns(batch.keys(), [QUERY_COLUMN, PASSAGE_COLUMN, ANSWER], "RewardScorer(feedback) batch")
            res = self.score_feedback(*(_texts(batch[c]) for c in (QUERY_COLUMN, PASSAGE_COLUMN, ANSWER)))
        else:
            require_columns(batch.keys(), [SENTENCE1, SENTENCE2], "RewardScorer(cross_encoder) batch")
            res = self.score_pairs(_texts(batch[SENTENCE1]), _texts(batch[SENTENCE2]))
        return {**batch, **res}


def _texts(column: Any) -> list[str]:
    """Column values as strings; None/NaN become '' (and are then quarantined as empty)."""
    out = []
    for v in column:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            out.append("")
        else:
            out.append(str(v))
    return out
