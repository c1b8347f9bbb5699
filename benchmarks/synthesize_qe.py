"""QE of synthesized translations against DeepL references (``stsb_multi_mt`` **dev** only).

Gemma-3-270M (two-example few-shot prompts, greedy, the pipeline's prompts and max_tokens)
translates the English sentences of ``stsb_multi_mt`` dev pairs into de, fr, es, zh. The
translations go through the pipeline's own QE code (``qe_batch`` for the text checks,
multilingual-e5-small embeddings, ``rows.assemble`` for the embedding checks within the shard),
once with the old QE (character length ratio in [0.5, 2], cosine >= 0.8, no margin, no pair
check) and once with the current defaults. A translation counts as kept when its row is kept
(that is what training sees). Reported per language and QE: rows kept, corpus chrF (sacrebleu
chrF2) of kept and of quarantined translations against the DeepL references, and the share of
kept translations whose sentence chrF is below 30.

Two disjoint halves of dev: ``tune`` (pairs ``n .. 2n-1``) prints the distributions the
thresholds were chosen from (``--qe-tune``); ``report`` (pairs ``0 .. n-1``) gives the table.
Translations are cached in ``--qe-cache`` (JSON), so the table can be recomputed without the LLM.

Run: ``python -m benchmarks.synthesize --only qe --qe-pairs 50`` (add ``--qe-tune`` for the
tuning half's distributions).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

QE_LANGS = ("de", "fr", "es", "zh")


def dev_pairs(lang: str, start: int, n: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]], list[float]]:
    """(English pairs, DeepL pairs, scores) of stsb_multi_mt dev rows start .. start+n-1."""
    from embedforge.data import DatasetSpec, load_dataset

    en = load_dataset(DatasetSpec(source="stsb_multi_mt", split="dev", lang="en"))
    ref = load_dataset(DatasetSpec(source="stsb_multi_mt", split="dev", lang=lang))
    sl = slice(start, start + n)
    src = list(zip(en["sentence1"].to_list()[sl], en["sentence2"].to_list()[sl], strict=True))
    tgt = list(zip(ref["sentence1"].to_list()[sl], ref["sentence2"].to_list()[sl], strict=True))
    return src, tgt, en["score"].to_list()[sl]


def translate_all(model: str, langs, halves: dict[str, tuple[int, int]], cache: Path) -> dict:
    """{half: {lang: {"src": [[s1, s2]...], "ref": ..., "hyp": ..., "tokens": ..., "max_tokens": ...}}}, cached."""
    data = json.loads(cache.read_text()) if cache.exists() else {}
    todo = [(h, lang) for h in halves for lang in langs if lang not in data.get(h, {})]
    if not todo:
        return data
    from actors.llm_engine import LLMEngine, LLMEngineConfig
    from embedforge.models import resolve_model
    from workflows.synthesize import prompts as P

    engine = LLMEngine(LLMEngineConfig(model=resolve_model(model), dtype="auto", max_model_len=512,
                                       num_threads=os.cpu_count()))
    print(f"engine dtype {engine.dtype}")
    for half, lang in todo:
        src, ref, scores = dev_pairs(lang, *halves[half])
        flat = [s for pair in src for s in pair]
        examples = P.few_shot_examples(lang)
        prompts = [P.few_shot_prompt(s, lang, examples) for s in flat]
        n_tok = [len(engine.tokenizer.encode(s, add_special_tokens=False)) for s in flat]
        max_tokens = [P.max_tokens_for(n, 2.0, 16) for n in n_tok]
        t0 = time.perf_counter()
        outs = engine.generate(prompts, max_tokens=max_tokens, stop=["\n"])
        print(f"  {half} {lang}: {len(flat)} sentences in {time.perf_counter() - t0:.1f}s")
        data.setdefault(half, {})[lang] = {
            "src": [list(p) for p in src], "ref": [list(p) for p in ref], "scores": scores,
            "generated": [o["text"] for o in outs], "tokens": [len(o["token_ids"]) for o in outs],
            "max_tokens": max_tokens, "source_tokens": n_tok}
        cache.write_text(json.dumps(data, ensure_ascii=False))
    return data


class _Scorer:
    """The pipeline's QE pieces, with the encoder and the translation tokenizer loaded once."""

    def __init__(self, model: str, qe):
        from transformers import AutoTokenizer

        from actors.embedder import Embedder
        from embedforge.models import resolve_model

        self.tokenizer = AutoTokenizer.from_pretrained(resolve_model(model))
        self.embedder = Embedder({"model": qe.encoder, "prompt": qe.encoder_prompt, "num_cpus": os.cpu_count()})

    def count_tokens(self, texts):
        return [len(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]] if texts else []

    def translations(self, lang: str, d: dict, qe, generated: list[str] | None = None):
        """The pipeline's translation table (QE stage columns + embeddings) for one language and half."""
        import polars as pl

        from workflows.synthesize.stages import qe_batch

        flat = [s for pair in d["src"] for s in pair]
        gen = generated if generated is not None else d["generated"]
        seen, idx = set(), []
        for i, s in enumerate(flat):  # unique sentences, as the pipeline translates them
            if s not in seen:
                seen.add(s)
                idx.append(i)
        batch = {"text": [flat[i] for i in idx], "lang": [lang] * len(idx), "generated_text": [gen[i] for i in idx],
                 "num_generated_tokens": [d["tokens"][i] if generated is None else 1 for i in idx],
                 "max_tokens": [d["max_tokens"][i] for i in idx],
                 "num_source_tokens": [d["source_tokens"][i] for i in idx]}
        from workflows.synthesize import prompts as P

        cleaned = [P.clean_completion(str(g)) for g in batch["generated_text"]]
        emb = self.embedder.encode(batch["text"] + cleaned)
        n = len(idx)
        batch.update({"source_embedding": emb[:n], "translation_embedding": emb[n:],
                      "cosine": np.sum(emb[:n] * emb[n:], axis=1)})
        return pl.from_arrow(qe_batch(batch, qe.model_dump(), self.count_tokens))


def assemble_half(scorer: _Scorer, lang: str, d: dict, qe, generated: list[str] | None = None):
    """One half's rows through ``rows.assemble`` with ``qe`` as one shard (the margin's pool): kept, quarantine."""
    import polars as pl

    from workflows.synthesize import rows as R

    n = len(d["src"])
    rows = pl.DataFrame({"sentence1": [p[0] for p in d["src"]], "sentence2": [p[1] for p in d["src"]],
                         "score": [float(s) for s in d["scores"]], "lang1": ["en"] * n, "lang2": ["en"] * n},
                        schema={"sentence1": pl.String, "sentence2": pl.String, "score": pl.Float32,
                                "lang1": pl.String, "lang2": pl.String})
    rows = rows.with_row_index(R.ROW_ID).with_columns(pl.col(R.ROW_ID).cast(pl.Int64))
    bad = pl.DataFrame(schema={R.ROW_ID: pl.Int64, R.BAD_COLUMN: pl.String, "reason": pl.String, "raw": pl.String})
    table = R.InputTable("dev", "scored_pairs", rows, bad)
    shard = R.plan_shards([table], [lang], max(1, n))[0]
    return R.assemble(table, shard, scorer.translations(lang, d, qe, generated), "stsb_multi_mt", qe)


def assess(scorer: _Scorer, lang: str, d: dict, qe) -> tuple[list[bool], list[str]]:
    """(kept flag, cleaned translation) per sentence of the half, in order (s1, s2 of each pair)."""
    from workflows.synthesize import prompts as P

    kept, _ = assemble_half(scorer, lang, d, qe)
    kept_ids = set(kept["row_id"].to_list())
    flags = [i in kept_ids for i in range(len(d["src"])) for _ in (0, 1)]
    return flags, [P.clean_completion(g) for g in d["generated"]]


def qe_stats(flags: list[bool], hyp: list[str], ref: list[str]) -> dict:
    import sacrebleu

    def corpus(ids):
        return sacrebleu.corpus_chrf([hyp[i] for i in ids], [[ref[i] for i in ids]]).score if ids else float("nan")

    kept = [i for i, k in enumerate(flags) if k]
    rejected = [i for i, k in enumerate(flags) if not k]
    low = [i for i in kept if sacrebleu.sentence_chrf(hyp[i], [ref[i]]).score < 30]
    return {"sentences": len(flags), "kept": len(kept), "chrf_kept": corpus(kept), "chrf_quarantined": corpus(rejected),
            "kept_low_share": len(low) / len(kept) if kept else float("nan"), "chrf_all": corpus(range(len(flags)))}


def old_qe():
    """The QE before margin, pair consistency and token lengths (its defaults then)."""
    from workflows.synthesize.config import QEConfig

    return QEConfig(length_unit="chars", min_length_ratio=0.5, max_length_ratio=2.0, min_cosine=0.8, margin=False,
                    pair_consistency=False)


def tune(scorer: _Scorer, data: dict, langs) -> None:
    """Distributions on the tuning half the defaults were chosen from (see docs/synthesize.md)."""
    import sacrebleu

    from workflows.synthesize import prompts as P
    from workflows.synthesize.config import QEConfig

    # keeps every row (thresholds out of reach) and records each measurement
    probe = QEConfig(min_length_ratio=1e-3, max_length_ratio=1e3, min_cosine=-1, min_margin=1e-3, max_pair_delta=2.0,
                     max_copy_similarity=1.0, min_lang_prob=0.0, max_repeated_ngram=1000, margin_min_pool=2)
    ref_ratio, ref_delta, ref_margin, rows = [], [], [], []
    for lang in langs:
        d = data["tune"][lang]
        refs = [s for pair in d["ref"] for s in pair]
        # DeepL references as if they were the model's output: what correct translations measure
        ref_ratio += scorer.translations(lang, d, probe, generated=refs)["length_ratio"].to_list()
        kept_ref, _ = assemble_half(scorer, lang, d, probe, generated=refs)
        ref_delta += (kept_ref["pair_cosine"] - kept_ref["pair_source_cosine"]).abs().to_list()
        ref_margin += kept_ref["margin_sentence1"].to_list() + kept_ref["margin_sentence2"].to_list()
        kept_hyp, _ = assemble_half(scorer, lang, d, probe)
        flat = [s for pair in d["src"] for s in pair]
        gen = {s: P.clean_completion(g) for s, g in zip(flat, d["generated"], strict=True)}
        ref_of = {s: r for s, r in zip(flat, refs, strict=True)}
        for row in kept_hyp.iter_rows(named=True):
            for c in ("sentence1", "sentence2"):
                src = row[f"source_{c}"]
                rows.append({"chrf": sacrebleu.sentence_chrf(gen[src], [ref_of[src]]).score,
                             "cosine": row[f"cosine_{c}"], "margin": row[f"margin_{c}"],
                             "ratio": row[f"length_ratio_{c}"]})
    pct = [0.5, 1, 5, 50, 95, 99, 99.5]
    print(f"DeepL references (correct translations), tuning half, {', '.join(langs)}:")
    print("  token length ratio: " + ", ".join(f"p{p}={np.percentile(ref_ratio, p):.2f}" for p in pct))
    print("  |pair delta|: " + ", ".join(f"p{p}={np.percentile(ref_delta, p):.3f}" for p in pct))
    print("  margin: " + ", ".join(f"p{p}={np.percentile(ref_margin, p):.3f}" for p in pct))
    bad = np.array([r["chrf"] < 30 for r in rows])
    cos, mar = np.array([r["cosine"] for r in rows]), np.array([r["margin"] for r in rows])
    print(f"Gemma translations, tuning half: {len(rows)} sentences, {bad.mean():.1%} with chrF < 30")
    best = None
    for c in np.arange(0.70, 0.905, 0.01):
        for m in np.arange(0.95, 1.1001, 0.005):
            rej = (cos < c) | (mar < m)
            j = rej[bad].mean() - rej[~bad].mean()
            if best is None or j > best[0]:
                best = (j, c, m)
    for m in (None, 0.98, 1.0, 1.02, 1.04):
        for c in (0.75, 0.8):
            rej = (cos < c) | ((mar < m) if m else np.zeros_like(bad))
            print(f"  cosine >= {c:.2f}" + (f", margin >= {m:.3f}" if m else "") +
                  f": rejects {rej[bad].mean():.1%} of chrF<30, {rej[~bad].mean():.1%} of the rest "
                  f"(Youden J {rej[bad].mean() - rej[~bad].mean():.3f})")
    print(f"  best Youden J {best[0]:.3f} at cosine >= {best[1]:.2f}, margin >= {best[2]:.3f}")


def bench_qe(model: str, n_pairs: int, langs=QE_LANGS, cache: str | None = None, do_tune: bool = False) -> dict:
    from workflows.synthesize.config import QEConfig

    cache_path = Path(cache or f"/tmp/embedforge-qe-cache-{n_pairs}.json")
    halves = {"report": (0, n_pairs)}
    if do_tune:
        halves["tune"] = (n_pairs, n_pairs)
    data = translate_all(model, langs, halves, cache_path)
    new = QEConfig()
    scorer = _Scorer(model, new)
    if do_tune:
        tune(scorer, data, langs)
    results = {}
    print(f"QE on stsb_multi_mt dev pairs 0..{n_pairs - 1} ({2 * n_pairs} sentences per language), "
          f"DeepL references; a translation is kept when its row is kept")
    print("| lang | QE | kept / sentences | chrF kept | chrF quarantined | kept with chrF < 30 |")
    print("|---|---|---|---|---|---|")
    for lang in langs:
        d = data["report"][lang]
        refs = [s for pair in d["ref"] for s in pair]
        for name, qe in (("old", old_qe()), ("new", new)):
            flags, hyp = assess(scorer, lang, d, qe)
            r = results.setdefault(lang, {})[name] = qe_stats(flags, hyp, refs)
            print(f"| {lang} | {name} | {r['kept']} / {r['sentences']} | {r['chrf_kept']:.1f} | "
                  f"{r['chrf_quarantined']:.1f} | {r['kept_low_share']:.1%} |")
    return results
