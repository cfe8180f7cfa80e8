"""The degradation controller as a pure table of readings -> sizes, and the scheduler levers it pulls."""

from __future__ import annotations

import pytest

from parallama.memory.degradation import DegradationConfig, DegradationController, Release, Resize
from parallama.memory.probes import GiB, MiB, MemoryReading
from parallama.batching.scheduler import Scheduler, SchedulerConfig
from parallama.batching.sequence import Request
from parallama.sequences import SamplingParams
from parallama.sequences.fake_backend import FakeBackend

KV_PER_TOKEN = 1 * MiB  # big tokens make the arithmetic readable: one cell is one MiB
RESERVE = 2 * GiB


def config(**changes) -> DegradationConfig:
    base = dict(reserve_bytes=RESERVE, kv_bytes_per_token=KV_PER_TOKEN, ctx_size=256, max_cells=2048, max_cap=8,
                recover_after=3.0, hysteresis_bytes=256 * MiB)
    return DegradationConfig(**{**base, **changes})


def free(bytes_free: int) -> MemoryReading:
    return MemoryReading(host_available=bytes_free, host_total=32 * GiB)


def test_ample_memory_changes_nothing():
    ctl = DegradationController(config())
    for t in range(20):
        assert ctl.observe(free(20 * GiB), float(t)) is None
    assert (ctl.cap, ctl.cells, ctl.reason) == (8, 2048, "none")


@pytest.mark.parametrize(
    ("free_bytes", "cells", "cap"),
    [
        (RESERVE - 1024 * MiB, 1024, 8),  # 1 GiB below the reserve: give 1024 of the 2048 one-MiB cells back
        (RESERVE - 1536 * MiB, 512, 4),  # cap follows the overcommit rule: 2 x 512 / 256
        (RESERVE - 1792 * MiB, 256, 2),
        (RESERVE - 4096 * MiB, 256, 2),  # never below one sequence's context
    ],
)
def test_memory_below_reserve_shrinks_the_cache(free_bytes, cells, cap):
    ctl = DegradationController(config())
    assert ctl.observe(free(free_bytes), 0.0) == Resize(cells)
    assert (ctl.cells, ctl.cap, ctl.reason) == (cells, cap, "memory below reserve")


def test_under_pressure_the_cache_ram_goes_first_and_only_then_the_kv_cache():
    ctl = DegradationController(config())
    short = free(RESERVE - 512 * MiB)
    assert ctl.observe(short, 0.0, reclaimable=300 * MiB) == Release()  # costs nothing running: first
    assert (ctl.cells, ctl.cap, ctl.num_releases) == (2048, 8, 1)
    assert ctl.observe(short, 0.5, reclaimable=0) == Resize(1536)  # still short with nothing to give back
    assert ctl.stats().releases == 1 and ctl.stats().decreases == 1
    assert ctl.observe(free(RESERVE + 64 * MiB), 1.0, reclaimable=300 * MiB) is None  # no pressure: keep it


def test_shrunk_cache_grows_back_one_step_at_a_time_after_sustained_headroom():
    ctl = DegradationController(config())
    ctl.observe(free(RESERVE - 1536 * MiB), 0.0)  # -> 512 cells, cap 4
    # The other program leaves: memory back (the cache itself now holds only 512 MiB).
    plenty = free(RESERVE + 3 * GiB)
    assert ctl.observe(plenty, 1.0) is None  # the headroom clock starts
    assert ctl.observe(plenty, 2.0) is None
    assert ctl.observe(plenty, 4.5) == Resize(2048)  # 3 s of headroom: the cache grows (capped at start)
    caps = []
    for t in (5.0, 8.0, 11.0, 14.0, 17.0):
        assert ctl.observe(plenty, t) is None
        caps.append(ctl.cap)
    assert caps == [4, 5, 6, 7, 8]  # additive: one more sequence per recover_after
    assert ctl.reason == "none" or ctl.cap == 8


def test_kv_full_halves_the_cap_with_a_floor_and_recovers_additively():
    ctl = DegradationController(config(min_cap=2))
    assert ctl.on_kv_full(running=8, now=0.0) == 4
    assert ctl.on_kv_full(running=4, now=0.1) == 2
    assert ctl.on_kv_full(running=2, now=0.2) == 2  # the floor holds
    plenty = free(20 * GiB)
    t, caps = 0.2, []
    while ctl.cap < 8 and t < 60:
        t += 0.5
        ctl.observe(plenty, t)
        caps.append(ctl.cap)
    assert sorted(set(caps)) == [2, 3, 4, 5, 6, 7, 8]
    assert all(b - a in (0, 1) for a, b in zip(caps, caps[1:]))  # never more than one step at a time


def test_oscillating_signal_does_not_flap():
    """Another program takes and releases 512 MiB every second. The cache shrinks once to make room,
    then holds: headroom never lasts recover_after seconds, so it does not grow back and shrink again."""
    ctl = DegradationController(config())

    def reading(step: int) -> MemoryReading:
        taken = 512 * MiB if step % 4 < 2 else 0
        given_back = (2048 - ctl.cells) * KV_PER_TOKEN  # what our own shrinking freed
        return free(RESERVE - taken + given_back)

    resizes = [a.cells for step in range(40) if (a := ctl.observe(reading(step), step * 0.5))]
    assert resizes == [1536]
    assert ctl.cells == 1536


def test_pressure_at_the_floor_still_stops_recovery():
    ctl = DegradationController(config(max_cells=256))
    for t in range(20):  # far below the reserve, and the cache is already one sequence
        assert ctl.observe(free(RESERVE - 4 * GiB), float(t)) is None
    assert ctl._healthy_since is None


def test_margin_above_reserve_holds_instead_of_growing():
    ctl = DegradationController(config())
    ctl.observe(free(RESERVE - 1024 * MiB), 0.0)  # -> 1024 cells
    just_above = free(RESERVE + 100 * MiB)  # above the reserve, inside the 256 MiB margin
    assert all(ctl.observe(just_above, float(t)) is None for t in range(1, 30))
    assert ctl.cells == 1024


def test_gpu_pool_sets_the_size_when_layers_are_offloaded():
    from parallama.memory.probes import GpuDevice

    ctl = DegradationController(config(gpu_fraction=1))
    reading = MemoryReading(host_available=30 * GiB, host_total=32 * GiB,
                            gpus=(GpuDevice(0, "fake", RESERVE - 1024 * MiB, 24 * GiB),))
    assert ctl.observe(reading, 0.0) == Resize(1024)


# --- the scheduler's levers (fake backend) ----------------------------------------------------


def run_all(sched: Scheduler, limit: int = 500, kv_full: list[int] | None = None) -> dict[str, list[int]]:
    """Step to the end; ``kv_full`` collects the running counts the scheduler reports when KV runs out."""
    outputs: dict[str, list[int]] = {}
    for _ in range(limit):
        if not sched.has_work:
            break
        result = sched.step()
        if result.kv_full_running and kv_full is not None:
            kv_full.append(result.kv_full_running)
        for request_id, event in result.events:
            outputs.setdefault(request_id, []).extend(event.token_ids)
        assert sched.backend.cells_used == sched.kv_cells_used()
    assert not sched.has_work
    return outputs


def make(n_ctx: int, n_seq_max: int = 4) -> Scheduler:
    return Scheduler(FakeBackend(n_ctx=n_ctx, n_seq_max=n_seq_max, n_batch=64), SchedulerConfig(ctx_size=200,
                                                                                             growth_margin=4))


def add(sched: Scheduler, name: str, prompt: str, max_tokens: int) -> None:
    tokens = sched.backend.tokenize(prompt)
    sched.add(Request(name, tokens, SamplingParams(temperature=0, max_tokens=max_tokens), 1))


def test_kv_full_parks_the_newest_and_it_resumes_exactly():
    roomy = make(n_ctx=1000)
    tight = make(n_ctx=60)
    kv_full: list[int] = []
    for sched in (roomy, tight):
        for i, prompt in enumerate(["abc", "hij", "opq", "uvw"]):
            add(sched, f"r{i}", prompt, 20)
    expected, got = run_all(roomy), run_all(tight, kv_full=kv_full)
    assert tight.num_preemptions > 0 and kv_full  # it really ran out, and reported it with the step
    assert all(2 <= running <= 4 for running in kv_full)
    assert got == expected  # parked KV came back: every output is the same as without pressure
    assert tight.backend.cells_used == 0 and sorted(tight.free_ids) == [0, 1, 2, 3]


def test_resize_parks_everything_rebuilds_and_restores():
    sched = make(n_ctx=400)
    reference = make(n_ctx=400)
    for s in (sched, reference):
        for i, prompt in enumerate(["abcd", "efgh", "ijkl"]):
            add(s, f"r{i}", prompt, 30)
    expected = run_all(reference)
    outputs: dict[str, list[int]] = {}
    for _ in range(5):
        for request_id, event in sched.step().events:
            outputs.setdefault(request_id, []).extend(event.token_ids)
    assert len(sched.running) == 3
    sched.resize(120)
    assert sched.backend.n_ctx == 120 and sched.num_resizes == 1
    assert len(sched.waiting) == 3 and all(g[0].parked is not None for g in sched.waiting)
    for request_id, tokens in run_all(sched).items():
        outputs.setdefault(request_id, []).extend(tokens)
    assert outputs == expected
