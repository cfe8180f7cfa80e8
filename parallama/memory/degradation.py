"""The degradation controller: how many sequences run and how big the KV cache is, while serving.

Two levers, one controller, pure (it reads nothing; the engine feeds it):

- KV cells run out (``llama_decode`` returned 1): multiplicative decrease of the sequence cap. The
  scheduler parks the newest sequence; it resumes later exactly where it stopped.
- Free memory falls below the reserve (another program took it, or the container nears its limit):
  lowering a counter gives nothing back, since the KV cache is allocated. The controller asks for a
  smaller cache; the engine parks the running sequences, rebuilds the context and restores them.

Growth is additive and slow: one step (one more sequence, or the cache back up to what memory allows)
after ``recover_after`` seconds of continuous headroom, where headroom means room above the reserve
plus a hysteresis margin. Any pressure restarts that clock, so an oscillating signal cannot make the
controller flap between sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

from parallama.memory.probes import MemoryReading, MiB
from parallama.memory.sizing import OVERCOMMIT, align_down


@dataclass(frozen=True, slots=True)
class DegradationConfig:
    reserve_bytes: int
    kv_bytes_per_token: int
    ctx_size: int  # one sequence's context: the cache never shrinks below it
    max_cells: int  # the start-up KV size: growth stops there
    max_cap: int  # the start-up sequence count
    min_cap: int = 1
    overcommit: int = OVERCOMMIT  # sizing's rule: 1 with a KV stream per sequence
    gpu_fraction: Fraction | float = 0
    probe_interval: float = 0.5  # seconds between memory readings
    recover_after: float = 3.0  # seconds of continuous headroom before each growth step
    hysteresis_bytes: int = 256 * MiB  # growing needs this much room above the reserve


@dataclass(frozen=True, slots=True)
class ControllerStats:
    """The controller's decisions and the last memory reading it saw."""

    cap: int
    max_cap: int
    cells: int
    max_cells: int
    reason: str  # none | kv cache full | memory below reserve | recovering
    decreases: int
    releases: int  # times the prefix cache's RAM tier was given back
    reserve_bytes: int
    reading: MemoryReading | None


@dataclass(frozen=True, slots=True)
class Resize:
    cells: int  # the KV cache the engine should rebuild to


@dataclass(frozen=True, slots=True)
class Release:
    """Give back the memory that costs nothing running: the prefix cache's RAM tier. Asked for first,
    before any resize, while there is some to give."""


@dataclass(slots=True)
class DegradationController:
    config: DegradationConfig
    cap: int = 0
    cells: int = 0
    reason: str = "none"
    num_decreases: int = 0
    num_releases: int = 0
    last_reading: MemoryReading | None = None
    _healthy_since: float | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.cap = self.cap or self.config.max_cap
        self.cells = self.cells or self.config.max_cells

    # --- lever 1: KV cells ran out -------------------------------------------------------------
    def on_kv_full(self, running: int, now: float) -> int:
        """Halve the cap below what was running, and restart the recovery clock."""
        self.cap = max(self.config.min_cap, min(self.cap, running) // 2)
        self.reason = "kv cache full"
        self.num_decreases += 1
        self._healthy_since = now
        return self.cap

    # --- lever 2: free memory ------------------------------------------------------------------
    def observe(self, reading: MemoryReading, now: float, reclaimable: int = 0) -> Resize | Release | None:
        """``reclaimable``: bytes the engine can give back without touching running work (the prefix
        cache's RAM tier). Under pressure they go first; the next reading decides whether to shrink."""
        self.last_reading = reading
        room = self._room(reading)
        if room < 0 and reclaimable > 0:
            self._healthy_since = None
            self.num_releases += 1
            return Release()
        if room < self.config.hysteresis_bytes:
            self._healthy_since = None  # pressure, or too close to it: the recovery clock stops
            fit = self._fit(reading, self.config.reserve_bytes)
            return self._shrink(fit) if room < 0 and fit < self.cells else None
        if self._healthy_since is None:
            self._healthy_since = now
            return None
        if now - self._healthy_since < self.config.recover_after:
            return None
        self._healthy_since = now  # one growth step per recover_after
        return self._grow(reading)

    def _room(self, reading: MemoryReading) -> int:
        """Bytes above the reserve in the tightest memory pool the cache lives in (negative: below)."""
        frac = Fraction(self.config.gpu_fraction)
        rooms = [reading.host_free - self.config.reserve_bytes] if frac < 1 else []
        if frac > 0 and reading.gpus:
            rooms.append(reading.gpu_free - self.config.reserve_bytes)
        return min(rooms, default=self.config.hysteresis_bytes)

    def _shrink(self, fit: int) -> Resize:
        self.cells = fit
        self.cap = max(self.config.min_cap, min(self.cap, self._cap_for(fit)))
        self.reason = "memory below reserve"
        self.num_decreases += 1
        self._healthy_since = None
        return Resize(fit)

    def _grow(self, reading: MemoryReading) -> Resize | None:
        """One step up: a sequence more while the cache serves it, else the cache back towards its
        start-up size, as far as memory allows with the margin."""
        resize = None
        if self.cap < min(self.config.max_cap, self._cap_for(self.cells)):
            self.cap += 1
        else:
            room = self._fit(reading, self.config.reserve_bytes + self.config.hysteresis_bytes)
            if self.cells < self.config.max_cells and room > self.cells:
                self.cells = room
                resize = Resize(room)
        full = self.cap == self.config.max_cap and self.cells == self.config.max_cells
        self.reason = "none" if full else "recovering"
        return resize

    def _fit(self, reading: MemoryReading, reserve: int) -> int:
        return cells_that_fit(reading, self.cells, self.config.kv_bytes_per_token, reserve,
                              self.config.ctx_size, self.config.gpu_fraction, self.config.max_cells)

    def _cap_for(self, cells: int) -> int:
        """Sequences a cache of ``cells`` serves under the start-up overcommit rule."""
        return max(self.config.min_cap, min(self.config.max_cap, self.config.overcommit * cells // self.config.ctx_size))

    def stats(self) -> ControllerStats:
        c = self.config
        return ControllerStats(cap=self.cap, max_cap=c.max_cap, cells=self.cells, max_cells=c.max_cells,
                               reason=self.reason, decreases=self.num_decreases, releases=self.num_releases,
                               reserve_bytes=c.reserve_bytes,
                               reading=self.last_reading)


def cells_that_fit(
    reading: MemoryReading,
    current_kv_cells: int,
    kv_bytes_per_token: int,
    reserve_bytes: int,
    floor_cells: int,
    gpu_fraction: Fraction | float = 0,
    max_cells: int | None = None,
) -> int:
    """How many KV cells the cache should have given a new reading, for the degradation controller.

    The cache is already allocated, so its own bytes count as available to it: free + current KV bytes
    - reserve, per pool. The result is a multiple of CELL_ALIGN, never below ``floor_cells`` (one
    sequence's ctx_size) and never above ``max_cells`` (the start-up size); when memory allows
    ``max_cells`` it is returned exactly, so an unaligned start-up size does not look like a shrink.
    A reading without GPUs while layers are offloaded (NVML failed this time) leaves the GPU pool out
    rather than shrinking on missing data.
    """
    frac = Fraction(gpu_fraction)
    shares = []
    if frac > 0 and reading.gpus:
        shares.append((reading.gpu_free, frac))
    if frac < 1:
        shares.append((reading.host_free, 1 - frac))
    fit: int | None = None
    for free, share in shares:
        per_token = share * kv_bytes_per_token
        available = free - reserve_bytes + current_kv_cells * per_token
        cells = max(0, int(available // per_token))
        fit = cells if fit is None else min(fit, cells)
    if fit is None:  # every pool unknown: keep what there is
        fit = current_kv_cells
    if max_cells is not None and fit >= max_cells:
        return max_cells
    return max(floor_cells, align_down(fit))
