"""Embeddings serving: this server vs Infinity vs in-process SentenceTransformer.encode.

For the same model folder and the same sentences (STS-B dev), measures sentences/s and
client-side p50/p99 latency at each concurrency (``--levels``) and request size
(``--per-request`` sentences a request) against

  (a) this server (the Ray Serve app of workflows.serve, one model replica), for each
      ``--servers`` entry ``topology[+mode]``: topology ``fused`` (one deployment) or ``split``
      (ingress -> model deployment); mode ``proxy`` (Ray Serve's Python HTTP proxy, the
      default) or ``haproxy`` (Ray Serve's HAProxy front with direct ingress to the replicas,
      ``serve.http_front: haproxy``). Each runs in a fresh process with a fresh Ray;
  (b) Infinity (`infinity_emb v2`, from a separate virtual environment: --infinity-bin), started
      once and idle while (a) is measured,
  (c) SentenceTransformer.encode in this process (the throughput limit; no HTTP), before and after,

never two measured at once: each cell runs ``--rounds`` times, ours then Infinity back to back,
so both see the same load on a shared machine; the summary gives medians and the median of the
per-round ratios, against (b) and (c). For (a) it
also prints where the time goes, from the ``Server-Timing`` header of every answer (means, ms):
``outside`` (client latency minus the time inside the app: HTTP, the Serve proxy or HAProxy,
Serve's dispatch to the replica), ``hop`` (the app's call of the model minus the model's own
time: the ingress -> model hop, ~0 when fused), ``app`` (validation and JSON), ``tokenize``,
``queue`` (waiting for a forward pass: batching) and ``forward``.

    python3.11 -m venv /tmp/infinity-venv
    /tmp/infinity-venv/bin/pip install "torch==2.13.0+cpu" "infinity-emb[server,torch]==0.0.78"
    .venv/bin/python benchmarks/serve_embeddings.py --infinity-bin /tmp/infinity-venv/bin/infinity_emb
"""

from __future__ import annotations

import argparse
import asyncio
import json
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
PHASES = ("outside", "hop", "app", "tokenize", "queue", "forward")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sentences(n: int) -> list[str]:
    from embedforge.data import DatasetSpec, load_dataset

    df = load_dataset(DatasetSpec(source="stsb", split="dev"))
    uniq = list(dict.fromkeys(df["sentence1"].to_list() + df["sentence2"].to_list()))
    return uniq[:n]


def parse_server_timing(value: str | None) -> dict[str, float]:
    out = {}
    for part in (value or "").split(","):
        name, _, dur = part.strip().partition(";dur=")
        if dur:
            out[name] = float(dur)
    return out


def phases_of(latency_ms: float, timing: dict[str, float]) -> dict[str, float]:
    inner = timing.get("tokenize", 0) + timing.get("queue", 0) + timing.get("forward", 0)
    return {"outside": latency_ms - timing["app"], "hop": max(0.0, timing["model"] - timing.get("replica", inner)),
            "app": timing["app"] - timing["model"], "tokenize": timing.get("tokenize", 0),
            "queue": timing.get("queue", 0), "forward": timing.get("forward", 0)}


async def load_test(url: str, texts: list[str], concurrency: int, n_requests: int, per_request: int, model: str,
                    headers: dict[str, str], extra: dict | None = None) -> dict[str, float]:
    """``n_requests`` requests of ``per_request`` sentences, ``concurrency`` at a time; client-side timings."""
    import httpx

    latencies: list[float] = []
    phases: list[dict[str, float]] = []
    errors = 0
    queue = list(range(n_requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        async def worker() -> None:
            nonlocal errors
            while queue:
                i = queue.pop()
                batch = [texts[(i * per_request + j) % len(texts)] for j in range(per_request)]
                body = {"model": model, "input": batch, **(extra or {})}
                t0 = time.perf_counter()
                r = await client.post(url, json=body, headers=headers)
                ms = (time.perf_counter() - t0) * 1000
                latencies.append(ms)
                if r.status_code != 200:
                    errors += 1
                timing = parse_server_timing(r.headers.get("server-timing"))
                if "app" in timing:
                    phases.append(phases_of(ms, timing))

        # warm-up (not timed)
        await client.post(url, json={"model": model, "input": texts[:per_request], **(extra or {})}, headers=headers)
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    lat = np.array(latencies)
    out = {"sent_per_s": n_requests * per_request / wall, "p50_ms": float(np.percentile(lat, 50)),
           "p99_ms": float(np.percentile(lat, 99)), "errors": errors}
    if phases:
        out["phases_ms"] = {p: float(np.mean([x[p] for x in phases])) for p in PHASES}
    return out


def run_cell(name: str, url: str, texts, size: int, c: int, requests_per_level: int, model: str,
             headers: dict) -> dict:
    n = max(requests_per_level // size, 2 * c)
    r = asyncio.run(load_test(url, texts, c, n, size, model, headers))
    line = (f"  {name:<18} {size:>2}/req c={c:<3} {r['sent_per_s']:8.1f} sent/s  p50 {r['p50_ms']:7.1f} ms  "
            f"p99 {r['p99_ms']:7.1f} ms  errors {r['errors']}")
    if "phases_ms" in r:
        line += "  | " + " ".join(f"{p} {v:.1f}" for p, v in r["phases_ms"].items())
    print(line, flush=True)
    return r


def run_grid(name: str, url: str, texts, levels, sizes, requests_per_level, model, headers,
             infinity_url: str | None = None, rounds: int = 1) -> dict:
    """Every (sentences a request, concurrency) cell ``rounds`` times; with ``infinity_url`` each of our
    runs is followed at once by Infinity's on the same cell, so both see the same machine load."""
    out = {}
    for size in sizes:
        for c in levels:
            cell = out.setdefault(f"{size}x{c}", {"ours": [], "infinity": []})
            for _ in range(rounds):
                cell["ours"].append(run_cell(name, url, texts, size, c, requests_per_level, model, headers))
                if infinity_url:
                    cell["infinity"].append(run_cell("infinity", infinity_url, texts, size, c, requests_per_level,
                                                     "minilm", {}))
    return out


def bench_in_process(model_path: str, texts: list[str], threads: int) -> float:
    import torch

    from actors.embedder import Embedder, EmbedderConfig

    torch.set_num_threads(threads)
    emb = Embedder(EmbedderConfig(model=model_path, torch_threads=threads, batch_size=32))
    emb.encode(texts[:32])
    t0 = time.perf_counter()
    emb.encode(texts)
    return len(texts) / (time.perf_counter() - t0)


def serve_child(spec: dict) -> dict:
    """In a fresh process: start Ray and Serve for one ``topology+mode``, run the grid, return results."""
    from ray import serve

    from embedforge.config import build_config
    from embedforge.runtime import RayConfig, init_ray
    from workflows.serve.app import build_app
    from workflows.serve.config import ServeConfig
    from workflows.serve.run import serve_environment, wait_healthy

    topology, _, mode = spec["server"].partition("+")
    port = free_port()
    cfg = build_config(ServeConfig, {
        "models": {"minilm": spec["model_path"]},
        "batching": {"max_batch_size": 64, "encode_batch_size": 64},
        "autoscaling": {"min_replicas": 1, "max_replicas": 1},
        "ingress_autoscaling": {"min_replicas": 1, "max_replicas": 1},
        "model_deployment": {"num_cpus": 1, "torch_threads": spec["threads"]},
        "http": {"host": "127.0.0.1", "port": port},
        "topology": topology,
        "serve": {"http_front": mode or "proxy"},
    })
    os.environ["EMBEDFORGE_API_KEYS"] = KEY  # before Ray starts: replicas inherit it
    os.environ.update(serve_environment(cfg))
    init_ray(RayConfig(num_cpus=4, object_store_memory_mb=256, include_dashboard=False,
                       temp_dir=tempfile.mkdtemp(prefix="ef-bench-", dir="/tmp")))
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(cfg), name="bench", route_prefix="/", blocking=False)
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, 300)
        url, headers = f"{base}/v1/embeddings", {"Authorization": f"Bearer {KEY}"}
        texts = spec["texts"]
        return run_grid(f"ours {spec['server']}", url, texts, spec["levels"], spec["sizes"], spec["requests"],
                        "minilm", headers, spec.get("infinity_url"), spec.get("rounds", 1))
    finally:
        serve.shutdown()
        import ray

        ray.shutdown()


def bench_ours(server: str, model_path: str, texts, levels, sizes, n, threads, infinity_url=None,
               rounds=1) -> dict:
    spec = {"server": server, "model_path": model_path, "texts": texts, "levels": levels, "sizes": sizes,
            "requests": n, "threads": threads, "infinity_url": infinity_url, "rounds": rounds}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    out = Path(f.name).with_suffix(".out.json")
    proc = subprocess.run([sys.executable, __file__, "--serve-child", f.name, str(out)], timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"server {server} benchmark exited with {proc.returncode}")
    return json.loads(out.read_text())


class InfinityServer:
    """``infinity_emb v2`` on the same model folder, started once; idle while this server is measured."""

    def __init__(self, binary: str, model_path: str, threads: int):
        self.port = free_port()
        self.log = open(Path(tempfile.gettempdir()) / "infinity-bench.log", "w")
        self.proc = subprocess.Popen(
            [binary, "v2", "--model-id", model_path, "--served-model-name", "minilm", "--host", "127.0.0.1",
             "--port", str(self.port), "--engine", "torch", "--device", "cpu", "--batch-size", "64",
             "--url-prefix", "/v1", "--no-model-warmup"],
            stdout=self.log, stderr=subprocess.STDOUT,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)})
        self.url = f"http://127.0.0.1:{self.port}/v1/embeddings"

    def wait_ready(self, timeout_s: float = 300) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"infinity exited with {self.proc.returncode}; see {self.log.name}")
            try:  # /health lives at the root or under --url-prefix depending on the version
                if any(httpx.get(f"http://127.0.0.1:{self.port}{p}/health", timeout=2).status_code == 200
                       for p in ("", "/v1")):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise RuntimeError(f"infinity not healthy after {timeout_s:.0f} s; see {self.log.name}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="all-minilm-l6-v2", help="packaged name or model folder")
    p.add_argument("--sentences", type=int, default=1000, help="distinct sentences (in-process run uses all)")
    p.add_argument("--requests", type=int, default=512, help="sentences per grid cell (at least 2 x c requests)")
    p.add_argument("--levels", default="16,64", help="concurrency levels")
    p.add_argument("--per-request", default="1,16", help="sentences per request")
    p.add_argument("--threads", type=int, default=2, help="torch threads (in-process, model replica, Infinity)")
    p.add_argument("--infinity-bin", default=shutil.which("infinity_emb"), help="infinity_emb executable")
    p.add_argument("--rounds", type=int, default=2, help="repetitions of each cell (ours then Infinity each time)")
    p.add_argument("--servers", default="fused,fused+haproxy,split",
                   help="this server's topology[+mode] entries to measure, in order; the first is compared")
    p.add_argument("--serve-child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_child:
        spec = json.loads(Path(args.serve_child[0]).read_text())
        Path(args.serve_child[1]).write_text(json.dumps(serve_child(spec)))
        return 0

    from embedforge.models import resolve_model

    model_path = resolve_model(args.model)
    texts = sentences(args.sentences)
    levels = [int(x) for x in args.levels.split(",")]
    sizes = [int(x) for x in args.per_request.split(",")]
    print(f"model {model_path}, {len(texts)} sentences, {sizes} sentences per request, levels {levels}", flush=True)

    limit = bench_in_process(model_path, texts, args.threads)
    print(f"  in-process encode: {limit:.1f} sent/s", flush=True)
    servers = args.servers.split(",")
    infinity, infinity_error = None, None
    if args.infinity_bin:
        try:
            infinity = InfinityServer(args.infinity_bin, model_path, args.threads)
            infinity.wait_ready()
        except Exception as e:  # noqa: BLE001 - report the reason and keep the other results
            infinity_error = f"{type(e).__name__}: {e}"
            if infinity is not None:
                infinity.stop()
            infinity = None
    else:
        infinity_error = "infinity_emb not found (pass --infinity-bin)"
    runs, failed = {}, {}
    try:
        for server in servers:
            try:
                runs[server] = bench_ours(server, model_path, texts, levels, sizes, args.requests, args.threads,
                                          infinity.url if infinity else None, args.rounds)
            except Exception as e:  # noqa: BLE001 - report the reason and keep the other results
                failed[server] = f"{type(e).__name__}: {e}"
    finally:
        if infinity is not None:
            infinity.stop()
    limit_end = bench_in_process(model_path, texts, args.threads)
    print(f"  in-process encode again: {limit_end:.1f} sent/s (ratios use the mean of both)", flush=True)
    limit = (limit + limit_end) / 2

    print("\nsummary (sentences/s, median over rounds; ours/infinity: median of the per-round ratios, each "
          "round measured back to back; p99 ours vs infinity)")
    for server, res in runs.items():
        for cell, r in res.items():
            size, c = cell.split("x")
            ours = float(np.median([x["sent_per_s"] for x in r["ours"]]))
            line = f"  {server:<14} {size:>2}/req c={c:<3} ours {ours:7.1f}  /in-process {ours / limit:5.2f}x"
            if r["infinity"]:
                inf = float(np.median([x["sent_per_s"] for x in r["infinity"]]))
                ratio = float(np.median([o["sent_per_s"] / i["sent_per_s"] for o, i in zip(r["ours"], r["infinity"])]))
                p99o = float(np.median([x["p99_ms"] for x in r["ours"]]))
                p99i = float(np.median([x["p99_ms"] for x in r["infinity"]]))
                line += f"  infinity {inf:7.1f}  ours/infinity {ratio:5.2f}x  p99 {p99o:.0f} vs {p99i:.0f} ms"
            print(line)
    if infinity_error:
        print(f"  infinity unavailable: {infinity_error}")
    for server, why in failed.items():
        print(f"  {server} failed: {why}")
    return 0 if runs else 1


if __name__ == "__main__":
    sys.exit(main())
