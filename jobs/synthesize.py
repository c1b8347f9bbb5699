"""Translate NLI/STS training data into other languages: ``python -m jobs.synthesize --config configs/synthesize.yaml``.

Also runs on a cluster: ``ray job submit --working-dir . -- python -m jobs.synthesize --config ...``.
"""

from __future__ import annotations

import sys

from embedforge.config import run_job
from workflows.pipeline.stages import SYNTHESIZE
from workflows.synthesize.config import SynthesizeConfig


def run(config: SynthesizeConfig) -> int:
    result = SYNTHESIZE.run(config).result.model_dump()
    manifest = result["manifest"]
    print(f"synthesize: {config.translation.model} -> {', '.join(config.target_langs)}; output {result['output']}")
    for lang, c in manifest["counts"].items():
        print(f"  {lang}: rows_in {c['rows_in']}, kept {c['kept']}, quarantined {c['quarantined']} "
              f"(malformed {c['malformed']})")
    print(f"  shards written this run: {len(result['shards_written'])} of {len(manifest['shards'])}")
    report = result.get("report") or {}
    if report.get("summary"):
        import polars as pl

        with pl.Config(tbl_cols=-1, tbl_width_chars=200):
            print(pl.DataFrame(report["summary"]))
    files = report.get("files", manifest.get("report", {}))
    for name, path in (files or {}).items():
        print(f"  {name}: {path}")
    return 0


def main(argv=None) -> int:
    return run_job(SynthesizeConfig, run, argv, check=SYNTHESIZE.check)


if __name__ == "__main__":
    sys.exit(main())
