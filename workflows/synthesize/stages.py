"""Ray Data stages of the synthesize pipeline (callable classes and functions over batches).

Each reads named columns, checks them (naming missing and received columns), and adds its own;
each can be called directly on a dict of lists in a unit test. The translation stage itself is
:class:`actors.translator.Translator` or ``ray.data.llm``'s processor (see ``pipeline.py``).

Order: ``PromptStage`` -> translation -> (``BackPromptStage`` -> translation, when
``qe.round_trip``) -> ``EmbedStage`` (when ``qe.cosine``) -> ``QEStage``. ``QEStage`` is last and
returns a ``pyarrow.Table`` with an explicit schema (failure structs, fixed-size embedding
lists), so every block reaching the driver has the same types.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa

from embedforge.schemas import require_columns
from workflows.synthesize import prompts as P
from workflows.synthesize import qe as Q
from workflows.synthesize.rows import (BACK, COSINE, DETECTED, LANG, LANG_PROB, QE, RATIO, ROUND_TRIP_CHRF,
                                       SOURCE_EMB, TARGET_EMB, TEXT, TRANSLATION)

log = logging.getLogger(__name__)

PROMPT, MAX_TOKENS, SOURCE_TOKENS = "prompt", "max_tokens", "num_source_tokens"
GENERATED_TEXT, NUM_GENERATED_TOKENS = "generated_text", "num_generated_tokens"
# the forward pass's columns, kept aside while the back-translation reuses prompt/max_tokens/generated_text
FWD_TOKENS, FWD_MAX_TOKENS = "fwd_num_generated_tokens", "fwd_max_tokens"

SENTENCE_FAILURE = pa.list_(pa.struct([("code", pa.string()), ("detail", pa.string()), ("value", pa.float64()),
                                       ("threshold", pa.float64())]))


def resolve_style(style: str, tokenizer) -> str:
    if style != "auto":
        return style
    return "chat" if getattr(tokenizer, "chat_template", None) else "few_shot"


class PromptStage:
    """(text, lang) -> prompt, max_tokens, num_source_tokens, with the translation model's tokenizer."""

    def __init__(self, translation: dict[str, Any], source_lang: str = "en"):
        from transformers import AutoTokenizer

        from embedforge.models import resolve_model
        from workflows.synthesize.config import TranslationConfig

        self.config = TranslationConfig.model_validate(translation)
        self.source_lang = source_lang
        self.tokenizer = AutoTokenizer.from_pretrained(resolve_model(self.config.model))
        self.style = resolve_style(self.config.prompt_style, self.tokenizer)
        log.info("translation prompts: %s", self.style)

    def prompt(self, text: str, lang: str) -> str:
        if self.style == "chat":
            messages = P.chat_messages(text, lang, self.source_lang)
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return P.few_shot_prompt(text, lang, P.few_shot_examples(lang, self.config.few_shot), self.source_lang)

    def back_prompt(self, text: str, lang: str) -> str:
        """Prompt translating ``text`` (in ``lang``) back into the source language."""
        if self.style == "chat":
            messages = P.chat_messages(text, self.source_lang, lang)
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        examples = [(t, s) for s, t in P.few_shot_examples(lang, self.config.few_shot)]
        return P.few_shot_prompt(text, self.source_lang, examples, lang)

    def token_counts(self, texts: list[str]) -> list[int]:
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        require_columns(batch.keys(), [TEXT, LANG], "PromptStage batch")
        texts, langs = [str(t) for t in batch[TEXT]], [str(x) for x in batch[LANG]]
        n_tokens = self.token_counts(texts)
        out = dict(batch)
        out[PROMPT] = [self.prompt(t, lang) for t, lang in zip(texts, langs, strict=True)]
        out[SOURCE_TOKENS] = np.asarray(n_tokens, dtype=np.int64)
        out[MAX_TOKENS] = np.asarray([P.max_tokens_for(n, self.config.max_tokens_factor, self.config.max_tokens_floor)
                                      for n in n_tokens], dtype=np.int64)
        return out


class BackPromptStage(PromptStage):
    """After the forward translation: translation (cleaned), and a prompt translating it back."""

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        require_columns(batch.keys(), [TEXT, LANG, GENERATED_TEXT, NUM_GENERATED_TOKENS, MAX_TOKENS],
                        "BackPromptStage batch")
        translations = [P.clean_completion(str(t)) for t in batch[GENERATED_TEXT]]
        langs = [str(x) for x in batch[LANG]]
        out = dict(batch)
        out[TRANSLATION] = translations
        out[FWD_TOKENS], out[FWD_MAX_TOKENS] = batch[NUM_GENERATED_TOKENS], batch[MAX_TOKENS]
        out[PROMPT] = [self.back_prompt(t, lang) for t, lang in zip(translations, langs, strict=True)]
        out[MAX_TOKENS] = np.asarray([P.max_tokens_for(n, self.config.max_tokens_factor, self.config.max_tokens_floor)
                                      for n in self.token_counts(translations)], dtype=np.int64)
        return out


def forward_columns(batch: dict[str, Any]) -> tuple[list[str], Any, Any, list[str] | None]:
    """(translations, generated tokens, max_tokens, back-translations or None) of a batch."""
    if FWD_TOKENS in batch:  # a round trip ran: generated_text is the back-translation
        back = [P.clean_completion(str(t)) for t in batch[GENERATED_TEXT]]
        return [str(t) for t in batch[TRANSLATION]], batch[FWD_TOKENS], batch[FWD_MAX_TOKENS], back
    translations = [P.clean_completion(str(t)) for t in batch[GENERATED_TEXT]]
    return translations, batch[NUM_GENERATED_TOKENS], batch[MAX_TOKENS], None


class EmbedStage:
    """Embeddings of source and (cleaned) translation with the multilingual encoder, and their cosine."""

    def __init__(self, embedder: dict[str, Any]):
        from actors.embedder import Embedder

        self.embedder = Embedder(embedder)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        require_columns(batch.keys(), [TEXT, GENERATED_TEXT], "EmbedStage batch")
        sources = [str(t) for t in batch[TEXT]]
        translations = forward_columns(batch)[0]
        out = dict(batch)
        if not sources:
            dim = self.embedder.dimension
            out[SOURCE_EMB] = out[TARGET_EMB] = np.zeros((0, dim), dtype=np.float32)
            out[COSINE] = np.zeros(0, dtype=np.float32)
            return out
        emb = self.embedder.encode(sources + translations)
        a, b = emb[: len(sources)], emb[len(sources):]
        out[SOURCE_EMB], out[TARGET_EMB] = a, b
        out[COSINE] = np.sum(a * b, axis=1).astype(np.float32)
        return out


def _embedding_array(values: Any) -> pa.Array:
    arr = np.asarray(values, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(arr.reshape(-1)), arr.shape[1] if arr.ndim == 2 else 0)


def qe_batch(batch: dict[str, Any], qe: dict[str, Any], count_tokens=None) -> pa.Table:
    """Clean completions and run the text checks; a table with translation and the QE columns.

    ``count_tokens``: a callable giving token counts of a list of texts (the translation model's
    tokenizer) when ``qe.length_unit == "tokens"``; the source counts come from ``PromptStage``.
    """
    from workflows.synthesize.config import QEConfig

    config = QEConfig.model_validate(qe)
    require_columns(batch.keys(), [TEXT, LANG, GENERATED_TEXT, NUM_GENERATED_TOKENS, MAX_TOKENS], "QE batch")
    translations, tokens, max_tokens, back = forward_columns(batch)
    sources, langs = [str(t) for t in batch[TEXT]], [str(x) for x in batch[LANG]]
    by_tokens = config.length_unit == "tokens"
    if by_tokens:
        if count_tokens is None or SOURCE_TOKENS not in batch:
            raise ValueError("qe.length_unit=tokens needs the translation tokenizer and num_source_tokens "
                             "(PromptStage); set qe.length_unit=chars to measure characters")
        src_len, tgt_len = [int(n) for n in batch[SOURCE_TOKENS]], count_tokens(translations)
    cols: dict[str, list] = {TRANSLATION: translations, DETECTED: [], LANG_PROB: [], RATIO: [], ROUND_TRIP_CHRF: [],
                             QE: []}
    for i, (src, translation, lang) in enumerate(zip(sources, translations, langs, strict=True)):
        chrf = Q.round_trip_chrf(src, back[i]) if back is not None and translation.strip() else None
        res = Q.text_checks(src, translation, lang, int(tokens[i]), int(max_tokens[i]), config,
                            src_len[i] if by_tokens else None, tgt_len[i] if by_tokens else None, chrf)
        cols[DETECTED].append(res["detected_lang"])
        cols[LANG_PROB].append(res["lang_prob"])
        cols[RATIO].append(res["length_ratio"])
        cols[ROUND_TRIP_CHRF].append(chrf)
        cols[QE].append([{k: v for k, v in f.record("").items() if k != "column"} for f in res["failures"]])
    arrays = {TEXT: pa.array(sources, pa.string()), LANG: pa.array(langs, pa.string()),
              TRANSLATION: pa.array(translations, pa.string()),
              NUM_GENERATED_TOKENS: pa.array(np.asarray(tokens, dtype=np.int64)),
              MAX_TOKENS: pa.array(np.asarray(max_tokens, dtype=np.int64)),
              DETECTED: pa.array(cols[DETECTED], pa.string()), LANG_PROB: pa.array(cols[LANG_PROB], pa.float64()),
              RATIO: pa.array(cols[RATIO], pa.float64()), ROUND_TRIP_CHRF: pa.array(cols[ROUND_TRIP_CHRF], pa.float64()),
              BACK: pa.array(back if back is not None else [None] * len(sources), pa.string()),
              QE: pa.array(cols[QE], SENTENCE_FAILURE)}
    if COSINE in batch:
        arrays[COSINE] = pa.array(np.asarray(batch[COSINE], dtype=np.float64))
        arrays[SOURCE_EMB] = _embedding_array(batch[SOURCE_EMB])
        arrays[TARGET_EMB] = _embedding_array(batch[TARGET_EMB])
    return pa.table(arrays)


class QEStage:
    """``qe_batch`` with the translation model's tokenizer loaded once (for token length ratios)."""

    def __init__(self, qe: dict[str, Any], translation: dict[str, Any]):
        self.qe = qe
        self.count_tokens = None
        if qe.get("length_unit", "tokens") == "tokens":
            from transformers import AutoTokenizer

            from embedforge.models import resolve_model

            tokenizer = AutoTokenizer.from_pretrained(resolve_model(translation["model"]))
            self.count_tokens = lambda texts: ([len(ids) for ids in tokenizer(texts, add_special_tokens=False)
                                                ["input_ids"]] if texts else [])

    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        return qe_batch(batch, self.qe, self.count_tokens)


class RoundTripTranslator:
    """Translate, then translate the cleaned output back with the same engine (``qe.round_trip``).

    Returns the forward translation in ``translation`` and its token counts in ``fwd_*``; the
    back-translation is ``generated_text`` (see :func:`forward_columns`).
    """

    def __init__(self, config: dict[str, Any], translation: dict[str, Any], source_lang: str = "en"):
        from actors.translator import Translator

        self.translator = Translator(config)
        self.back = BackPromptStage(translation, source_lang)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        return self.translator(self.back(self.translator(batch)))
