"""Ray Data stages of the synthesize pipeline (callable classes and functions over batches).

Each reads named columns, checks them (naming missing and received columns), and adds its own;
each can be called directly on a dict of lists in a unit test. The translation stage itself is
:class:`actors.translator.Translator` or ``ray.data.llm``'s processor (see ``pipeline.py``).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from embedforge.schemas import require_columns
from workflows.synthesize import prompts as P
from workflows.synthesize import qe as Q
from workflows.synthesize.rows import COSINE, DETECTED, LANG, LANG_PROB, QE, RATIO, TEXT, TRANSLATION

log = logging.getLogger(__name__)

PROMPT, MAX_TOKENS, SOURCE_TOKENS = "prompt", "max_tokens", "num_source_tokens"
GENERATED_TEXT, NUM_GENERATED_TOKENS = "generated_text", "num_generated_tokens"


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

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        require_columns(batch.keys(), [TEXT, LANG], "PromptStage batch")
        texts, langs = [str(t) for t in batch[TEXT]], [str(x) for x in batch[LANG]]
        n_tokens = [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []
        out = dict(batch)
        out[PROMPT] = [self.prompt(t, lang) for t, lang in zip(texts, langs, strict=True)]
        out[SOURCE_TOKENS] = np.asarray(n_tokens, dtype=np.int64)
        out[MAX_TOKENS] = np.asarray([P.max_tokens_for(n, self.config.max_tokens_factor, self.config.max_tokens_floor)
                                      for n in n_tokens], dtype=np.int64)
        return out


class CosineStage:
    """Cross-lingual cosine between source and cleaned translation with a multilingual encoder."""

    def __init__(self, embedder: dict[str, Any]):
        from actors.embedder import Embedder

        self.embedder = Embedder(embedder)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        require_columns(batch.keys(), [TEXT, GENERATED_TEXT], "CosineStage batch")
        sources = [str(t) for t in batch[TEXT]]
        translations = [P.clean_completion(str(t)) for t in batch[GENERATED_TEXT]]
        out = dict(batch)
        if not sources:
            out[COSINE] = np.zeros(0, dtype=np.float32)
            return out
        emb = self.embedder.encode(sources + translations)
        a, b = emb[: len(sources)], emb[len(sources):]
        out[COSINE] = np.sum(a * b, axis=1).astype(np.float32)
        return out


def qe_batch(batch: dict[str, Any], qe: dict[str, Any]) -> dict[str, Any]:
    """Clean completions and run every QE check; adds translation and the QE columns."""
    from workflows.synthesize.config import QEConfig

    config = QEConfig.model_validate(qe)
    require_columns(batch.keys(), [TEXT, LANG, GENERATED_TEXT, NUM_GENERATED_TOKENS, MAX_TOKENS], "QE batch")
    cosines = batch.get(COSINE)
    cols: dict[str, list] = {TRANSLATION: [], DETECTED: [], LANG_PROB: [], RATIO: [], QE: [], COSINE: []}
    for i, (src, gen, lang) in enumerate(zip(batch[TEXT], batch[GENERATED_TEXT], batch[LANG], strict=True)):
        translation = P.clean_completion(str(gen))
        cosine = float(cosines[i]) if cosines is not None and config.cosine else None
        res = Q.assess(str(src), translation, str(lang), int(batch[NUM_GENERATED_TOKENS][i]),
                       int(batch[MAX_TOKENS][i]), config, cosine)
        cols[TRANSLATION].append(translation)
        cols[DETECTED].append(res["detected_lang"])
        cols[LANG_PROB].append(res["lang_prob"])
        cols[RATIO].append(res["length_ratio"])
        cols[QE].append("; ".join(res["reasons"]))
        cols[COSINE].append(cosine)
    out = {k: batch[k] for k in (TEXT, LANG, NUM_GENERATED_TOKENS, MAX_TOKENS)}
    out.update(cols)
    return out
