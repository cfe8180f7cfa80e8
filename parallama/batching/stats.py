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
    hits: int = 0
    misses: int = 0
    tokens_reused: int = 0  # prompt tokens copied from the cache instead of computed
    evictions: int = 0  # entries that gave their cells back (saved to the RAM tier when it has one)
    ram_entries: int = 0  # entries held in the host-RAM tier
    ram_bytes: int = 0
    ram_budget_bytes: int = 0  # --cache-ram


@dataclass(frozen=True, slots=True)
class SchedulerStats:
    running: int
    slots: tuple[SlotStats, ...]
    cells_used: int  # held by running sequences (a shared prefix once), the cache's cells excluded
    steps: int
    preemptions: int
    resizes: int


@dataclass(frozen=True, slots=True)
class EngineStats:
    cap: int  # most sequences that may run now
    scheduler: SchedulerStats
    cache: CacheStats
    controller: ControllerStats | None  # None when the engine runs without memory control
    queued: int  # requests that have not yet taken a sequence
    cells_total: int
    decode_calls: int
