"""Where the offline datasets live, and small helpers every source family shares.

The data root is, in order: the ``EMBEDFORGE_DATA`` environment variable, ``<repo>/../shared/data``
(CI keeps the datasets beside its clone), ``<repo>/shared/data``. It is looked up when a loader
runs, never on import.
"""

from __future__ import annotations

import os
from pathlib import Path

import polars as pl
import pyarrow as pa

from embedforge.errors import InputError, StorageError

DATA_ENV = "EMBEDFORGE_DATA"
_REPO = Path(__file__).resolve().parents[2]


def candidate_roots() -> list[Path]:
    return [_REPO.parent / "shared" / "data", _REPO / "shared" / "data"]


def data_root() -> Path:
    """The folder holding the offline datasets (see the module docstring for the search order)."""
    env = os.environ.get(DATA_ENV)
    if env:
        root = Path(env).expanduser()
        if not root.is_dir():
            raise StorageError(f"{DATA_ENV}={env!r} is not a folder; point it at the offline datasets "
                               f"folder (the one holding stsbenchmark/, xnli/, ...) or unset it")
        return root
    for root in candidate_roots():
        if root.is_dir():
            return root
    tried = ", ".join(str(p) for p in candidate_roots())
    raise StorageError(f"offline datasets not found: looked in {tried}; set {DATA_ENV} to the datasets folder")


def data_file(*parts: str) -> Path:
    """A file below the data root; InputError naming the expected path if it is missing."""
    path = data_root().joinpath(*parts)
    if not path.is_file():
        raise InputError(f"dataset file {str(path)!r} is missing; check {DATA_ENV} "
                         f"(currently {os.environ.get(DATA_ENV)!r}) or restore the file")
    return path


def read_lines(path: Path) -> list[str]:
    """Lines of a UTF-8 text file without their line ends (a missing final newline is fine).

    Splits on ``\n`` only: ``str.splitlines`` would also split on U+0085, U+2028 and friends,
    which occur inside sentences (XNLI Greek has them) and would break line alignment.
    """
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def frame(columns: dict[str, list], schema: pa.Schema) -> pl.DataFrame:
    """A polars DataFrame with exactly ``schema``'s columns, in order and with its types."""
    table = pa.table({name: columns[name] for name in schema.names}, schema=schema)
    return pl.from_arrow(table)

