"""An LLM scorer for Ray Data: LLM-feedback rewards and LLM cross-encoder scores, in batches.

Wraps :class:`actors.llm_engine.LLMEngine`; nothing is generated for rewards (prompt
log-probabilities of the answer), and one token is generated for cross-encoder scores (its
top log-probs) unless ``method="score_tokens"`` scores every score token as a continuation.

Use in Ray Data::

    ds.map_batches(RewardScorer, fn_constructor_kwargs={"engine": engine_cfg, "task": "feedback",
                   "feedback": feedback_cfg}, compute=ActorPoolStrategy(size=1), num_cpus=1)

A row that cannot be scored (empty text, prompt longer than the context) gets a non-empty
``reason`` and NaN scores, so the pipeline can quarantine it instead of failing the batch.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import numpy as np

from actors.llm_engine import LLMEngine, LLMEngineConfig
from embedforge.errors import EngineError, InputError
from embedforge.schemas import ANSWER, REASON, SENTENCE1, SENTENCE2, require_columns
from workflows.reward import prompts as P
from workflows.reward.config import CrossEncoderConfig, LLMFeedbackConfig
from workflows.reward.scoring import expected_score, expected_score_from_list, mean_logprob

log = logging.getLogger(__name__)

QUERY_COLUMN, PASSAGE_COLUMN = "query", "passage"
REWARD, N_ANSWER_TOKENS = "reward", "n_answer_tokens"
TEACHER_SCORE, SCORE_MASS = "teacher_score", "score_mass"
TOP_LOGPROBS = 20


class RewardScorer:
    """Scores (query, passage, answer) rows or (sentence1, sentence2) rows with one vLLM engine."""

    def __init__(
        self,
        engine: LLMEngineConfig | dict[str, Any] | LLMEngine | None = None,
        task: Literal["feedback", "cross_encoder"] = "feedback",
        feedback: LLMFeedbackConfig | dict[str, Any] | None = None,
        cross_encoder: CrossEncoderConfig | dict[str, Any] | None = None,
    ):
        self.engine = engine if isinstance(engine, LLMEngine) else LLMEngine(engine)
        self.task = task
        self.feedback = LLMFeedbackConfig.model_validate(feedback or {}) if not isinstance(
            feedback, LLMFeedbackConfig) else feedback
        self.cross_encoder = CrossEncoderConfig.model_validate(cross_encoder or {}) if not isinstance(
            cross_encoder, CrossEncoderConfig) else cross_encoder
        self.max_len = self.engine.config.max_model_len
        if task == "cross_encoder":
            ce = self.cross_encoder
            self.score_strings = P.score_strings(ce.max_score, ce.score_prefix)
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
        return P.render(P.feedback_message(fb.template, query, passage), self._chat(fb.chat_template), "\n\nAnswer:")

    def feedback_continuation(self, answer: str) -> str:
        return P.answer_continuation(answer, self.feedback.chat_template, self.feedback.answer_prefix)

    def cross_encoder_prompt(self, sentence1: str, sentence2: str) -> str:
        ce = self.cross_encoder
        return P.render(P.cross_encoder_message(ce.template, sentence1, sentence2), self._chat(ce.chat_template),
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
