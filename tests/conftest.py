"""Shared fixtures: the real SmolLM2 model (loaded once), LlamaBackend and Engine factories, and
helpers to read a request's stream.

The model fixtures import llama_cpp lazily, so tests that never ask for them (the scheduler, text and
layering tests) run without loading it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from parallama.batching import Engine, EngineConfig, Event, Usage


# --- the real model -------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def llama_model():
    """SmolLM2-135M, loaded once per session. Always through LlamaModel: it turns llama.cpp's AMX
    repacking off (use_extra_bufts=False), which crashes on multi-token batches on this CPU."""
    from parallama.sequences.config import ModelConfig
    from parallama.sequences.model import LlamaModel
    from parallama.sequences.model_file import default_model_path

    model = LlamaModel(ModelConfig(str(default_model_path())))
    yield model
    model.close()


@pytest.fixture
def make_backend(llama_model, _engines) -> Callable[..., object]:
    """``make_backend(n_ctx=..., n_seq_max=..., n_batch=..., kv_unified=...)`` -> a LlamaBackend (n_threads=2)
    on the shared model (one unified pool unless asked for a stream per sequence); every backend made is
    closed at teardown (after the engines using it stop)."""
    from parallama.sequences.config import ContextConfig
    from parallama.sequences.llama_backend import LlamaBackend

    made = []

    def make(n_ctx: int = 1024, n_seq_max: int = 4, n_batch: int = 256, n_threads: int = 2, kv_unified: bool = True):
        backend = LlamaBackend(llama_model, ContextConfig(n_ctx=n_ctx, n_seq_max=n_seq_max, n_batch=n_batch,
                                                          n_threads=n_threads, kv_unified=kv_unified))
        made.append(backend)
        return backend

    yield make
    _stop_engines(_engines)  # whatever order the test asked for the fixtures in
    for backend in made:
        backend.close()


# --- engines --------------------------------------------------------------------------------------
@pytest.fixture
def _engines() -> list[Engine]:
    return []


def _stop_engines(engines: list[Engine]) -> None:
    """Cancel what each engine still runs and stop its worker (engines never started are skipped)."""
    for engine in engines:
        for request_id in list(engine.scheduler.requests):
            engine.cancel(request_id)
        try:
            engine.shutdown(timeout=60)
        except RuntimeError:  # never started
            continue


@pytest.fixture
def make_engine(_engines) -> Callable[..., Engine]:
    """``make_engine(backend, ctx_size, start=True, **EngineConfig fields)`` -> an Engine.

    At teardown every request still known to the scheduler is cancelled and the worker is shut down.
    Drive it with ``asyncio.run(main())``: ``submit`` must be called on the event loop that reads
    the stream; with ``start=False`` a test can queue requests before the first step."""

    def make(backend, ctx_size: int, start: bool = True, **config) -> Engine:
        engine = Engine(backend, EngineConfig(ctx_size=ctx_size, **config))
        _engines.append(engine)
        if start:
            engine.start()
        return engine

    yield make
    _stop_engines(_engines)


# --- reading streams ------------------------------------------------------------------------------
@dataclass
class Collected:
    """Everything one request's stream delivered."""

    texts: list[str] = field(default_factory=list)  # per choice index
    finish_reasons: list[str | None] = field(default_factory=list)  # per choice index
    token_ids: list[list[int]] = field(default_factory=list)  # per choice index, EOS included
    usage: Usage | None = None
    error: str | None = None
    events: list[Event] = field(default_factory=list)

    def _grow(self, index: int) -> None:
        while len(self.texts) <= index:
            self.texts.append("")
            self.finish_reasons.append(None)
            self.token_ids.append([])

    def add(self, event: Event) -> None:
        assert self.usage is None, "an event arrived after the one carrying usage"
        self._grow(event.index)
        assert self.finish_reasons[event.index] is None, f"choice {event.index} got an event after finishing"
        self.events.append(event)
        self.texts[event.index] += event.text
        self.token_ids[event.index] += event.token_ids
        self.finish_reasons[event.index] = event.finish_reason
        if event.usage is not None:
            self.usage, self.error = event.usage, event.error


async def collect_all(stream, on_event: Callable[[Event], None] | None = None) -> Collected:
    """Read a stream to its end (the event carrying usage)."""
    out = Collected()
    async with stream:
        async for event in stream:
            out.add(event)
            if on_event is not None:
                on_event(event)
    assert out.usage is not None, "the stream ended without usage"
    return out


async def collect(stream) -> tuple[str, list[str | None], Usage]:
    """``(text of choice 0, finish reason of every choice, usage)``."""
    out = await collect_all(stream)
    return (out.texts[0] if out.texts else ""), out.finish_reasons, out.usage


# --- recording what a backend decodes -------------------------------------------------------------
@dataclass(frozen=True)
class DecodedPlan:
    """One decode call, summarised: (seq_id, start_pos, n_tokens, wants_logits) per item."""

    items: tuple[tuple[int, int, int, bool], ...]
    outcome: object

    @property
    def num_tokens(self) -> int:
        return sum(item[2] for item in self.items)


def record_plans(backend) -> list[DecodedPlan]:
    """Wrap ``backend.decode`` so each call is recorded, in order, in the returned list."""
    recorded: list[DecodedPlan] = []
    decode = backend.decode

    def recording_decode(plan):
        outcome = decode(plan)
        recorded.append(DecodedPlan(
            tuple((i.seq_id, i.start_pos, len(i.token_ids), i.wants_logits) for i in plan.items), outcome))
        return outcome

    backend.decode = recording_decode
    return recorded


def run(coro):
    """Run a coroutine on a fresh event loop (no pytest-asyncio here)."""
    return asyncio.run(coro)
