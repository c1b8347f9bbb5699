"""STS-B test Spearman of trained models (final numbers only), full and elastic (depth x width).

    flock /tmp/embedforge-heavy.lock .venv/bin/python -m jobs.train --config configs/train_cosent_stsb.yaml
    flock /tmp/embedforge-heavy.lock .venv/bin/python -m benchmarks.train_quality \\
        all-minilm-l6-v2 runs/train-cosent-stsb/model [runs/train-2dmse/model]

For each model prints Spearman (x100) of cosine similarity on STS-B test at full depth and
width, at half depth (early exit after ``n/2`` layers) and at 64 dims, and the retention of
each relative to full. The test split is read here only, after training and checkpoint
selection (on dev) are done.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")


def spearman(embedder, s1: list[str], s2: list[str], gold, layers=None, dims=None) -> float:
    import numpy as np
    from scipy.stats import spearmanr

    a = embedder.encode(s1, dimensions=dims, layers=layers)
    b = embedder.encode(s2, dimensions=dims, layers=layers)
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return 100 * float(spearmanr(cos, gold).statistic)


def main() -> None:
    from actors.embedder import Embedder, EmbedderConfig
    from embedforge.data import DatasetSpec, load_dataset

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+", help="packaged names or model folders")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    test = load_dataset(DatasetSpec(source="stsb", split="test"))
    s1, s2, gold = test["sentence1"].to_list(), test["sentence2"].to_list(), test["score"].to_numpy()
    for name in args.models:
        emb = Embedder(EmbedderConfig(model=name, torch_threads=args.threads, batch_size=128))
        full = spearman(emb, s1, s2, gold)
        half = spearman(emb, s1, s2, gold, layers=max(1, emb.num_layers // 2))
        d64 = spearman(emb, s1, s2, gold, dims=64)
        print(f"{name}: STS-B test Spearman full {full:.2f} | half depth ({emb.num_layers // 2} layers) "
              f"{half:.2f} ({half / full:.1%}) | 64 dims {d64:.2f} ({d64 / full:.1%})")


if __name__ == "__main__":
    main()
