"""Hub datasets (``hf:org/name`` or ``hf:org/name:config``) through Hugging Face ``datasets``.

Where a network exists, the usual hub names work with the same :class:`DatasetSpec` as the
offline copies, e.g. ``source: "hf:sentence-transformers/stsb"``, ``kind: scored_pairs``. The
``datasets`` package is optional (not a project dependency); without it the loader says how to
install it. Columns must already carry the canonical names (the sentence-transformers hub
datasets do: ``sentence1/sentence2/score``, ``anchor/positive/negative``); missing language
columns are filled from the spec. Rows are checked like any other table.
"""

from __future__ import annotations

import logging

import pyarrow as pa

from embedforge import schemas as S
from embedforge.data.table import LoadResult, check_rows, kind_schema
from embedforge.errors import InputError

log = logging.getLogger(__name__)

HUB_PREFIX = "hf:"
HUB_SPLITS = {"train": "train", "dev": "validation", "test": "test"}
_LANG_COLUMNS = {S.LANG1: 0, S.LANG2: 1, S.LANG: 0, S.SRC_LANG: 0, S.TGT_LANG: 1}


def parse_hub_source(source: str) -> tuple[str, str | None]:
    """``hf:org/name[:config]`` -> (``org/name``, config or None)."""
    body = source[len(HUB_PREFIX):]
    name, _, config = body.partition(":")
    if not name:
        raise InputError(f"{source!r}: expected hf:org/name or hf:org/name:config")
    return name, config or None


def load_hub(source: str, kind: str, split: str, langs: tuple[str, str]) -> LoadResult:
    """Load one split of a hub dataset into ``kind``'s canonical columns."""
    try:
        import datasets
    except ImportError:
        raise InputError(f"source {source!r} needs the Hugging Face `datasets` package: pip install datasets "
                         "(or use an offline dataset name or a Parquet/JSONL URI)") from None
    name, config = parse_hub_source(source)
    schema = kind_schema(kind)
    try:
        ds = datasets.load_dataset(name, config, split=HUB_SPLITS[split])
    except Exception as e:  # the hub raises many unrelated types (network, missing split, auth)
        raise InputError(f"cannot load {name!r} split {HUB_SPLITS[split]!r} from the hub: {e}") from e
    table: pa.Table = ds.data.table if hasattr(ds.data, "table") else ds.with_format("arrow")[:]
    for column, which in _LANG_COLUMNS.items():
        if column in schema.names and column not in table.column_names:
            table = table.append_column(column, pa.array([langs[which]] * table.num_rows, pa.string()))
    S.require_columns(table.column_names, schema.names, f"{source} ({kind})")
    return check_rows(list(enumerate(table.select(schema.names).to_pylist(), start=1)), schema)
