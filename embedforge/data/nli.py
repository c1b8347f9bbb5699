"""NLI triplets (``anchor, positive, negative, lang``) from labeled premise/hypothesis pairs.

A triplet is built for pairs that share a premise: ``anchor`` = the premise, ``positive`` = a
hypothesis it entails, ``negative`` = a hypothesis it contradicts (neutral pairs are unused).
``pairing="all"`` emits every (entailed, contradicted) combination for a premise; ``"first"``
emits one triplet per premise from the first entailed and the first contradicted hypothesis in
file order. Output order is deterministic: premises in order of first appearance, then
hypotheses in file order. Duplicate hypotheses for one premise are counted once.

Sources (offline; SNLI/MultiNLI train sets are not available):

* SNLI dev/test from e-SNLI (``s1.*``, ``s2.*``, ``labels.*``, line-aligned, tokenized),
  detokenized with :func:`detokenize`;
* XNLI dev / labeled test (``dev-xx.tsv``, ``test-labeled-xx.tsv``) in 15 languages;
* XGLUE German NLI (``xglue-de-{train,dev,test}.tsv``). Its train/dev are drawn from XNLI dev and
  its test is XNLI test, so never mix xglue_nli with xnli de in one experiment;
* SICK, both directions: (A, B, entailment_AB) and (B, A, entailment_BA).
"""

from __future__ import annotations

import re
from typing import Literal

import polars as pl

from embedforge import schemas as S
from embedforge.data._files import data_file, read_lines
from embedforge.data.sts import read_sick
from embedforge.errors import InputError

Pairing = Literal["all", "first"]
LABELS = ("entailment", "neutral", "contradiction")
XNLI_LANGS = ("ar", "bg", "de", "el", "en", "es", "fr", "hi", "ru", "sw", "th", "tr", "ur", "vi", "zh")
PREMISE, HYPOTHESIS, LABEL = "premise", "hypothesis", "label"

# PTB-style tokenization in SNLI: punctuation and clitics split off by spaces, `` and '' for quotes.
_DETOK_RULES = [
    (re.compile(r"``\s*(.*?)\s*''"), r'"\1"'),
    (re.compile(r"\s+(n't|'s|'m|'re|'ve|'d|'ll)\b", re.IGNORECASE), r"\1"),
    (re.compile(r"\s+([.,;:!?%)\]}])"), r"\1"),
    (re.compile(r"([(\[{$])\s+"), r"\1"),
    (re.compile(r"\s{2,}"), " "),
]


def detokenize(text: str) -> str:
    """Undo SNLI's tokenization: ``"does n't"`` -> ``"doesn't"``, ``"packages ."`` -> ``"packages."``.

    Hand-written because the usual Moses detokenizer (sacremoses) is not a dependency; SNLI uses
    only a few PTB conventions (space before ``. , ; : ! ? % )``, split clitics ``n't 's 'm 're
    've 'd 'll``, ````` ``...'' ````` quotes), and these rules cover exactly those.
    """
    out = text.strip()
    for pattern, repl in _DETOK_RULES:
        out = pattern.sub(repl, out)
    return out


def triplets_from_pairs(pairs: pl.DataFrame, lang: str, pairing: Pairing = "all") -> pl.DataFrame:
    """Build triplets from a ``premise, hypothesis, label`` table (see the module docstring)."""
    S.require_columns(pairs.columns, [PREMISE, HYPOTHESIS, LABEL], "NLI pairs")
    df = pairs.with_row_index("_row").unique(subset=[PREMISE, HYPOTHESIS, LABEL], keep="first", maintain_order=True)
    first_seen = df.group_by(PREMISE, maintain_order=True).agg(pl.col("_row").min().alias("_premise_order"))
    ent = df.filter(pl.col(LABEL) == "entailment").select(PREMISE, pl.col(HYPOTHESIS).alias(S.POSITIVE),
                                                          pl.col("_row").alias("_pos_row"))
    con = df.filter(pl.col(LABEL) == "contradiction").select(PREMISE, pl.col(HYPOTHESIS).alias(S.NEGATIVE),
                                                             pl.col("_row").alias("_neg_row"))
    if pairing == "first":
        ent = ent.sort("_pos_row").unique(subset=[PREMISE], keep="first")
        con = con.sort("_neg_row").unique(subset=[PREMISE], keep="first")
    out = (ent.join(con, on=PREMISE, how="inner")
           .join(first_seen, on=PREMISE, how="left")
           .sort(["_premise_order", "_pos_row", "_neg_row"]))
    return out.select(pl.col(PREMISE).alias(S.ANCHOR), S.POSITIVE, S.NEGATIVE,
                      pl.lit(lang).alias(S.LANG))


def _check_labels(df: pl.DataFrame, what: str) -> pl.DataFrame:
    unknown = df.filter(~pl.col(LABEL).is_in(LABELS))
    if unknown.height:
        raise InputError(f"{what}: unknown labels {sorted(set(unknown[LABEL].to_list()))}; expected {LABELS}")
    return df


def snli_pairs(split: str) -> pl.DataFrame:
    """SNLI ``dev`` or ``test`` pairs from e-SNLI, detokenized."""
    files = [data_file("snli_esnli", f"{name}.{split}") for name in ("s1", "s2", "labels")]
    s1, s2, labels = (read_lines(p) for p in files)
    if not len(s1) == len(s2) == len(labels):
        raise InputError(f"SNLI {split}: s1/s2/labels have {len(s1)}/{len(s2)}/{len(labels)} lines; "
                         "they must be line-aligned")
    df = pl.DataFrame({PREMISE: [detokenize(x) for x in s1], HYPOTHESIS: [detokenize(x) for x in s2],
                       LABEL: [x.strip() for x in labels]})
    return _check_labels(df, f"SNLI {split}")


def _read_tsv(folder: str, name: str) -> pl.DataFrame:
    path = data_file(folder, name)
    rows = []
    for lineno, line in enumerate(read_lines(path), start=1):
        fields = line.split("\t")
        if len(fields) != 3:
            raise InputError(f"{path}:{lineno}: expected 3 tab-separated fields (premise, hypothesis, label), "
                             f"got {len(fields)}")
        rows.append([f.strip() for f in fields])
    df = pl.DataFrame(rows, schema=[PREMISE, HYPOTHESIS, LABEL], orient="row")
    return _check_labels(df, str(path))


def xnli_pairs(lang: str, split: str) -> pl.DataFrame:
    """XNLI ``dev`` (``dev-xx.tsv``) or labeled ``test`` (``test-labeled-xx.tsv``) pairs."""
    if lang not in XNLI_LANGS:
        raise InputError(f"xnli has no language {lang!r}; available: {', '.join(XNLI_LANGS)}")
    return _read_tsv("xnli", f"dev-{lang}.tsv" if split == "dev" else f"test-labeled-{lang}.tsv")


def xglue_pairs(split: str) -> pl.DataFrame:
    """XGLUE German NLI ``train``/``dev``/``test`` pairs."""
    return _read_tsv("xnli", f"xglue-de-{split}.tsv")


def sick_pairs(split: str) -> pl.DataFrame:
    """SICK pairs in both directions, labels lower-cased from entailment_AB / entailment_BA."""
    df = read_sick().filter(pl.col(S.SPLIT) == split)

    def direction(first: str, second: str, column: str) -> pl.DataFrame:
        return df.select(pl.col(first).alias(PREMISE), pl.col(second).alias(HYPOTHESIS),
                         pl.col(column).str.extract(r"_(entails|neutral|contradicts)_", 1)
                         .replace_strict({"entails": "entailment", "neutral": "neutral",
                                          "contradicts": "contradiction"}, default=None).alias(LABEL))

    both = pl.concat([direction("sentence_A", "sentence_B", "entailment_AB"),
                      direction("sentence_B", "sentence_A", "entailment_BA")])
    return _check_labels(both, f"SICK {split}")


def load_nli_triplets(source: str, lang: str, split: str, pairing: Pairing = "all") -> pl.DataFrame:
    """Triplets for ``source`` in ``snli``, ``xnli``, ``xglue_nli``, ``sick``."""
    if source == "snli":
        pairs = snli_pairs(split)
    elif source == "xnli":
        pairs = xnli_pairs(lang, split)
    elif source == "xglue_nli":
        pairs = xglue_pairs(split)
    elif source == "sick":
        pairs = sick_pairs(split)
    else:
        raise InputError(f"no NLI pairs for source {source!r}; use snli, xnli, xglue_nli or sick")
    return triplets_from_pairs(pairs, lang, pairing)
