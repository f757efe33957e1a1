"""Micro-batching of concurrent predict requests: `MicroBatcher.submit(ids, given)` waits for the batch its ids went
into (`given`: anything that travels with the request's ids to the scoring function, e.g. the label party's own
rows).

Batching by backpressure: a request that finds a free slot (`serve.batches_in_flight`) goes at once, alone if it
is alone, so an idle server adds no wait. While every slot is busy, requests queue; when a slot frees, the
queued requests go together, up to `serve.max_batch` ids. `serve.max_wait_ms` lets a batch that is not full
wait that long for more, but only while another batch is running (on an idle server it would only add latency).
A request never straddles two batches; one that does not fit waits for the next. A request whose caller gave up
(`serve.timeout_ms`) while it queued is dropped unscored, so an overloaded server sheds work instead of
scoring answers nobody waits for.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

R = TypeVar("R")
Segment = tuple[list[str], Any]  # one request's ids and what was given with them


@dataclass
class _Pending(Generic[R]):
    ids: list[str]
    given: Any
    done: asyncio.Future[tuple[R, int]] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class MicroBatcher(Generic[R]):
    def __init__(self, score: Callable[[list[Segment]], R], max_batch: int, max_wait_s: float, in_flight: int,
                 on_batch: Callable[[int], None] = lambda size: None) -> None:
        self._score, self._max_batch, self._max_wait_s = score, max_batch, max_wait_s
        self._slots = in_flight
        self._on_batch = on_batch
        self._queue: asyncio.Queue[_Pending[R]] | None = None
        self._free: asyncio.Semaphore | None = None
        self._task: asyncio.Task[None] | None = None
        self._running = 0
        self._batches: set[asyncio.Task[None]] = set()  # running batches (the loop keeps only weak references)

    async def submit(self, ids: list[str], given: Any = None) -> tuple[R, int]:
        """The scored batch that holds these ids, and where they start in it."""
        if self._queue is None:  # created on the server's event loop, on first use
            self._queue, self._free = asyncio.Queue(), asyncio.Semaphore(self._slots)
            self._task = asyncio.create_task(self._collect())
        pending: _Pending[R] = _Pending(ids, given)
        await self._queue.put(pending)
        return await pending.done

    async def _collect(self) -> None:
        assert self._queue is not None and self._free is not None
        carried: _Pending[R] | None = None
        while True:
            first = carried or await self._queue.get()
            carried = None
            await self._free.acquire()  # while every slot is busy, more requests queue up behind `first`
            if first.done.done():  # its caller gave up (timed out) while it queued: score nothing for it
                self._free.release()
                continue
            batch, size = [first], len(first.ids)
            deadline = asyncio.get_running_loop().time() + self._max_wait_s
            while size < self._max_batch:
                try:
                    if self._queue.empty() and self._running and self._max_wait_s > 0:
                        left = deadline - asyncio.get_running_loop().time()
                        item = await asyncio.wait_for(self._queue.get(), left) if left > 0 else self._queue.get_nowait()
                    else:
                        item = self._queue.get_nowait()
                except (asyncio.QueueEmpty, TimeoutError):
                    break
                if item.done.done():  # abandoned while queued
                    continue
                if size + len(item.ids) > self._max_batch:
                    carried = item
                    break
                batch.append(item)
                size += len(item.ids)
            self._running += 1
            running = asyncio.create_task(self._run(batch))
            self._batches.add(running)
            running.add_done_callback(self._batches.discard)

    async def _run(self, batch: list[_Pending[R]]) -> None:
        assert self._free is not None
        segments = [(pending.ids, pending.given) for pending in batch]
        self._on_batch(sum(len(pending.ids) for pending in batch))
        try:
            result = await asyncio.get_running_loop().run_in_executor(None, self._score, segments)
        except Exception as exc:
            for pending in batch:
                if not pending.done.done():
                    pending.done.set_exception(exc)
        else:
            offset = 0
            for pending in batch:
                if not pending.done.done():  # a caller that timed out has gone
                    pending.done.set_result((result, offset))
                offset += len(pending.ids)
        finally:
            self._running -= 1
            self._free.release()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
