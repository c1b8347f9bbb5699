"""Storage addressed by URI, and the atomic "write, then commit a manifest" protocol.

Plain paths and ``file://`` URIs are local; ``s3://bucket/key`` goes through
``pyarrow.fs.S3FileSystem``. The S3 endpoint, region and credentials come from the standard
AWS environment (``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, ``AWS_REGION``,
``AWS_ACCESS_KEY_ID`` ...) or the AWS config files; none are ever logged.

Commit protocol (hand-written: no library offers it for both local files and S3):

* a dataset (or model folder) is a prefix holding data files and, last, ``_MANIFEST.json``;
  readers go through :func:`read_manifest`, so a prefix without one is never seen as complete;
* sharded writers commit each shard with a marker ``_shards/<name>.json`` written after the
  shard's data, so a rerun can skip shards that finished (:class:`ShardedWriter`).
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from embedforge.errors import StorageError

log = logging.getLogger(__name__)

MANIFEST = "_MANIFEST.json"
SHARDS = "_shards"


def s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def s3_filesystem() -> pafs.S3FileSystem:
    """An S3FileSystem from the standard AWS environment (endpoint override for S3-compatible servers)."""
    kwargs: dict[str, Any] = {}
    endpoint = s3_endpoint()
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def resolve(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """Map a URI to ``(filesystem, path)``; the path is what that filesystem expects."""
    text = str(uri)
    if text.startswith("s3://"):
        path = text[len("s3://"):].rstrip("/")
        if not path:
            raise StorageError(f"{text!r}: an S3 URI needs a bucket, e.g. s3://bucket/prefix")
        return s3_filesystem(), path
    if text.startswith("file://"):
        text = urlparse(text).path
    elif "://" in text:
        raise StorageError(f"{text!r}: unsupported scheme; use a local path, file:// or s3://")
    return pafs.LocalFileSystem(), str(Path(text).expanduser().absolute())


def join(uri: str, *parts: str) -> str:
    out = str(uri).rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def _ensure_parent(fs: pafs.FileSystem, path: str) -> None:
    parent = path.rsplit("/", 1)[0]
    if parent and isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(parent, recursive=True)


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object. Local writes go through a temp file and an atomic rename."""
    fs, path = resolve(uri)
    _ensure_parent(fs, path)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        os.replace(tmp, path)
    else:
        with fs.open_output_stream(path) as f:
            f.write(data)


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError as e:
        raise StorageError(f"{uri}: not found") from e
    except OSError as e:
        raise StorageError(f"{uri}: cannot read ({e})") from e


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def list_files(uri: str) -> list[str]:
    """Relative paths of every file below ``uri`` (recursive), sorted."""
    fs, base = resolve(uri)
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.NotFound:
        return []
    sel = pafs.FileSelector(base, recursive=True, allow_not_found=True)
    return sorted(i.path[len(base):].lstrip("/") for i in fs.get_file_info(sel) if i.type == pafs.FileType.File)


def delete(uri: str) -> None:
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


# ---------------------------------------------------------------- manifests


def manifest_uri(prefix: str) -> str:
    return join(prefix, MANIFEST)


def is_committed(prefix: str) -> bool:
    return exists(manifest_uri(prefix))


def commit(prefix: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write ``_MANIFEST.json`` last: from now on ``prefix`` is visible as complete."""
    body = {"committed_at": time.time(), **manifest}
    write_json(manifest_uri(prefix), body)
    return body


def read_manifest(prefix: str) -> dict[str, Any]:
    if not is_committed(prefix):
        raise StorageError(
            f"{prefix}: no {MANIFEST}; the output is incomplete (a run was interrupted?) - rerun the job that writes it"
        )
    return read_json(manifest_uri(prefix))


def uncommit(prefix: str) -> None:
    """Remove the manifest first (so the prefix stops looking complete), then the rest."""
    if is_committed(prefix):
        delete(manifest_uri(prefix))
    delete(prefix)


# ---------------------------------------------------------------- parquet


def write_parquet(uri: str, table: pa.Table) -> None:
    fs, path = resolve(uri)
    _ensure_parent(fs, path)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        pq.write_table(table, tmp, filesystem=fs)
        os.replace(tmp, path)
    else:
        pq.write_table(table, path, filesystem=fs)


def read_parquet(uri: str) -> pa.Table:
    fs, path = resolve(uri)
    try:
        return pq.read_table(path, filesystem=fs)
    except FileNotFoundError as e:
        raise StorageError(f"{uri}: not found") from e


def read_committed_table(prefix: str, key: str = "files") -> pa.Table:
    """Concatenate exactly the Parquet files a committed manifest lists under ``key``."""
    manifest = read_manifest(prefix)
    files = manifest.get(key, [])
    tables = [read_parquet(join(prefix, f)) for f in files]
    if not tables:
        schema = manifest.get("schema")
        return pa.table({}) if schema is None else pa.schema([]).empty_table()
    return pa.concat_tables(tables, promote_options="default")


# ---------------------------------------------------------------- sharded writes


@dataclass
class ShardedWriter:
    """Write named shards under ``prefix``; each is committed by a marker written after it.

    A rerun with the same prefix sees which shards are done (:meth:`done`) and redoes only
    the rest; :meth:`finish` writes the manifest listing every shard's files.
    """

    prefix: str

    def _marker(self, name: str) -> str:
        return join(self.prefix, SHARDS, f"{name}.json")

    def done(self, name: str) -> bool:
        return exists(self._marker(name))

    def completed(self) -> dict[str, dict[str, Any]]:
        out = {}
        for rel in list_files(join(self.prefix, SHARDS)):
            if rel.endswith(".json"):
                out[rel[:-5]] = read_json(join(self.prefix, SHARDS, rel))
        return out

    def write(self, name: str, tables: dict[str, pa.Table], meta: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write ``{subdir: table}`` as ``subdir/<name>.parquet`` each, then the shard marker."""
        files = {}
        for sub, table in tables.items():
            rel = f"{sub}/{name}.parquet"
            write_parquet(join(self.prefix, rel), table)
            files[sub] = {"file": rel, "rows": table.num_rows}
        record = {"name": name, "files": files, **(meta or {})}
        write_json(self._marker(name), record)
        return record

    def finish(self, manifest: dict[str, Any]) -> dict[str, Any]:
        shards = self.completed()
        by_sub: dict[str, list[str]] = {}
        for name in sorted(shards):
            for sub, f in shards[name]["files"].items():
                by_sub.setdefault(sub, []).append(f["file"])
        return commit(self.prefix, {**manifest, "shards": sorted(shards), "outputs": by_sub})


def read_output(prefix: str, sub: str) -> pa.Table:
    """Read one committed sharded output (``sub`` e.g. ``"data"`` or ``"quarantine"``)."""
    manifest = read_manifest(prefix)
    files = manifest.get("outputs", {}).get(sub, [])
    tables = [read_parquet(join(prefix, f)) for f in files]
    if not tables:
        raise StorageError(f"{prefix}: the manifest lists no {sub!r} files")
    return pa.concat_tables(tables, promote_options="default")


# ---------------------------------------------------------------- folders (models)


def upload_dir(local_dir: str | Path, uri: str) -> None:
    """Copy a local folder to ``uri`` (any scheme), then commit a manifest listing its files."""
    local_dir = Path(local_dir)
    files = sorted(p for p in local_dir.rglob("*") if p.is_file() and p.name != MANIFEST)
    fs, base = resolve(uri)
    for p in files:
        rel = p.relative_to(local_dir).as_posix()
        dest = f"{base}/{rel}"
        _ensure_parent(fs, dest)
        pafs.copy_files(str(p), dest, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    commit(uri, {"kind": "folder", "files": [p.relative_to(local_dir).as_posix() for p in files]})


def download_dir(uri: str, local_dir: str | Path) -> Path:
    """Copy a committed folder to ``local_dir`` (only the files its manifest lists)."""
    manifest = read_manifest(uri)
    local_dir = Path(local_dir)
    fs, base = resolve(uri)
    for rel in manifest["files"]:
        dest = local_dir / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(f"{base}/{rel}", str(dest), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    (local_dir / MANIFEST).write_text(json.dumps(manifest))
    return local_dir
