"""A real `ray start --head` cluster on 127.0.0.1 for job-submission tests.

Every port is a free one, the dashboard agent's included: its default (52365) is already taken
when the test session's own local Ray (with dashboard) runs, and a head whose agent cannot bind
answers the dashboard but never takes a job ("No available agent to submit job").

Started with ``--block`` in its own process group and stopped by that group's id, never
with ``ray stop`` (which would kill every Ray process on the host).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tests.s3server import _free_ports


@dataclass
class HeadNode:
    dashboard_url: str = ""
    _proc: subprocess.Popen | None = None
    _dir: str = ""

    def start(self, num_cpus: int = 4, timeout_s: float = 300.0, env: dict[str, str] | None = None) -> "HeadNode":
        """Start the head; ``env`` is added to its environment (as a node's container env would be)."""
        gcs, dash, client, agent_http, agent_grpc, runtime_env, metrics = _free_ports(7)
        self._dir = tempfile.mkdtemp(prefix="ef-head-", dir="/tmp")
        ray = str(Path(sys.executable).parent / "ray")
        cmd = [
            ray, "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dash}",
            f"--ray-client-server-port={client}", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
            f"--num-cpus={num_cpus}", "--object-store-memory=400000000", f"--temp-dir={self._dir}",
            f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
            "--include-dashboard=true", "--disable-usage-stats",
        ]
        extra = env or {}
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", **extra}
        env.pop("RAY_ADDRESS", None)
        if "EMBEDFORGE_DATA" not in extra:
            env.pop("EMBEDFORGE_DATA", None)  # a node has only what its own environment sets
        self._proc = subprocess.Popen(cmd, env=env, stdout=open(f"{self._dir}/head.log", "wb"),
                                      stderr=subprocess.STDOUT, start_new_session=True)
        self.dashboard_url = f"http://127.0.0.1:{dash}"
        try:
            self._wait_ready(timeout_s)
        except BaseException:  # also pytest-timeout's interrupt: never leave a head running
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"ray start exited {self._proc.returncode}; see {self._dir}/head.log")
            try:
                with urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=2) as r:
                    if r.status == 200 and self._job_agent_ready(deadline):
                        return
            except OSError:
                pass
            time.sleep(1)
        raise RuntimeError(f"Ray head not ready after {timeout_s}s; its logs end with:\n{self._log_tail()}")

    def _log_tail(self, chars: int = 3000) -> str:
        """The end of head.log and of the dashboard agent's log (the part that fails to start)."""
        out = []
        for path in [Path(self._dir) / "head.log", *Path(self._dir).glob("session_latest/logs/dashboard_agent*.log")]:
            try:
                out.append(f"--- {path.name}\n{path.read_text(errors='replace')[-chars:]}")
            except OSError:
                pass
        return "\n".join(out)

    def _job_agent_ready(self, deadline: float) -> bool:
        """The dashboard answers before the job agent can take jobs: submit a no-op until one runs."""
        from ray.job_submission import JobStatus, JobSubmissionClient

        client = JobSubmissionClient(self.dashboard_url)
        while time.monotonic() < deadline:
            try:
                job = client.submit_job(entrypoint="true")
            except Exception:  # noqa: BLE001 - "No available agent ...", or the agent's port not open yet
                time.sleep(1)
                continue
            while time.monotonic() < deadline:
                if client.get_job_status(job) in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
                    return True
                time.sleep(0.5)
        return False

    def stop(self) -> None:
        if self._proc and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait(timeout=10)
        shutil.rmtree(self._dir, ignore_errors=True)
