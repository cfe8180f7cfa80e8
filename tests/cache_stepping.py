"""Driving a Scheduler with a prefix cache step by step on the fake backend, checking invariants each step."""

from __future__ import annotations

from collections.abc import Callable

from parallama.batching.scheduler import Scheduler


def drain_checked(sched: Scheduler, check: Callable[[Scheduler], None], limit: int) -> dict[str, list[int]]:
    """Step until no work is left (at most ``limit`` steps), calling ``check`` after every step; the token ids
    each request received. With nothing running, only the cache may hold cells."""
    out: dict[str, list[int]] = {}
    for _ in range(limit):
        if not sched.has_work:
            break
        for request_id, event in sched.step().events:
            out.setdefault(request_id, []).extend(event.token_ids)
        check(sched)
    assert not sched.has_work
    assert sched.backend.cells_used == sched.kv_cells_cached(), "with nothing running, only the cache holds cells"
    return out


def letters(sched: Scheduler, tokens: list[int]) -> str:
    """The fake backend's tokens as the letters they stand for."""
    return "".join(sched.backend.token_bytes(t).decode() for t in tokens)
