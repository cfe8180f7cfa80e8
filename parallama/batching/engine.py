"""The dispatcher: one worker thread owns the backend and the scheduler; the event loop talks to it
through commands.

HTTP handlers never touch the llama context. ``submit`` and ``cancel`` append a command and wake the
worker; the worker runs scheduler steps and hands each step's events back to the submitting event
loop with one ``call_soon_threadsafe``. Nothing holds a lock around the model.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from parallama.batching.degradation import DegradationController
from parallama.batching.events import Event
from parallama.batching.memory import MemoryProbe
from parallama.batching.scheduler import Delivery, Scheduler, SchedulerConfig
from parallama.batching.sequence import Request
from parallama.batching.status import EngineStatus, snapshot
from parallama.sequences import Backend, SamplingParams

log = logging.getLogger(__name__)
_request_ids = itertools.count(1)


class QueueFull(Exception):
    """The request queue is at its bound; the caller should retry later."""


class EngineStopped(Exception):
    """The engine no longer admits requests (shutting down)."""


@dataclass(frozen=True, slots=True)
class EngineConfig:
    ctx_size: int  # most tokens (prompt + output) one sequence may hold
    max_queue: int = 256  # requests waiting for a sequence before submit() raises QueueFull
    growth_margin: int = 16
    prefix_cache: bool = False  # the backend's last seq_id holds a cross-request prefix cache


class RequestStream:
    """Events of one request, as an async iterator. Leaving ``async with`` early cancels it."""

    def __init__(self, engine: Engine, request_id: str) -> None:
        self.request_id = request_id
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.done = False
        self._engine = engine

    async def __aiter__(self) -> AsyncIterator[Event]:
        while not self.done:
            event = await self.queue.get()
            self.done = event.usage is not None
            yield event

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cancel()

    def cancel(self) -> None:
        if not self.done:
            self.done = True
            self._engine.cancel(self.request_id)


class Engine:
    def __init__(self, backend: Backend, config: EngineConfig, probe: MemoryProbe | None = None,
                 controller: DegradationController | None = None) -> None:
        """With a probe and a controller, the engine reads memory every ``probe_interval`` seconds
        and lets the controller resize the KV cache and move the sequence cap while it serves."""
        self.backend = backend
        self.config = config
        self.scheduler = Scheduler(backend, SchedulerConfig(config.ctx_size, config.growth_margin,
                                                            config.prefix_cache))
        self.probe = probe
        self.controller = controller
        self._next_probe = 0.0
        if controller is not None:
            self.scheduler.cap = controller.cap
            self.scheduler.on_kv_full = lambda running: controller.on_kv_full(running, time.monotonic())
        self._commands: deque[Callable[[], list[Delivery] | None]] = deque()
        self._wake = threading.Event()
        self._submitted = 0  # with scheduler.num_dequeued, gives the requests still queued
        self._submit_lock = threading.Lock()
        self._accepting = True
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="parallama-engine", daemon=True)

    # --- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def shutdown(self, timeout: float | None = None) -> None:
        self._accepting = False
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)

    # --- the event loop's side -----------------------------------------------------------------
    def submit(self, prompt: list[int], params: SamplingParams, n: int = 1,
               timeout: float | None = None) -> RequestStream:
        """Queue a request. Call on the event loop that will read the stream. After ``timeout``
        seconds it finishes with what it has generated."""
        if not self._accepting:
            raise EngineStopped("the server is shutting down")
        if n > self.scheduler.num_slots:
            raise ValueError(f"n={n} exceeds the {self.scheduler.num_slots} sequences of this engine")
        with self._submit_lock:
            if self.num_beyond_capacity >= self.config.max_queue:
                raise QueueFull(f"{self.num_beyond_capacity} requests are already waiting for a sequence")
            self._submitted += 1
        request_id = f"req-{next(_request_ids)}"
        stream = RequestStream(self, request_id)
        request = Request(request_id, list(prompt), params, n, (asyncio.get_running_loop(), stream.queue))
        if timeout is not None:
            request.deadline = time.monotonic() + timeout
        self._send(lambda: self.scheduler.add(request))
        return stream

    def cancel(self, request_id: str) -> None:
        self._send(lambda: self.scheduler.abort(request_id))

    async def status(self) -> EngineStatus:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[EngineStatus] = loop.create_future()
        self._send(lambda: loop.call_soon_threadsafe(future.set_result, snapshot(self)) and None)
        return await future

    @property
    def is_idle(self) -> bool:
        """No request queued or running, and no command waiting for the worker."""
        return not self._commands and not self.scheduler.has_work

    @property
    def num_beyond_capacity(self) -> int:
        """Queued requests that the free sequences cannot take at the next step: what the queue bound
        limits. (A burst that arrives during a step is not refused while sequences are free.)"""
        free = max(0, self.scheduler.cap - len(self.scheduler.running))
        return max(0, self.num_queued - free)

    @property
    def num_queued(self) -> int:
        """Requests submitted that have not yet taken a sequence (or left the queue otherwise)."""
        return self._submitted - self.scheduler.num_dequeued

    # Tokenizing reads the model's vocabulary only, never the context: safe beside the worker.
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        return self.backend.tokenize(text, add_special, parse_special)

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self.backend.token_bytes(t) for t in tokens).decode("utf-8", "replace")

    # --- the worker's side ---------------------------------------------------------------------
    def _send(self, command: Callable[[], list[Delivery] | None]) -> None:
        self._commands.append(command)
        self._wake.set()

    def _run(self) -> None:
        idle_wait = self.controller.config.probe_interval if self.controller else None
        while True:
            self._wake.clear()
            self._drain_commands()
            self._watch_memory()
            if self._stopping and not self.scheduler.has_work:
                return
            if not self.scheduler.has_work:
                self._wake.wait(idle_wait)  # wakes to read memory even when idle: it may grow back
                continue
            steps = self.scheduler.num_steps
            _deliver(self._step())
            if self.scheduler.num_steps == steps and not self._commands:
                self._wake.wait(0.01)  # nothing could run (e.g. all waiting on room): do not spin

    def _step(self) -> list[Delivery]:
        """One scheduler step. A bug must not kill the worker (every request would hang): the
        requests of that step fail with an error event, and the engine serves on."""
        try:
            return self.scheduler.step()
        except Exception:
            log.exception("scheduler step failed; failing the running requests")
            return self.scheduler.fail_running("internal error")

    def _watch_memory(self) -> None:
        now = time.monotonic()
        if self.controller is None or self.probe is None or now < self._next_probe:
            return
        self._next_probe = now + self.controller.config.probe_interval
        try:
            resize = self.controller.observe(self.probe.read(), now)
        except Exception:
            log.exception("memory probe failed; keeping the current size")
            return
        if resize is not None and resize.cells != self.backend.n_ctx:
            log.warning("memory: %s; KV cache %d -> %d cells, cap %d", self.controller.reason,
                        self.backend.n_ctx, resize.cells, self.controller.cap)
            self.scheduler.resize(resize.cells, self.controller.cap)
        elif self.scheduler.cap != self.controller.cap:
            log.info("sequence cap %d -> %d (%s)", self.scheduler.cap, self.controller.cap, self.controller.reason)
            self.scheduler.cap = self.controller.cap

    def _drain_commands(self) -> None:
        while self._commands:
            try:
                deliveries = self._commands.popleft()()
            except Exception:
                log.exception("engine command failed")
                continue
            if deliveries:
                _deliver(deliveries)


def _deliver(deliveries: list[Delivery]) -> None:
    """Hand a step's events to their event loops: one thread-safe call per loop, not per token."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Event], Event]]] = defaultdict(list)
    for request, event in deliveries:
        loop, queue = request.sink
        by_loop[loop].append((queue, event))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:  # that loop is closed: its client is gone
            pass


def _put_all(items: list[tuple[asyncio.Queue[Event], Event]]) -> None:
    for queue, event in items:
        queue.put_nowait(event)
