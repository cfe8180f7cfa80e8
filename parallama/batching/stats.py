"""One statistics value for the whole engine, built on the worker thread and read anywhere.

Each part reports its own counters as a frozen value (the scheduler, the prefix cache, the degradation
controller); the engine composes them into one ``EngineStats``. ``/status`` renders it, and so can
anything else that watches the server. Types only: nothing here reads live state.
"""

from __future__ import annotations

from dataclasses import dataclass

from parallama.memory.degradation import ControllerStats


@dataclass(frozen=True, slots=True)
class SlotStats:
    seq_id: int
    state: str  # idle | prefill | generating
    tokens: int  # tokens in this sequence's KV cells
    request_id: str | None = None


@dataclass(frozen=True, slots=True)
class CacheStats:
    """The prefix cache: what it holds and how often it served."""

    entries: int = 0
    cells: int = 0  # KV cells it holds (given back first when room runs out)
    pinned_cells: int = 0  # of those, cells running sequences share (not given back while they run)
    hits: int = 0
    misses: int = 0
    tokens_queried: int = 0  # prompt tokens of the sequences that looked the cache up
    tokens_reused: int = 0  # prompt tokens copied from the cache instead of computed
    evictions: int = 0  # entries that gave their cells back (saved to the RAM tier when it has one)
    ram_entries: int = 0  # entries held in the host-RAM tier
    ram_bytes: int = 0
    ram_budget_bytes: int = 0  # --cache-ram


@dataclass(frozen=True, slots=True)
class HistogramStats:
    """A latency histogram: ``counts[i]`` values fell at or below ``bounds[i]`` (and above the bound
    before it); the last count is above every bound. Per bucket, not cumulative."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    sum: float

    @property
    def count(self) -> int:
        return sum(self.counts)


@dataclass(frozen=True, slots=True)
class RequestStats:
    """Requests since start: how they ended, their tokens, and how long each phase took (seconds)."""

    prompt_tokens: int  # prompts of requests that reached their first token (cached tokens included)
    generation_tokens: int  # completion tokens, as in usage; running sequences' tokens so far included
    finished: tuple[tuple[str, int], ...]  # (finish reason "stop" | "length", requests)
    cancelled: int  # ended because the client went away
    failed: int  # ended with an engine error (or the shutdown deadline)
    time_to_first_token: HistogramStats
    inter_token_latency: HistogramStats
    e2e_latency: HistogramStats
    queue_time: HistogramStats
    prefill_time: HistogramStats
    decode_time: HistogramStats


@dataclass(frozen=True, slots=True)
class SchedulerStats:
    running: int
    slots: tuple[SlotStats, ...]
    cells_used: int  # held by running sequences (a shared prefix once), the cache's cells excluded
    steps: int
    preemptions: int
    resizes: int
    running_requests: int = 0  # requests with a sequence running (one request may run n)
    parked: int = 0  # preempted sequences waiting to resume


@dataclass(frozen=True, slots=True)
class EngineStats:
    cap: int  # most sequences that may run now
    scheduler: SchedulerStats
    cache: CacheStats
    controller: ControllerStats | None  # None when the engine runs without memory control
    queued: int  # requests that have not yet taken a sequence
    cells_total: int
    decode_calls: int
    requests: RequestStats | None = None
    cap_startup: int = 0  # the cap the engine started with, and how often it moved since
    cap_changes: int = 0
    cells_startup: int = 0  # the KV cache's start-up size (resizes move cells_total below it and back)
