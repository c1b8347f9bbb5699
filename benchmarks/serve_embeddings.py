"""Embeddings serving: this server vs Infinity vs in-process SentenceTransformer.encode.

For the same model folder and the same sentences (STS-B dev, one sentence per request), measures
sentences/s and client-side p50/p99 latency at several concurrencies against

  (a) this server (Ray Serve app from workflows.serve, one model replica), in each ``--topologies``
      (split: ingress -> model deployment; fused: one deployment), fused / split printed too,
  (b) Infinity (`infinity_emb v2`, from a separate virtual environment: --infinity-bin),
  (c) SentenceTransformer.encode in this process (the throughput limit; no HTTP),

run one after the other (never side by side), and prints ratios against (b) and (c), plus the
speedup of ``layers`` = half depth over full depth (server and in-process).

    flock /tmp/embedforge-heavy.lock .venv/bin/python benchmarks/serve_embeddings.py \\
        --infinity-bin /tmp/infinity-venv/bin/infinity_emb
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

KEY = "bench-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sentences(n: int) -> list[str]:
    from embedforge.data import DatasetSpec, load_dataset

    df = load_dataset(DatasetSpec(source="stsb", split="dev"))
    uniq = list(dict.fromkeys(df["sentence1"].to_list() + df["sentence2"].to_list()))
    return uniq[:n]


async def load_test(url: str, texts: list[str], concurrency: int, n_requests: int, model: str,
                    headers: dict[str, str], extra: dict | None = None) -> dict[str, float]:
    """``n_requests`` single-sentence requests, ``concurrency`` at a time; client-side timings."""
    import httpx

    latencies: list[float] = []
    errors = 0
    queue = list(range(n_requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        async def worker() -> None:
            nonlocal errors
            while queue:
                i = queue.pop()
                body = {"model": model, "input": [texts[i % len(texts)]], **(extra or {})}
                t0 = time.perf_counter()
                r = await client.post(url, json=body, headers=headers)
                latencies.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    errors += 1

        # warm-up (not timed)
        await client.post(url, json={"model": model, "input": texts[:4], **(extra or {})}, headers=headers)
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    lat = np.array(latencies) * 1000
    return {"sent_per_s": n_requests / wall, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "errors": errors}


def run_levels(name: str, url: str, texts, levels, requests_per_level, model, headers, extra=None):
    out = {}
    for c in levels:
        n = max(requests_per_level, 4 * c)
        out[c] = asyncio.run(load_test(url, texts, c, n, model, headers, extra))
        r = out[c]
        print(f"  {name:<10} c={c:<3} {r['sent_per_s']:8.1f} sent/s  p50 {r['p50_ms']:7.1f} ms  "
              f"p99 {r['p99_ms']:7.1f} ms  errors {r['errors']}", flush=True)
    return out


def bench_in_process(model_path: str, texts: list[str], threads: int) -> dict[str, float]:
    import torch

    from actors.embedder import Embedder, EmbedderConfig

    torch.set_num_threads(threads)
    emb = Embedder(EmbedderConfig(model=model_path, torch_threads=threads, batch_size=32))
    emb.encode(texts[:32])
    out = {}
    for layers in (None, emb.num_layers // 2):
        t0 = time.perf_counter()
        emb.encode(texts, layers=layers)
        out[layers or emb.num_layers] = len(texts) / (time.perf_counter() - t0)
    out["half"] = emb.num_layers // 2
    out["full"] = emb.num_layers
    return out


def bench_ours(model_path, texts, levels, n, threads, topology="split"):
    from ray import serve

    from embedforge.config import build_config
    from embedforge.runtime import RayConfig, init_ray
    from workflows.serve.app import build_app
    from workflows.serve.config import ServeConfig
    from workflows.serve.run import wait_healthy

    os.environ["EMBEDFORGE_API_KEYS"] = KEY  # before Ray starts: replicas inherit it
    init_ray(RayConfig(num_cpus=4, object_store_memory_mb=256, include_dashboard=False,
                       temp_dir=tempfile.mkdtemp(prefix="ef-bench-", dir="/tmp")))
    port = free_port()
    cfg = build_config(ServeConfig, {
        "models": {"minilm": model_path},
        "batching": {"max_batch_size": 64, "batch_wait_timeout_s": 0.005, "encode_batch_size": 64},
        "autoscaling": {"min_replicas": 1, "max_replicas": 1},
        "model_deployment": {"num_cpus": 1, "torch_threads": threads, "max_ongoing_requests": 128},
        "http": {"host": "127.0.0.1", "port": port},
        "topology": topology,
    })
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(cfg), name="bench", route_prefix="/", blocking=False)
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, 300)
        url, headers = f"{base}/v1/embeddings", {"Authorization": f"Bearer {KEY}"}
        res = run_levels(f"ours {topology}", url, texts, levels, n, "minilm", headers)
        half = run_levels(f"{topology} L/2", url, texts, [16], n, "minilm", headers, {"layers": 3})
        return res, half
    finally:
        serve.shutdown()
        import ray

        ray.shutdown()


def bench_infinity(binary, model_path, texts, levels, n):
    port = free_port()
    log = open(Path(tempfile.gettempdir()) / "infinity-bench.log", "w")
    proc = subprocess.Popen([binary, "v2", "--model-id", model_path, "--served-model-name", "minilm",
                             "--host", "127.0.0.1", "--port", str(port), "--engine", "torch", "--device", "cpu",
                             "--batch-size", "64", "--url-prefix", "/v1", "--no-model-warmup"],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        import httpx

        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"infinity exited with {proc.returncode}; see {log.name}")
            try:  # /health lives at the root or under --url-prefix depending on the version
                if any(httpx.get(f"http://127.0.0.1:{port}{p}/health", timeout=2).status_code == 200
                       for p in ("", "/v1")):
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            raise RuntimeError(f"infinity not healthy after 300 s; see {log.name}")
        return run_levels("infinity", f"http://127.0.0.1:{port}/v1/embeddings", texts, levels, n, "minilm", {})
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="all-minilm-l6-v2", help="packaged name or model folder")
    p.add_argument("--sentences", type=int, default=1000, help="distinct sentences (in-process run uses all)")
    p.add_argument("--requests", type=int, default=256, help="requests per concurrency level (at least 4 x c)")
    p.add_argument("--levels", default="1,16,64", help="concurrency levels")
    p.add_argument("--threads", type=int, default=2, help="torch threads (in-process and model replica)")
    p.add_argument("--infinity-bin", default=shutil.which("infinity_emb"), help="infinity_emb executable")
    p.add_argument("--topologies", default="split,fused", help="this server's topologies to measure, in order")
    args = p.parse_args(argv)

    from embedforge.models import resolve_model

    model_path = resolve_model(args.model)
    texts = sentences(args.sentences)
    levels = [int(x) for x in args.levels.split(",")]
    print(f"model {model_path}, {len(texts)} sentences, one sentence per request, levels {levels}", flush=True)

    inproc = bench_in_process(model_path, texts, args.threads)
    print(f"  in-process full depth: {inproc[inproc['full']]:.1f} sent/s; "
          f"layers={inproc['half']}: {inproc[inproc['half']]:.1f} sent/s", flush=True)
    runs = {t: bench_ours(model_path, texts, levels, args.requests, args.threads, t)
            for t in args.topologies.split(",")}
    ours, ours_half = runs[next(iter(runs))]
    infinity, infinity_error = None, None
    if args.infinity_bin:
        try:
            infinity = bench_infinity(args.infinity_bin, model_path, texts, levels, args.requests)
        except Exception as e:  # noqa: BLE001 - report the reason and keep the other results
            infinity_error = f"{type(e).__name__}: {e}"
    else:
        infinity_error = "infinity_emb not found (pass --infinity-bin)"

    limit = inproc[inproc["full"]]
    print("\nsummary (sentences/s; ratios: ours / infinity, ours / in-process; p99 ours vs infinity)")
    for c in levels:
        o = ours[c]
        line = f"  c={c:<3} ours {o['sent_per_s']:7.1f}  /in-process {o['sent_per_s'] / limit:5.2f}x"
        if infinity:
            i = infinity[c]
            line += (f"  infinity {i['sent_per_s']:7.1f}  ours/infinity {o['sent_per_s'] / i['sent_per_s']:5.2f}x"
                     f"  p99 {o['p99_ms']:.0f} vs {i['p99_ms']:.0f} ms")
        print(line)
    if infinity_error:
        print(f"  infinity unavailable: {infinity_error}")
    if {"split", "fused"} <= set(runs):
        for c in levels:
            s, f = runs["split"][0][c], runs["fused"][0][c]
            print(f"  c={c:<3} fused {f['sent_per_s']:7.1f} vs split {s['sent_per_s']:7.1f}: "
                  f"{f['sent_per_s'] / s['sent_per_s']:5.2f}x  /in-process {f['sent_per_s'] / limit:5.2f}x  "
                  f"p99 {f['p99_ms']:.0f} vs {s['p99_ms']:.0f} ms")
    print(f"  layers={inproc['half']} vs {inproc['full']}: server c=16 "
          f"{ours_half[16]['sent_per_s'] / ours[16]['sent_per_s']:.2f}x" if 16 in ours else "",
          f" in-process {inproc[inproc['half']] / limit:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
