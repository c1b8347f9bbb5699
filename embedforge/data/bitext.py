"""Bitext (``src, tgt, src_lang, tgt_lang``) from the Tatoeba test set of LASER.

Tatoeba holds up to 1,000 sentences per language, each with its English translation, in
``tatoeba.xxx-eng.xxx`` / ``tatoeba.xxx-eng.eng`` (line-aligned, ISO 639-3 codes). ``src`` is the
non-English sentence, ``tgt`` its English translation. It is an evaluation set (split ``test``).

Language codes: callers may pass ISO 639-1 (``de``) or ISO 639-3 (``deu``). :data:`ISO1_TO_TATOEBA`
maps the 639-1 codes of the languages present (Tatoeba uses individual-language codes, so
``zh`` -> ``cmn`` Mandarin, ``fa`` -> ``pes`` Iranian Persian, ``lv`` -> ``lvs`` Standard Latvian,
``ms`` -> ``zsm`` Standard Malay, ``sw`` -> ``swh``); any other code is looked up as a Tatoeba
file code directly. The ``src_lang`` column carries the 639-1 code where one exists (as the other
loaders do), else the Tatoeba code.
"""

from __future__ import annotations

import polars as pl

from embedforge import schemas as S
from embedforge.data._files import data_root, frame, read_lines
from embedforge.errors import InputError

ISO1_TO_TATOEBA = {
    "af": "afr", "am": "amh", "ar": "ara", "az": "aze", "be": "bel", "bg": "bul", "bn": "ben", "br": "bre",
    "bs": "bos", "ca": "cat", "cs": "ces", "cy": "cym", "da": "dan", "de": "deu", "el": "ell", "eo": "epo",
    "es": "spa", "et": "est", "eu": "eus", "fa": "pes", "fi": "fin", "fo": "fao", "fr": "fra", "fy": "fry",
    "ga": "gle", "gd": "gla", "gl": "glg", "he": "heb", "hi": "hin", "hr": "hrv", "hu": "hun", "hy": "hye",
    "ia": "ina", "id": "ind", "ie": "ile", "io": "ido", "is": "isl", "it": "ita", "ja": "jpn", "jv": "jav",
    "ka": "kat", "kk": "kaz", "km": "khm", "ko": "kor", "ku": "kur", "kw": "cor", "la": "lat", "lt": "lit",
    "lv": "lvs", "mk": "mkd", "ml": "mal", "mn": "mon", "mr": "mar", "ms": "zsm", "nb": "nob", "nl": "nld",
    "nn": "nno", "oc": "oci", "pl": "pol", "pt": "por", "ro": "ron", "ru": "rus", "sk": "slk", "sl": "slv",
    "sq": "sqi", "sr": "srp", "sv": "swe", "sw": "swh", "ta": "tam", "te": "tel", "th": "tha", "tk": "tuk",
    "tl": "tgl", "tr": "tur", "tt": "tat", "ug": "uig", "uk": "ukr", "ur": "urd", "uz": "uzb", "vi": "vie",
    "xh": "xho", "yi": "yid", "zh": "cmn",
}
TATOEBA_TO_ISO1 = {v: k for k, v in ISO1_TO_TATOEBA.items()}


def tatoeba_languages() -> list[str]:
    """The Tatoeba file codes present under the data root."""
    folder = data_root() / "tatoeba"
    return sorted(p.name.split(".")[1].split("-")[0] for p in folder.glob("tatoeba.*-eng.eng"))


def tatoeba_code(lang: str) -> str:
    """Map ``de`` or ``deu`` to the Tatoeba file code; InputError listing the codes present otherwise."""
    code = ISO1_TO_TATOEBA.get(lang.lower(), lang.lower())
    present = tatoeba_languages()
    if code not in present:
        raise InputError(f"tatoeba has no language {lang!r} (looked for {code!r}); available ISO 639-3 codes: "
                         f"{', '.join(present)} (ISO 639-1 codes are mapped where one exists)")
    return code


def load_tatoeba(lang: str) -> pl.DataFrame:
    """Tatoeba pairs ``lang`` -> English (``src`` in ``lang``, ``tgt`` English)."""
    code = tatoeba_code(lang)
    folder = data_root() / "tatoeba"
    src = read_lines(folder / f"tatoeba.{code}-eng.{code}")
    tgt = read_lines(folder / f"tatoeba.{code}-eng.eng")
    if len(src) != len(tgt):
        raise InputError(f"tatoeba {code}: {len(src)} {code} lines but {len(tgt)} English lines; "
                         "the files must be line-aligned")
    n = len(src)
    out_lang = TATOEBA_TO_ISO1.get(code, code)
    return frame({S.SRC: [s.strip() for s in src], S.TGT: [t.strip() for t in tgt],
                  S.SRC_LANG: [out_lang] * n, S.TGT_LANG: ["en"] * n}, S.BITEXT)
