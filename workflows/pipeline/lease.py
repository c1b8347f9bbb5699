"""One pipeline run at a time per output root: a lease object ``<output>/lease.json``.

The nightly schedule (RayCronJob or CronJob) has no way to see that yesterday's RayJob is still
running (a CronJob's ``concurrencyPolicy: Forbid`` only covers the short pod that creates the
RayJob; RayCronJob has no such field), and a manual run may overlap a scheduled one. Two runs on
one root would race on the same stage outputs, so a run takes the lease first and refuses to start
while another run's lease is live, and releases it at the end. A crashed run's lease expires
``ttl_s`` after it was taken: set it to the longest a run may take (the RayJob's
``activeDeadlineSeconds``, after which KubeRay stops the job anyway).

Storage has no compare-and-swap here (pyarrow's S3 writes are unconditional), so acquiring is
write-then-read-back: two runs starting within the same second can both pass. Against schedules
hours apart and their retries this is enough; it is not a distributed lock.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from embedforge import storage
from embedforge.errors import EmbedforgeError

log = logging.getLogger(__name__)
LEASE = "lease.json"


class LeaseHeldError(EmbedforgeError):
    """Another run holds the output root's lease."""


class RunLease:
    def __init__(self, root: str, ttl_s: float, name: str) -> None:
        self.uri = storage.join(root, LEASE)
        self.ttl_s = ttl_s
        self.body: dict[str, Any] = {"run_id": uuid.uuid4().hex, "name": name, "started_at": time.time()}

    def holder(self) -> dict[str, Any] | None:
        """The live lease of another run, if any."""
        if not storage.exists(self.uri):
            return None
        held = storage.read_json(self.uri)
        if held.get("run_id") == self.body["run_id"] or held.get("expires_at", 0) < time.time():
            return None
        return held

    def _write(self) -> None:
        self.body["expires_at"] = time.time() + self.ttl_s
        storage.write_json(self.uri, self.body)

    def acquire(self) -> RunLease:
        held = self.holder()
        if held:
            raise LeaseHeldError(
                f"{self.uri}: run {held['run_id']} ({held.get('name')}) started "
                f"{time.strftime('%Y-%m-%d %H:%M:%SZ', time.gmtime(held['started_at']))} holds the lease until "
                f"{time.strftime('%Y-%m-%d %H:%M:%SZ', time.gmtime(held['expires_at']))}; wait for it, or delete "
                f"the lease file if that run is known to be gone")
        self._write()
        if storage.read_json(self.uri).get("run_id") != self.body["run_id"]:
            raise LeaseHeldError(f"{self.uri}: another run took the lease at the same time")
        log.info("lease %s taken by run %s", self.uri, self.body["run_id"])
        return self

    def release(self) -> None:
        if storage.exists(self.uri) and storage.read_json(self.uri).get("run_id") == self.body["run_id"]:
            storage.delete(self.uri)

    def __enter__(self) -> RunLease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
