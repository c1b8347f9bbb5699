"""One commit-and-resume rule for every stage's output prefix.

A stage writes its files under ``output`` and commits them with ``_MANIFEST.json``
(:mod:`embedforge.storage`). :func:`committed_run` wraps the function that does that and adds a
record ``_STAGE.json`` beside the manifest: the stage's name, the content hash of the config that
writes the prefix, its status (``running`` / ``committed``) and, once committed, the stage's result.

The rule, the same for every stage:

* committed with the same hash -> skip: return the recorded result, run nothing;
* committed (or being written) with another hash -> ``refuse`` (a :class:`ConfigError` naming
  both hashes and the fix) or ``redo`` (delete the prefix and run again), chosen per stage;
  stale results are never returned;
* ``overwrite=True`` -> delete the prefix and run again;
* otherwise -> withdraw the manifest (the prefix stops looking complete), record ``running``
  with this hash (so a resumed run of another config is caught even before anything is
  committed), run, check that the run committed the prefix, record ``committed`` and the result.

A prefix committed before records existed (a manifest without ``_STAGE.json``) is judged by the
manifest's own ``config_hash`` (which some stages wrote as the full config hash, ``legacy_hashes``):
equal -> the stage runs (its own shard markers and resume make that cheap); different or absent
-> the conflict rule.

Hand-written: this is the project's storage protocol (local paths and S3 alike), which no
library provides.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from embedforge import storage
from embedforge.errors import ConfigError, StorageError

log = logging.getLogger(__name__)

RECORD = "_STAGE.json"
OnConflict = Literal["refuse", "redo"]


@dataclass(frozen=True)
class CommittedRun:
    """What :func:`committed_run` did: ``status`` is ``ran`` or ``skipped``; ``result`` is JSON data."""

    result: dict[str, Any]
    status: Literal["ran", "skipped"]
    content_hash: str
    output: str


def record_uri(output: str) -> str:
    return storage.join(output, RECORD)


def read_record(output: str) -> dict[str, Any] | None:
    """The stage record of ``output`` (None when there is none)."""
    uri = record_uri(output)
    return storage.read_json(uri) if storage.exists(uri) else None


def _json(result: Any) -> dict[str, Any]:
    return json.loads(json.dumps(result, default=str))


def committed_hash(output: str) -> str | None:
    """The content hash that wrote ``output``: the record's, else the manifest's ``config_hash``."""
    record = read_record(output)
    if record is not None:
        return record.get("content_hash")
    if storage.is_committed(output):
        return storage.read_manifest(output).get("config_hash")
    return None


def committed_run(
    name: str,
    output: str,
    content_hash: str,
    run: Callable[[], dict[str, Any]],
    on_conflict: OnConflict = "refuse",
    overwrite: bool = False,
    legacy_hashes: tuple[str, ...] = (),
) -> CommittedRun:
    """Run ``run()`` under the rule of the module docstring; ``run`` must commit ``output``."""
    if overwrite:
        log.info("%s: overwrite=true, deleting %s", name, output)
        storage.uncommit(output)
    record = read_record(output)
    committed = storage.is_committed(output)
    if record is not None:
        other = record.get("content_hash")
    elif committed:
        other = storage.read_manifest(output).get("config_hash")
        if other in legacy_hashes:
            other = content_hash
    else:
        other = content_hash  # nothing recorded: a fresh prefix or an old partial run; the stage resumes
    if other != content_hash:
        state = "committed" if committed else "partly written"
        if on_conflict == "refuse":
            raise ConfigError(
                f"{name}: output {output} is {state} by another config (hash {other}; this config's hash is "
                f"{content_hash}); write to a new output, delete it, or set overwrite=true where the stage has it")
        log.warning("%s: output %s is %s by another config (hash %s); redoing it for hash %s",
                    name, output, state, other, content_hash)
        storage.uncommit(output)
        record, committed = None, False
    elif committed and record is not None and record.get("status") == "committed":
        log.info("%s: %s is committed by this config (hash %s); skipped", name, output, content_hash)
        return CommittedRun(record.get("result") or {}, "skipped", content_hash, output)
    # Withdraw the manifest first: while the stage runs, its prefix must not look complete.
    storage.delete(storage.manifest_uri(output))
    storage.write_json(record_uri(output), {"stage": name, "content_hash": content_hash, "status": "running"})
    result = _json(run())
    if not storage.is_committed(output):
        raise StorageError(f"{name}: the run returned without committing {output} (no {storage.MANIFEST})")
    storage.write_json(record_uri(output), {"stage": name, "content_hash": content_hash, "status": "committed",
                                            "result": result})
    return CommittedRun(result, "ran", content_hash, output)
