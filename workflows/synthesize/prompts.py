"""Translation prompts, per model kind and target language. Pure: no Ray, no model.

* **chat** (instruct models): one user turn asking for the translation only, rendered with the
  model's own chat template (``tokenizer.apply_chat_template``).
* **few_shot** (base models such as Gemma-3-270M): a completion prompt with two examples::

      English: A man is spreading shreded cheese on a pizza.
      German: Ein Mann streicht geriebenen Käse auf eine Pizza.

      English: The man hit the other man with a stick.
      German: Der Mann schlug den anderen Mann mit einem Stock.

      English: <source>
      German:

  Decoding stops at the first newline, so the completion is the translation.

The built-in examples are the first sentences of rows 3 and 11 of the STS-B **train** split and
their DeepL translations from ``stsb_multi_mt`` train (``stsb-<lang>-train.csv``); never dev or
test, so the chrF on dev in ``benchmarks/synthesize.py`` is not contaminated. A test checks that
they are in those train files. Other languages need ``translation.few_shot`` in the config.

``max_tokens`` is proportional to the source length in tokens (``ceil(factor x n) + floor``): a translation is rarely more than twice as long as its source, and a cap
keeps a base model that does not stop from running to the context length.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

LANG_NAMES = {
    "en": "English", "de": "German", "es": "Spanish", "fr": "French", "it": "Italian", "nl": "Dutch",
    "pl": "Polish", "pt": "Portuguese", "ru": "Russian", "zh": "Chinese", "ja": "Japanese", "hi": "Hindi",
    "mr": "Marathi", "ar": "Arabic", "tr": "Turkish", "vi": "Vietnamese", "el": "Greek", "th": "Thai",
    "ro": "Romanian", "bg": "Bulgarian", "sw": "Swahili", "ur": "Urdu", "ko": "Korean", "cs": "Czech",
    "sv": "Swedish", "da": "Danish", "fi": "Finnish", "hu": "Hungarian", "uk": "Ukrainian", "id": "Indonesian",
}

_EN = ("A man is spreading shreded cheese on a pizza.", "The man hit the other man with a stick.")
_TRAIN_EXAMPLES = {
    "de": ("Ein Mann streicht geriebenen Käse auf eine Pizza.", "Der Mann schlug den anderen Mann mit einem Stock."),
    "es": ("Un hombre está untando queso rallado en una pizza.", "El hombre golpeó al otro hombre con un palo."),
    "fr": ("Un homme étale du fromage râpé sur une pizza.", "L'homme a frappé l'autre homme avec un bâton."),
    "it": ("Un uomo sta spalmando del formaggio a pezzetti su una pizza.",
           "L'uomo ha colpito l'altro uomo con un bastone."),
    "nl": ("Een man smeert geraspte kaas op een pizza.", "De man sloeg de andere man met een stok."),
    "pt": ("Um homem está a espalhar queijo desfiado numa pizza.", "O homem bateu no outro homem com um pau."),
    "pl": ("Mężczyzna rozsiewa na pizzy rozdrobniony ser.", "Ten człowiek uderzył drugiego człowieka kijem."),
    "ru": ("Мужчина разбрасывает сыр на пиццу.", "Мужчина ударил другого мужчину палкой."),
    "ja": ("ピザの上にシュレッドチーズを敷き詰めている男性がいます。", "男は相手の男を棒で殴った。"),
    "zh": ("一名男子正在比萨饼上涂抹奶酪丝。", "该男子用棍子打了对方。"),
}
#: lang -> [(english, translation), ...] taken from stsb_multi_mt train rows 3 and 11.
BUILTIN_FEW_SHOT: dict[str, list[tuple[str, str]]] = {
    lang: list(zip(_EN, targets, strict=True)) for lang, targets in _TRAIN_EXAMPLES.items()
}


def lang_name(code: str) -> str:
    try:
        return LANG_NAMES[code]
    except KeyError:
        raise ValueError(f"no language name for {code!r}; known: {', '.join(sorted(LANG_NAMES))}") from None


def few_shot_examples(lang: str, overrides: Mapping[str, Sequence[Any]] | None = None) -> list[tuple[str, str]]:
    """The examples for ``lang``: the config's (objects with .source/.target) or the built-in ones."""
    if overrides and lang in overrides:
        return [(e.source, e.target) if hasattr(e, "source") else (e[0], e[1]) for e in overrides[lang]]
    if lang not in BUILTIN_FEW_SHOT:
        raise ValueError(f"no built-in few-shot examples for {lang!r} (built in: {', '.join(sorted(BUILTIN_FEW_SHOT))});"
                         f" set translation.few_shot.{lang} to two English sentences from training data "
                         f"and their translations, or use an instruct model with prompt_style=chat")
    return BUILTIN_FEW_SHOT[lang]


def few_shot_prompt(text: str, lang: str, examples: Sequence[tuple[str, str]], source_lang: str = "en") -> str:
    src, tgt = lang_name(source_lang), lang_name(lang)
    blocks = [f"{src}: {s}\n{tgt}: {t}" for s, t in examples]
    blocks.append(f"{src}: {text}\n{tgt}:")
    return "\n\n".join(blocks)


def chat_messages(text: str, lang: str, source_lang: str = "en") -> list[dict[str, str]]:
    src, tgt = lang_name(source_lang), lang_name(lang)
    return [{
        "role": "user",
        "content": f"Translate this {src} sentence into {tgt}. Reply with the {tgt} translation only, "
                   f"on one line.\n\n{text}",
    }]


def max_tokens_for(num_source_tokens: int, factor: float, floor: int) -> int:
    return int(math.ceil(factor * num_source_tokens)) + floor


def clean_completion(text: str) -> str:
    """The translation in a completion: the first line, stripped (decoding already stops at a newline)."""
    return text.strip().split("\n", 1)[0].strip()
