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
from collections.abc import AsyncIterator
from dataclasses import dataclass

from parallama.batching.commands import Abort, Add, Command, FailAll, Reply, Sink, Snapshot
from parallama.batching.events import Event, Usage
from parallama.batching.scheduler import GENERATION_FAILED, Delivery, Scheduler, SchedulerConfig
from parallama.batching.sequence import Request
from parallama.batching.stats import EngineStats
from parallama.memory.degradation import DegradationController, Release
from parallama.memory.probes import MemoryProbe
from parallama.memory.sizing import SeqLayout
from parallama.sequences import Backend, ModelFacts, SamplingParams

log = logging.getLogger(__name__)
_request_ids = itertools.count(1)


IDLE_WAKE_S = 0.5  # the idle worker looks for commands at least this often


class QueueFull(Exception):
    """The request queue is at its bound; the caller should retry later."""


class EngineStopped(Exception):
    """The engine no longer admits requests (shutting down)."""


@dataclass(frozen=True, slots=True)
class EngineConfig:
    ctx_size: int  # most tokens (prompt + output) one sequence may hold
    max_queue: int = 256  # requests waiting for a sequence before submit() raises QueueFull
    growth_margin: int = 16
    layout: SeqLayout | None = None  # the plan's slots and prefix-cache ids; None: all slots, no cache
    cache_ram_bytes: int = 0  # the prefix cache's host-RAM tier


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
        and lets the controller resize the KV cache and move the sequence cap while it serves.

        ``backend``, ``scheduler`` and ``controller`` belong to the worker thread once it runs; the
        event loop reads only ``facts``, ``num_slots`` and the counters the worker publishes."""
        self.backend = backend
        self.config = config
        self.scheduler = Scheduler(backend, SchedulerConfig(config.ctx_size, config.growth_margin, config.layout,
                                                            config.cache_ram_bytes))
        self.probe = probe
        self.controller = controller
        self.facts: ModelFacts = backend.facts  # immutable: safe to read from any thread
        self.constraints = backend.constraints  # compiles grammars on the caller's thread
        self.num_slots = self.scheduler.num_slots  # the most sequences one request (n) may take
        self._next_probe = 0.0
        self._cap = self._wanted_cap()
        self._start_cap, self._start_cells = self._cap, backend.n_ctx
        self._cap_changes = 0
        self._commands: deque[Command] = deque()
        self._wake = threading.Event()
        self._sinks: dict[str, Sink] = {}  # worker-only: where each request's events go
        # Counters for the queue bound: _submitted is written by the event loop, the rest by the worker.
        self._submitted = 0
        self._failed_adds = 0
        self._free_slots = self._cap
        self._has_work = False
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
        if n > self.num_slots:
            raise ValueError(f"n={n} exceeds the {self.num_slots} sequences of this engine")
        with self._submit_lock:
            if self.num_beyond_capacity >= self.config.max_queue:
                raise QueueFull(f"{self.num_beyond_capacity} requests are already waiting for a sequence")
            self._submitted += 1
        request_id = f"req-{next(_request_ids)}"
        stream = RequestStream(self, request_id)
        request = Request(request_id, list(prompt), params, n)
        if timeout is not None:
            request.deadline = time.monotonic() + timeout
        self._send(Add(request, Sink(asyncio.get_running_loop(), stream.queue)))
        return stream

    def cancel(self, request_id: str) -> None:
        self._send(Abort(request_id))

    def fail_all(self, message: str, reply: Reply | None = None) -> None:
        """End every request, queued or running, with an error event carrying ``message``. Safe from
        any thread (a shutdown deadline calls it from outside the event loop); ``reply``, if given,
        gets the number of requests it ended."""
        self._send(FailAll(message, reply))

    async def status(self) -> EngineStats:
        """The engine's statistics, built on the worker between two steps."""
        if not self._thread.is_alive():
            raise EngineStopped("the engine is not running")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[EngineStats] = loop.create_future()
        self._send(Snapshot(Reply(loop, future)))
        return await future

    @property
    def is_idle(self) -> bool:
        """No request queued or running, and no command waiting for the worker."""
        return not self._commands and not self._has_work

    @property
    def num_beyond_capacity(self) -> int:
        """Queued requests that the free sequences cannot take at the next step: what the queue bound
        limits. (A burst that arrives during a step is not refused while sequences are free.)"""
        return max(0, self.num_queued - self._free_slots)

    @property
    def num_queued(self) -> int:
        """Requests submitted that have not yet taken a sequence (or left the queue otherwise)."""
        return self._submitted - self.scheduler.num_dequeued - self._failed_adds

    # Tokenizing reads the model's vocabulary only, never the context: safe beside the worker.
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        return self.backend.tokenize(text, add_special, parse_special)

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self.backend.token_bytes(t) for t in tokens).decode("utf-8", "replace")

    def token_bytes(self, token: int) -> bytes:
        return self.backend.token_bytes(token)

    # --- the worker's side ---------------------------------------------------------------------
    def _send(self, command: Command) -> None:
        self._commands.append(command)
        self._wake.set()

    def _run(self) -> None:
        # Bounded even without a controller: a wake-up that is ever lost costs at most this long, never a hang.
        idle_wait = self.controller.config.probe_interval if self.controller else IDLE_WAKE_S
        try:
            while True:
                self._wake.clear()
                self._drain_commands()
                self._watch_memory()
                self._publish()
                if self._stopping and not self.scheduler.has_work:
                    return
                if not self.scheduler.has_work:
                    self._wake.wait(idle_wait)  # wakes to read memory even when idle: it may grow back
                    continue
                steps = self.scheduler.num_steps
                self._step()
                if self.scheduler.num_steps == steps and not self._commands:
                    self._wake.wait(0.01)  # nothing could run (e.g. all waiting on room): do not spin
        finally:
            self._refuse_pending()

    def _step(self) -> None:
        """One scheduler step. A bug must not kill the worker (every request would hang): the
        requests of that step fail with an error event, and the engine serves on."""
        try:
            self.scheduler.schedule(self._cap)
            self._publish()  # admissions count against the queue bound while the decode runs
            result = self.scheduler.run()
        except Exception:
            log.exception("scheduler step failed; failing the running requests")
            self._deliver(self.scheduler.fail_running(GENERATION_FAILED))
            return
        if result.kv_full_running and self.controller is not None:
            self.controller.on_kv_full(result.kv_full_running, time.monotonic())
            self._follow_cap()
        self._deliver(result.events)

    def _wanted_cap(self) -> int:
        return self.controller.cap if self.controller is not None else self.scheduler.num_slots

    def _follow_cap(self) -> None:
        cap = self._wanted_cap()
        if cap != self._cap:
            reason = self.controller.reason if self.controller is not None else ""
            log.info("sequence cap %d -> %d (%s)", self._cap, cap, reason)
            self._cap = cap
            self._cap_changes += 1

    def _publish(self) -> None:
        """Counters the event loop reads (single int/bool writes: no lock needed)."""
        self._free_slots = max(0, self._cap - len(self.scheduler.running))
        self._has_work = self.scheduler.has_work

    def _watch_memory(self) -> None:
        now = time.monotonic()
        if self.controller is None or self.probe is None or now < self._next_probe:
            return
        self._next_probe = now + self.controller.config.probe_interval
        try:
            resize = self.controller.observe(self.probe.read(), now, self.scheduler.cache_ram_bytes())
        except Exception:
            log.exception("memory probe failed; keeping the current size")
            return
        if isinstance(resize, Release):
            log.warning("memory below the reserve: the prefix cache gives back %d bytes of RAM first",
                        self.scheduler.release_cache_ram())
        elif resize is not None and resize.cells != self.backend.n_ctx:
            log.warning("memory: %s; KV cache %d -> %d cells, cap %d", self.controller.reason,
                        self.backend.n_ctx, resize.cells, self.controller.cap)
            self.scheduler.resize(resize.cells)
        self._follow_cap()

    # --- commands ------------------------------------------------------------------------------
    def _drain_commands(self) -> None:
        while self._commands:
            self._execute(self._commands.popleft())

    def _execute(self, command: Command) -> None:
        """Run one command; whatever happens, its caller gets an answer or the error."""
        match command:
            case Add(request, sink):
                self._sinks[request.request_id] = sink
                try:
                    self.scheduler.add(request)
                except Exception as exc:
                    log.exception("could not queue %s", request.request_id)
                    self._failed_adds += 1
                    self._deliver([(request.request_id, _error_event(request, "the engine could not queue this request"))])
            case Abort(request_id):
                try:
                    self._deliver(self.scheduler.abort(request_id))
                except Exception:
                    log.exception("could not cancel %s", request_id)
            case Snapshot(reply):
                try:
                    reply.answer(self._stats())
                except Exception as exc:
                    log.exception("could not build the statistics")
                    reply.fail(exc)
            case FailAll(message, reply):
                try:
                    ended = self._fail_all(message)
                except Exception as exc:
                    log.exception("could not end the requests in flight")
                    if reply is not None:
                        reply.fail(exc)
                else:
                    if reply is not None:
                        reply.answer(ended)

    def _fail_all(self, message: str) -> int:
        ended = len(self.scheduler.requests)
        if ended:
            log.warning("ending %d request%s in flight with an error: %s", ended, "" if ended == 1 else "s", message)
        self._deliver(self.scheduler.fail_all(message))
        self._publish()  # is_idle is true as soon as this returns
        return ended

    def _refuse_pending(self) -> None:
        """The worker is gone: answer what still waits for it."""
        while self._commands:
            command = self._commands.popleft()
            if isinstance(command, Snapshot):
                command.reply.fail(EngineStopped("the engine stopped"))
            elif isinstance(command, FailAll) and command.reply is not None:
                command.reply.answer(0)  # nothing is left in flight once the worker is gone
            elif isinstance(command, Add):
                self._sinks[command.request.request_id] = command.sink
                self._deliver([(command.request.request_id, _error_event(command.request, "the engine stopped"))])

    def _stats(self) -> EngineStats:
        return EngineStats(
            cap=self._cap,
            scheduler=self.scheduler.stats(),
            cache=self.scheduler.cache_stats(),
            controller=self.controller.stats() if self.controller is not None else None,
            queued=self.num_queued,
            cells_total=self.backend.n_ctx,
            decode_calls=self.backend.decode_calls,
            requests=self.scheduler.request_stats(),
            cap_startup=self._start_cap,
            cap_changes=self._cap_changes,
            cells_startup=self._start_cells,
        )

    def _deliver(self, deliveries: list[Delivery]) -> None:
        """Hand a step's events to their event loops: one thread-safe call per loop, not per token."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Event], Event]]] = defaultdict(list)
        for request_id, event in deliveries:
            sink = self._sinks.get(request_id)
            if sink is None:
                continue
            if event.usage is not None:  # the request's last event
                del self._sinks[request_id]
            by_loop[sink.loop].append((sink.queue, event))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that loop is closed: its client is gone
                pass


def _error_event(request: Request, message: str) -> Event:
    return Event(index=0, finish_reason="error", usage=Usage(len(request.prompt), 0), error=message)


def _put_all(items: list[tuple[asyncio.Queue[Event], Event]]) -> None:
    for queue, event in items:
        queue.put_nowait(event)
