import pyarrow as pa
import pytest

from embedforge import storage
from embedforge.errors import StorageError


def _roundtrip(prefix: str):
    t = pa.table({"a": [1, 2, 3], "b": ["x", "y", "z"]})
    w = storage.ShardedWriter(prefix)
    assert not w.done("part-0000")
    w.write("part-0000", {"data": t.slice(0, 2), "quarantine": pa.table({"reason": ["bad"]})})
    # not committed yet: readers refuse it
    assert not storage.is_committed(prefix)
    with pytest.raises(StorageError, match="incomplete"):
        storage.read_output(prefix, "data")
    assert w.done("part-0000")
    w.write("part-0001", {"data": t.slice(2), "quarantine": pa.table({"reason": pa.array([], pa.string())})})
    m = w.finish({"rows_in": 3})
    assert m["shards"] == ["part-0000", "part-0001"]
    assert storage.read_output(prefix, "data").to_pydict() == t.to_pydict()
    assert storage.read_output(prefix, "quarantine").num_rows == 1
    assert storage.read_manifest(prefix)["rows_in"] == 3
    storage.uncommit(prefix)
    # object stores may keep empty "directories"; what matters is that no object remains
    assert not storage.is_committed(prefix) and storage.list_files(prefix) == []


def test_local_roundtrip(tmp_path):
    _roundtrip(str(tmp_path / "ds"))
    _roundtrip("file://" + str(tmp_path / "ds2"))


def test_json_and_bytes(tmp_path):
    storage.write_json(str(tmp_path / "a/b.json"), {"k": 1})
    assert storage.read_json(str(tmp_path / "a/b.json")) == {"k": 1}
    with pytest.raises(StorageError, match="not found"):
        storage.read_bytes(str(tmp_path / "nope"))


def test_bad_uris():
    with pytest.raises(StorageError, match="unsupported scheme"):
        storage.resolve("gs://bucket/x")
    with pytest.raises(StorageError, match="needs a bucket"):
        storage.resolve("s3://")


def test_folder_upload_download(tmp_path):
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "sub" / "w.bin").write_bytes(b"\x00" * 10)
    storage.upload_dir(src, str(tmp_path / "remote"))
    out = storage.download_dir(str(tmp_path / "remote"), tmp_path / "copy")
    assert (out / "sub" / "w.bin").read_bytes() == b"\x00" * 10


@pytest.mark.timeout(120)
def test_s3_roundtrip(s3, tmp_path):
    _roundtrip(s3.uri("datasets", "roundtrip"))
    src = tmp_path / "model"
    src.mkdir()
    (src / "weights.bin").write_bytes(bytes(range(256)) * 40000)  # 10 MB: multipart upload
    storage.upload_dir(src, s3.uri("models", "m1"))
    out = storage.download_dir(s3.uri("models", "m1"), tmp_path / "back")
    assert (out / "weights.bin").read_bytes() == (src / "weights.bin").read_bytes()
    # the object is really on the server (seen through boto3, not pyarrow)
    keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket=s3.bucket, Prefix="models/m1/")["Contents"]]
    assert "models/m1/_MANIFEST.json" in keys


@pytest.mark.timeout(60)
def test_s3_wrong_credentials_fail(s3, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    with pytest.raises(OSError):
        storage.write_bytes(s3.uri("x.txt"), b"nope")
