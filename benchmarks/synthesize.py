"""Synthesize benchmark: pipeline throughput vs raw vLLM vs transformers, and translation quality.

1. Throughput on the same prompts (few-shot translation prompts of STS-B **train** sentences)
   and the same model: generated tokens/s through the Ray Data pipeline (PromptStage +
   translation backend), through raw ``vllm.LLM.generate`` in one process, and through
   transformers' ``generate`` (greedy, stop at newline, batched with left padding). Times include
   what each path needs to produce its output from a loaded model; the pipeline's time also
   includes starting its engine actor (reported separately where measurable).
2. dtype (``--dtypes bfloat16,float32,auto``): translated sentences/s of the same prompts with
   the engine in each dtype, each in a fresh process (engine start excluded), and the ratios
   against bf16; the first lines name the CPU, its vector ISA and what ``auto`` picks on it.
3. Quality: chrF (sacrebleu) of the model's translations of ``stsb_multi_mt`` **dev** English
   sentences against the DeepL references for de, es, fr, and chrF of the QE-kept vs
   QE-rejected subsets (QE with the default thresholds and multilingual-e5-small cosine).

4. QE table (``--only qe`` alone; ``benchmarks/synthesize_qe.py``): the old and the current QE
   against DeepL references of ``stsb_multi_mt`` dev pairs (de, fr, es, zh): chrF of kept vs
   quarantined translations and the share of kept ones with chrF < 30.

Run: ``python -m benchmarks.synthesize --n-prompts 256 --hf-prompts 64 --chrf-n 100``;
the dtype part alone: ``python -m benchmarks.synthesize --only dtypes --dtype-prompts 32``.
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def train_sentences(n: int) -> list[str]:
    from embedforge.data import DatasetSpec, load_dataset

    df = load_dataset(DatasetSpec(source="stsb", split="train"))
    seen = list(dict.fromkeys(df["sentence1"].to_list()))
    return seen[:n]


def prompts_for(sentences, tokenizer, lang, factor, floor):
    from workflows.synthesize import prompts as P

    examples = P.few_shot_examples(lang)
    prompts = [P.few_shot_prompt(s, lang, examples) for s in sentences]
    n_tok = [len(tokenizer.encode(s, add_special_tokens=False)) for s in sentences]
    return prompts, [P.max_tokens_for(n, factor, floor) for n in n_tok]


def bench_pipeline(sentences, config, backend):
    import polars as pl
    import ray

    from embedforge.runtime import RayConfig, init_ray
    from workflows.synthesize.pipeline import translate_and_score

    init_ray(RayConfig(num_cpus=4, object_store_memory_mb=512, include_dashboard=False,
                       temp_dir=tempfile.mkdtemp(prefix="ef-bench-", dir="/tmp")))
    cfg = config.model_copy(update={"translation": config.translation.model_copy(update={"backend": backend}),
                                    "qe": config.qe.model_copy(update={"cosine": False})})
    df = pl.DataFrame({"text": sentences, "lang": ["de"] * len(sentences)})
    t0 = time.perf_counter()
    out = translate_and_score(df, cfg)
    wall = time.perf_counter() - t0
    ray.shutdown()
    return int(out["num_generated_tokens"].sum()), wall


def bench_raw_vllm(model_path, prompts, max_tokens, max_model_len):
    from actors.llm_engine import LLMEngine, LLMEngineConfig

    t0 = time.perf_counter()
    engine = LLMEngine(LLMEngineConfig(model=model_path, max_model_len=max_model_len))
    start = time.perf_counter() - t0
    from vllm import SamplingParams

    params = [SamplingParams(max_tokens=m, temperature=0.0, stop=["\n"]) for m in max_tokens]
    t0 = time.perf_counter()
    outs = engine.llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    return engine, sum(len(o.outputs[0].token_ids) for o in outs), wall, start


def bench_transformers(model_path, prompts, max_tokens, batch_size=16):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    tok = AutoTokenizer.from_pretrained(model_path, padding_side="left")
    from embedforge.hardware import resolve_dtype

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, resolve_dtype("auto"))).eval()
    newline = tok.encode("\n", add_special_tokens=False)
    tokens, t0 = 0, time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        batch = tok(prompts[i:i + batch_size], return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = model.generate(**batch, max_new_tokens=max(max_tokens[i:i + batch_size]), do_sample=False,
                                 stop_strings=["\n"], tokenizer=tok, pad_token_id=tok.pad_token_id)
        for row, limit in zip(out[:, batch["input_ids"].shape[1]:].tolist(), max_tokens[i:i + batch_size]):
            n = 0
            for t in row[:limit]:
                if t == tok.pad_token_id or t == tok.eos_token_id:
                    break
                n += 1
                if t in newline or "\n" in tok.decode([t]):
                    break
            tokens += n
    return tokens, time.perf_counter() - t0


def _one_dtype(model_path: str, dtype: str, n: int) -> None:
    """Child process: translate ``n`` STS-B train sentences with the engine in ``dtype``; print one JSON line."""
    import json

    from actors.llm_engine import LLMEngine, LLMEngineConfig
    from vllm import SamplingParams

    engine = LLMEngine(LLMEngineConfig(model=model_path, dtype=dtype, max_model_len=512, num_threads=os.cpu_count()))
    prompts, max_tokens = prompts_for(train_sentences(n), engine.tokenizer, "de", 2.0, 16)
    params = [SamplingParams(max_tokens=m, temperature=0.0, stop=["\n"]) for m in max_tokens]
    engine.llm.generate(prompts[:2], params[:2], use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outs = engine.llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    print("DTYPE_RESULT " + json.dumps({"asked": dtype, "resolved": engine.dtype, "sentences": len(prompts),
                                        "tokens": sum(len(o.outputs[0].token_ids) for o in outs), "wall_s": wall,
                                        "start_s": engine.start_seconds}), flush=True)


def bench_dtypes(model_path: str, dtypes: list[str], n: int) -> dict[str, dict]:
    """Each dtype in its own process (vLLM does not free an engine's memory reliably in-process)."""
    import json
    import subprocess
    import sys

    from embedforge import hardware

    print(f"machine: {hardware.describe()}")
    results = {}
    for dtype in dtypes:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.synthesize", "--model", model_path,
                               "--_one-dtype", dtype, "--dtype-prompts", str(n)],
                              capture_output=True, text=True, timeout=3600)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("DTYPE_RESULT ")), None)
        if line is None:
            raise RuntimeError(f"dtype {dtype} run failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
        r = results[dtype] = json.loads(line.removeprefix("DTYPE_RESULT "))
        print(f"dtype {dtype} (resolved {r['resolved']}): {r['sentences']} sentences in {r['wall_s']:.1f}s = "
              f"{r['sentences'] / r['wall_s']:.2f} sentences/s, {r['tokens'] / r['wall_s']:.1f} tok/s "
              f"(engine start {r['start_s']:.1f}s not included)")
    if "bfloat16" in results:
        base = results["bfloat16"]["sentences"] / results["bfloat16"]["wall_s"]
        for dtype, r in results.items():
            if dtype != "bfloat16":
                print(f"RATIO dtype {dtype} / bfloat16 = {r['sentences'] / r['wall_s'] / base:.2f}x sentences/s")
    return results


def bench_quality(engine, langs, n, config):
    import numpy as np
    import sacrebleu

    from actors.embedder import Embedder
    from embedforge.data import DatasetSpec, load_dataset
    from workflows.synthesize import prompts as P
    from workflows.synthesize import qe as Q

    en = load_dataset(DatasetSpec(source="stsb_multi_mt", split="dev", lang="en"))["sentence1"].to_list()
    idx = list(dict.fromkeys(range(len(en))))[:n]
    embedder = Embedder({"model": config.qe.encoder, "prompt": config.qe.encoder_prompt})
    t = config.translation
    results = {}
    for lang in langs:
        refs = load_dataset(DatasetSpec(source="stsb_multi_mt", split="dev", lang=lang))["sentence1"].to_list()
        src = [en[i] for i in idx]
        ref = [refs[i] for i in idx]
        prompts, max_tokens = prompts_for(src, engine.tokenizer, lang, t.max_tokens_factor, t.max_tokens_floor)
        outs = engine.generate(prompts, max_tokens=max_tokens, stop=["\n"])
        hyp = [P.clean_completion(o["text"]) for o in outs]
        emb = embedder.encode(src + hyp)
        cos = np.sum(emb[:len(src)] * emb[len(src):], axis=1)
        kept = [not Q.assess(s, h, lang, len(o["token_ids"]), m, config.qe, float(c))["reasons"]
                for s, h, o, m, c in zip(src, hyp, outs, max_tokens, cos)]
        k = [i for i, ok in enumerate(kept) if ok]
        r = [i for i, ok in enumerate(kept) if not ok]

        def chrf(ids):
            return sacrebleu.corpus_chrf([hyp[i] for i in ids], [[ref[i] for i in ids]]).score if ids else float("nan")

        results[lang] = {"chrf": chrf(range(len(hyp))), "kept": len(k), "rejected": len(r),
                         "chrf_kept": chrf(k), "chrf_rejected": chrf(r), "example": (src[0], hyp[0], ref[0])}
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--n-prompts", type=int, default=256)
    parser.add_argument("--hf-prompts", type=int, default=64, help="prompts for transformers (slow); tokens/s compared")
    parser.add_argument("--chrf-n", type=int, default=100)
    parser.add_argument("--langs", default="de,es,fr")
    parser.add_argument("--backends", default="engine", help="comma list of engine,ray_data_llm")
    parser.add_argument("--dtypes", default="bfloat16,float32,auto", help="engine dtypes compared (sentences/s)")
    parser.add_argument("--dtype-prompts", type=int, default=32, help="sentences translated per dtype")
    parser.add_argument("--only", choices=["all", "dtypes", "qe"], default="all", help="run one part only")
    parser.add_argument("--qe-pairs", type=int, default=50, help="QE table: stsb_multi_mt dev pairs per language")
    parser.add_argument("--qe-langs", default="de,fr,es,zh", help="QE table: languages")
    parser.add_argument("--qe-tune", action="store_true", help="QE table: also print the tuning half's distributions")
    parser.add_argument("--qe-cache", default=None, help="QE table: JSON cache of the translations")
    parser.add_argument("--_one-dtype", dest="one_dtype", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one_dtype:
        _one_dtype(args.model, args.one_dtype, args.dtype_prompts)
        return

    from embedforge.config import build_config
    from embedforge.models import resolve_model
    from workflows.synthesize.config import SynthesizeConfig

    model_path = resolve_model(args.model)
    if args.only == "qe":  # the QE table alone (benchmarks/synthesize_qe.py)
        from benchmarks.synthesize_qe import bench_qe

        bench_qe(args.model, args.qe_pairs, args.qe_langs.split(","), args.qe_cache, args.qe_tune)
        return
    if args.dtypes:
        bench_dtypes(model_path, args.dtypes.split(","), args.dtype_prompts)
    if args.only == "dtypes":
        return
    config = build_config(SynthesizeConfig, {
        "inputs": [{"source": "stsb", "split": "train"}], "target_langs": ["de"], "output": "/tmp/unused",
        "translation": {"model": model_path, "prompt_style": "few_shot", "batch_size": 64, "max_model_len": 512}})
    sentences = train_sentences(args.n_prompts)
    print(f"model {args.model}: {len(sentences)} few-shot de prompts (STS-B train sentences)")

    pipe = {}
    for backend in args.backends.split(","):
        tokens, wall = bench_pipeline(sentences, config, backend)
        pipe[backend] = (tokens, wall)
        print(f"pipeline[{backend}]: {tokens} tokens in {wall:.1f}s = {tokens / wall:.1f} tok/s (incl. actor start)")
        gc.collect()

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    prompts, max_tokens = prompts_for(sentences, tok, "de", config.translation.max_tokens_factor,
                                      config.translation.max_tokens_floor)
    engine, raw_tokens, raw_wall, raw_start = bench_raw_vllm(model_path, prompts, max_tokens, 512)
    raw_tps = raw_tokens / raw_wall
    print(f"raw vllm.LLM.generate: {raw_tokens} tokens in {raw_wall:.1f}s = {raw_tps:.1f} tok/s "
          f"(engine start {raw_start:.1f}s not included; incl. start {raw_tokens / (raw_wall + raw_start):.1f} tok/s)")
    for backend, (tokens, wall) in pipe.items():
        print(f"RATIO pipeline[{backend}] / raw vLLM = {tokens / wall / raw_tps:.2f}x "
              f"(both incl. engine start: {(tokens / wall) / (raw_tokens / (raw_wall + raw_start)):.2f}x)")

    quality = bench_quality(engine, args.langs.split(","), args.chrf_n, config)
    del engine
    gc.collect()
    hf_tokens, hf_wall = bench_transformers(model_path, prompts[:args.hf_prompts], max_tokens[:args.hf_prompts])
    hf_tps = hf_tokens / hf_wall
    print(f"transformers generate ({args.hf_prompts} prompts): {hf_tokens} tokens in {hf_wall:.1f}s = {hf_tps:.1f} tok/s")
    for backend, (tokens, wall) in pipe.items():
        print(f"RATIO pipeline[{backend}] / transformers = {tokens / wall / hf_tps:.2f}x")
    print(f"RATIO raw vLLM / transformers = {raw_tps / hf_tps:.2f}x")
    print(f"chrF on stsb_multi_mt dev (first {args.chrf_n} sentence1, DeepL references):")
    for lang, r in quality.items():
        print(f"  {lang}: chrF {r['chrf']:.1f}; QE kept {r['kept']} (chrF {r['chrf_kept']:.1f}), "
              f"rejected {r['rejected']} (chrF {r['chrf_rejected']:.1f}); e.g. {r['example'][1]!r}")
    from benchmarks.synthesize_qe import bench_qe

    bench_qe(args.model, args.qe_pairs, args.qe_langs.split(","), args.qe_cache, args.qe_tune)


if __name__ == "__main__":
    main()
