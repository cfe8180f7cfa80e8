"""Typed commands to the engine's worker thread, each carrying where its answer or its error goes.

The event loop never touches the scheduler: it sends a command. Every command that has a caller
waiting gets an answer or the exception that stopped it, so nothing can wait forever.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from parallama.batching.events import Event
from parallama.batching.sequence import Request


@dataclass(frozen=True, slots=True)
class Sink:
    """Where one request's events go: a queue read on the event loop that submitted it."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Event]


@dataclass(frozen=True, slots=True)
class Reply:
    """A future on the caller's event loop, resolved from the worker thread."""

    loop: asyncio.AbstractEventLoop
    future: asyncio.Future

    def answer(self, value: Any) -> None:
        self._call(_set_result, value)

    def fail(self, error: BaseException) -> None:
        self._call(_set_exception, error)

    def _call(self, setter, value) -> None:
        try:
            self.loop.call_soon_threadsafe(setter, self.future, value)
        except RuntimeError:  # that loop is closed: nobody waits any more
            pass


@dataclass(frozen=True, slots=True)
class Add:
    """Queue a request. Its answer is its events; if adding fails, one error event ends its stream."""

    request: Request
    sink: Sink


@dataclass(frozen=True, slots=True)
class Abort:
    """Cancel a request; its stream gets its last events with finish_reason "cancelled"."""

    request_id: str


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Answer with the engine's statistics (``EngineStats``)."""

    reply: Reply


@dataclass(frozen=True, slots=True)
class FailAll:
    """End every request, queued or running, with an error (e.g. a shutdown deadline). Each stream
    gets its last event with ``error`` set to ``message``; ``reply``, if given, gets how many ended."""

    message: str
    reply: Reply | None = None


Command = Add | Abort | Snapshot | FailAll


def _set_result(future: asyncio.Future, value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
