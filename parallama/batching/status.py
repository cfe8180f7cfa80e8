"""A point-in-time picture of the engine for ``GET /status``. Built on the worker thread."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from parallama.batching.engine import Engine


@dataclass(slots=True)
class SlotStatus:
    seq_id: int
    state: str  # idle | prefill | generating
    tokens: int  # tokens in this sequence's KV cells
    request_id: str | None = None


@dataclass(slots=True)
class EngineStatus:
    cap: int
    active: int
    slots: list[SlotStatus]
    waiting: int
    cells_total: int
    cells_used: int  # held by sequences
    cells_cached: int  # held by the prefix cache (given back first when room runs out)
    steps: int
    decode_calls: int
    preemptions: int
    extra: dict[str, Any] = field(default_factory=dict)


def snapshot(engine: Engine) -> EngineStatus:
    sched = engine.scheduler
    by_id = {s.seq_id: s for s in sched.running}
    slots = []
    for seq_id in range(sched.num_slots):
        seq = by_id.get(seq_id)
        if seq is None:
            slots.append(SlotStatus(seq_id, "idle", 0))
        else:
            state = "generating" if seq.output else "prefill"
            slots.append(SlotStatus(seq_id, state, seq.num_computed, seq.request.request_id))
    extra = {}
    if engine.controller is not None:
        extra["memory"] = engine.controller.describe()
        extra["degradation"] = {"reason": engine.controller.reason, "preemptions": sched.num_preemptions,
                                "resizes": sched.num_resizes}
    return EngineStatus(
        cap=sched.cap,
        active=len(sched.running),
        slots=slots,
        waiting=engine.num_queued,
        cells_total=engine.backend.n_ctx,
        cells_used=sched.kv_cells_used() - sched.kv_cells_cached(),
        cells_cached=sched.kv_cells_cached(),
        steps=sched.num_steps,
        decode_calls=engine.backend.decode_calls,
        preemptions=sched.num_preemptions,
        extra=extra,
    )
