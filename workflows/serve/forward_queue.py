"""One forward pass at a time per model replica; work queued meanwhile runs together in the next one.

``@serve.batch`` closes a batch ``batch_wait_timeout_s`` after its first request, whether or not
the model is free, and then runs batches one after the other. Under load the batches are therefore
only as big as the requests arriving within one timeout window (measured with one MiniLM replica
at 16 concurrent single-sentence requests: 3.3 sentences per forward pass, 0.3 s median queue
time), and a small forward pass costs nearly as much as a full one on CPU. Hand-written because
neither ``@serve.batch`` nor FastAPI offer the other policy -- the one TEI and Infinity use: when
the model becomes free, take everything queued (up to ``max_sentences``) as the next pass.

Pure asyncio (no Ray, no model), so it is tested on its own.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any


@dataclass
class Forwarded:
    """What one submission got back: its rows of the pass, the pass's size, when the round started and
    how long its forward call ran."""

    embeddings: Any
    batch_size: int
    started: float
    seconds: float = 0.0


@dataclass
class _Job:
    key: Hashable
    texts: list[str]
    future: asyncio.Future


class ForwardQueue:
    """Serializes ``run(key, texts)`` calls, merging queued submissions that share a key.

    ``run`` returns one row per text (e.g. an array [n, dims]). Submissions are taken in arrival
    order, up to ``max_sentences`` sentences per round (a single larger submission runs alone);
    within a round, submissions with the same key (model, layers) run as one call.
    """

    def __init__(self, run: Callable[[Hashable, list[str]], Awaitable[Any]], max_sentences: int,
                 idle_wait_s: float = 0.0):
        """``idle_wait_s``: when work arrives at an idle queue, wait this long for more (unless full)."""
        if max_sentences < 1:
            raise ValueError(f"max_sentences must be >= 1, got {max_sentences}")
        self._run = run
        self.max_sentences = max_sentences
        self.idle_wait_s = idle_wait_s
        self._pending: deque[_Job] = deque()
        self._worker: asyncio.Task | None = None

    def submit(self, key: Hashable, texts: list[str]) -> asyncio.Future:
        """Queue ``texts``; the returned future resolves to a :class:`Forwarded`."""
        future = asyncio.get_running_loop().create_future()
        self._pending.append(_Job(key, list(texts), future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        return future

    @property
    def queued(self) -> int:
        return sum(len(j.texts) for j in self._pending)

    def _next_round(self) -> list[_Job]:
        jobs: list[_Job] = []
        size = 0
        while self._pending and (not jobs or size + len(self._pending[0].texts) <= self.max_sentences):
            job = self._pending.popleft()
            if job.future.done():  # the caller gave up (cancelled)
                continue
            jobs.append(job)
            size += len(job.texts)
        return jobs

    async def _drain(self) -> None:
        if self.idle_wait_s > 0 and self.queued < self.max_sentences:
            await asyncio.sleep(self.idle_wait_s)
        while self._pending:
            jobs = self._next_round()
            total = sum(len(j.texts) for j in jobs)
            groups: dict[Hashable, list[_Job]] = defaultdict(list)
            for job in jobs:
                groups[job.key].append(job)
            started = time.monotonic()
            for key, members in groups.items():
                texts = [t for job in members for t in job.texts]
                ran = time.monotonic()
                try:
                    out = await self._run(key, texts)
                except Exception as e:  # noqa: BLE001 - every waiting caller gets the error
                    for job in members:
                        if not job.future.done():
                            job.future.set_exception(e)
                    continue
                except BaseException:  # cancelled (replica shutting down): no caller waits forever
                    for job in [*members, *self._pending]:
                        job.future.cancel()
                    raise
                seconds = time.monotonic() - ran
                offset = 0
                for job in members:
                    n = len(job.texts)
                    if not job.future.done():
                        job.future.set_result(Forwarded(out[offset:offset + n], total, started, seconds))
                    offset += n
