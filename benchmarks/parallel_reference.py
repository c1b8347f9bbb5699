"""Write STS-B train with its DeepL translations as a committed output in the synthesize layout.

    .venv/bin/python -m benchmarks.parallel_reference --lang de --limit 600 --output runs/deepl-de-600

``stsb_multi_mt`` translates STS-B row by row (DeepL), so row i of the English and the German file
is one parallel pair of pairs. The output holds what the synthesize stage writes for a translated
scored pair (``sentence1``/``sentence2`` in ``--lang``, their English originals in
``source_sentence1``/``source_sentence2``, the English score, ``kind: scored_pairs``): a reference
("what if the translator were DeepL") that trains through exactly the same config as synthesized
data, e.g. ``objective: {kind: multilingual_distill}`` or ``kind: scored_pairs`` with CoSENT.
Train and dev splits only.
"""

from __future__ import annotations

import argparse


def reference_table(lang: str, split: str, limit: int | None):
    """English and ``lang`` STS-B rows side by side (alignment checked by the cross-lingual loader)."""
    import pyarrow as pa

    from embedforge.data import DatasetSpec, load_dataset

    if split == "test":
        raise SystemExit("--split test: test splits are for final evaluation only; use train or dev")
    en_x = load_dataset(DatasetSpec(source="stsb_crosslingual", split=split, lang="en", lang2=lang))
    x_en = load_dataset(DatasetSpec(source="stsb_crosslingual", split=split, lang=lang, lang2="en"))
    n = min(limit or en_x.height, en_x.height)
    return pa.table({
        "sentence1": x_en["sentence1"].to_list()[:n], "sentence2": en_x["sentence2"].to_list()[:n],
        "score": pa.array(en_x["score"].to_list()[:n], pa.float32()),
        "lang1": [lang] * n, "lang2": [lang] * n,
        "source_sentence1": en_x["sentence1"].to_list()[:n], "source_sentence2": x_en["sentence2"].to_list()[:n],
        "kind": ["scored_pairs"] * n, "source": [f"stsb_multi_mt:{split}"] * n, "target_lang": [lang] * n,
    })


def write_reference(output: str, lang: str, split: str = "train", limit: int | None = None) -> dict:
    from embedforge.storage import ShardedWriter

    table = reference_table(lang, split, limit)
    writer = ShardedWriter(output)
    writer.write("part-0", {"data": table})
    return writer.finish({"kind": "synthesize", "reference": "stsb_multi_mt (DeepL)", "lang": lang, "split": split,
                          "rows": table.num_rows})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lang", default="de")
    parser.add_argument("--split", default="train", choices=["train", "dev"])
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    manifest = write_reference(args.output, args.lang, args.split, args.limit)
    print(f"{args.output}: {manifest['rows']} rows ({args.lang}, {args.split})")


if __name__ == "__main__":
    main()
