"""The data snapshot of a stage: a fingerprint of every dataset its config names.

A stage's key hashes its config *and* ``input_snapshot(config)``, so a rerun on the same config
but new data (a nightly drop overwritten in place, a rebuilt image with newer offline datasets)
gets a new key and runs, while stages whose inputs did not change keep their key and are reused.

What is fingerprinted, for each ``{"source": ...}`` (or ``"dataset": "<uri>"``) in the config:

* a committed prefix (has ``_MANIFEST.json``): the SHA-256 of its manifest, which lists its files;
* a single file (local, ``file://``, ``s3://``): the SHA-256 of its bytes;
* an offline dataset name (``stsb``, ``xnli``, ...): the SHA-256 over name, size and content of
  the files of its folder under the data root, narrowed to the dataset's split where the file
  names carry one (``sts-dev.csv``, ``s1.test``): a file that may be read is always included;
* ``hf:`` hub datasets: their name only (no revision is pinned; marked ``unpinned``).

Outputs of earlier stages under the pipeline's own root are skipped: their URIs already contain
the key of the stage that wrote them. Models are not fingerprinted (a model URI that changes
content in place is not detected). Written by hand: Ray Data and storage give no content
fingerprint of a dataset spec.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import pyarrow.fs as pafs

from embedforge import storage
from embedforge.data._files import data_root
from embedforge.data.spec import SOURCES, is_uri
from embedforge.errors import InputError

# Offline dataset name -> its folder under the data root (tests check every source is here).
SOURCE_FOLDERS: dict[str, str] = {
    "stsb": "stsbenchmark",
    "stsb_multi_mt": "stsb_multi_mt",
    "stsb_crosslingual": "stsb_multi_mt",
    "sick": "sick",
    "snli": "snli_esnli",
    "xnli": "xnli",
    "xglue_nli": "xnli",
    "tatoeba": "tatoeba",
    "xquad": "xquad",
    "cranfield": "cranfield",
    "gsm8k": "gsm8k",
}
SPLIT_TOKENS = ("train", "dev", "test")
_CHUNK = 1 << 20


def _sha256_stream(fs: pafs.FileSystem, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _split_of(name: str) -> set[str]:
    return {t for t in SPLIT_TOKENS if re.search(rf"(^|[^a-z]){t}([^a-z]|$)", name.lower())}


def folder_fingerprint(source: str, split: str | None) -> str:
    """SHA-256 over (relative path, size, content hash) of the files an offline source may read."""
    folder = data_root() / SOURCE_FOLDERS[source]
    if not folder.is_dir():
        raise InputError(f"input {source!r}: folder {str(folder)!r} is missing under the data root")
    digest = hashlib.sha256()
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    for path in files:
        rel = path.relative_to(folder).as_posix()
        splits = _split_of(rel)
        if split not in (None, "all") and splits and split not in splits:
            continue
        digest.update(f"{rel}\0{path.stat().st_size}\0".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def uri_fingerprint(uri: str) -> str:
    """SHA-256 of a committed prefix's manifest, else of the file's bytes."""
    if storage.is_committed(uri):
        return hashlib.sha256(storage.read_bytes(storage.manifest_uri(uri))).hexdigest()
    fs, path = storage.resolve(uri)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise InputError(f"input {uri!r}: neither a file nor a committed prefix (no {storage.MANIFEST}); "
                         f"check the URI or run the job that writes it")
    return _sha256_stream(fs, path)


def _dataset_refs(value: Any, split: str | None = None) -> list[tuple[str, str | None]]:
    """(source, split) of every dataset reference in nested config data."""
    found: list[tuple[str, str | None]] = []
    if isinstance(value, dict):
        split = value.get("split", split) if isinstance(value.get("split", split), str) else split
        source = value.get("source")
        if isinstance(source, str):
            found.append((source, split))
        dataset = value.get("dataset")
        if isinstance(dataset, str):
            found.append((dataset, split))
        for v in value.values():
            found.extend(_dataset_refs(v, split))
    elif isinstance(value, list):
        for v in value:
            found.extend(_dataset_refs(v, split))
    return found


def input_snapshot(stage_config: dict[str, Any], pipeline_root: str | None = None) -> dict[str, str]:
    """``{"<source>[<split>]": sha256}`` for every dataset ``stage_config`` (resolved, as JSON) names."""
    root = storage.join(pipeline_root, "") if pipeline_root else None
    out: dict[str, str] = {}
    for source, split in _dataset_refs({k: v for k, v in stage_config.items() if k not in ("output", "ray")}):
        if source.startswith("hf:"):
            out[source] = "unpinned"
        elif is_uri(source):
            if root and storage.join(source, "").startswith(root):
                continue  # an earlier stage's output: its key is in the URI
            out.setdefault(source, uri_fingerprint(source))
        elif source in SOURCES:
            label = f"{source}[{split or 'all'}]"
            if label not in out:
                out[label] = folder_fingerprint(source, split)
        # anything else is not a dataset reference (e.g. a `source` field of another meaning)
    return dict(sorted(out.items()))
