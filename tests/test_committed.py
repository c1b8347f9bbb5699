"""The one commit-and-resume rule every stage runs under (embedforge.committed), on real storage."""

from __future__ import annotations

import pytest

from embedforge import storage
from embedforge.committed import committed_run, read_record
from embedforge.errors import ConfigError, StorageError


def _stage(output: str, value: str, calls: list[str]):
    def run():
        calls.append(value)
        assert not storage.is_committed(output), "the manifest must be withdrawn while the stage runs"
        assert read_record(output)["status"] == "running"
        storage.write_json(storage.join(output, "data.json"), {"value": value})
        storage.commit(output, {"kind": "demo", "files": ["data.json"]})
        return {"output": output, "value": value}
    return run


def test_skip_refuse_redo_overwrite(tmp_path):
    out, calls = str(tmp_path / "out"), []
    first = committed_run("demo", out, "h1", _stage(out, "a", calls))
    assert first.status == "ran" and first.result == {"output": out, "value": "a"}
    assert read_record(out) == {"stage": "demo", "content_hash": "h1", "status": "committed", "result": first.result}
    # same hash: skipped, the recorded result, nothing runs
    again = committed_run("demo", out, "h1", _stage(out, "b", calls))
    assert again.status == "skipped" and again.result["value"] == "a" and calls == ["a"]
    # another config: refused, never returned as its result
    with pytest.raises(ConfigError, match=r"committed by another config \(hash h1; this config's hash is h2\)"):
        committed_run("demo", out, "h2", _stage(out, "b", calls))
    assert storage.read_json(storage.join(out, "data.json"))["value"] == "a" and calls == ["a"]
    # a redo stage replaces it; overwrite does so for any stage
    redone = committed_run("demo", out, "h2", _stage(out, "b", calls), on_conflict="redo")
    assert redone.status == "ran" and storage.read_json(storage.join(out, "data.json"))["value"] == "b"
    over = committed_run("demo", out, "h3", _stage(out, "c", calls), overwrite=True)
    assert over.status == "ran" and read_record(out)["content_hash"] == "h3" and calls == ["a", "b", "c"]


def test_a_partial_run_of_another_config_is_caught_before_commit(tmp_path):
    out, calls = str(tmp_path / "out"), []

    def crash():
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        committed_run("demo", out, "h1", crash)
    assert read_record(out)["status"] == "running" and not storage.is_committed(out)
    with pytest.raises(ConfigError, match="partly written by another config"):
        committed_run("demo", out, "h2", _stage(out, "b", calls))
    # the same config resumes
    assert committed_run("demo", out, "h1", _stage(out, "a", calls)).status == "ran" and calls == ["a"]


def test_outputs_committed_without_a_record_are_judged_by_the_manifest(tmp_path):
    out, calls = str(tmp_path / "old"), []
    storage.commit(out, {"kind": "demo", "config_hash": "full-hash"})
    with pytest.raises(ConfigError, match="committed by another config"):
        committed_run("demo", out, "h1", _stage(out, "a", calls))
    ran = committed_run("demo", out, "h1", _stage(out, "a", calls), legacy_hashes=("full-hash",))
    assert ran.status == "ran" and read_record(out)["content_hash"] == "h1"


def test_a_run_that_does_not_commit_is_an_error(tmp_path):
    out = str(tmp_path / "out")
    with pytest.raises(StorageError, match="without committing"):
        committed_run("demo", out, "h1", lambda: {"output": out})
