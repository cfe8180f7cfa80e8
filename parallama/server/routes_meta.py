"""GET /v1/models, /v1/models/{id}, /health, /status and /metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from parallama.batching import EngineStopped
from parallama.batching.stats import EngineStats
from parallama.memory.degradation import ControllerStats
from parallama.memory.probes import format_size
from parallama.server.metrics import metrics_of
from parallama.server.state import Served, served

router = APIRouter()


def _model_card(s: Served) -> dict:
    """OpenAI's Model object, nothing more: the model's own facts are in /status."""
    return {"id": s.model_id, "object": "model", "created": s.created, "owned_by": "parallama"}


@router.get("/v1/models")
async def list_models(http: Request) -> dict:
    return {"object": "list", "data": [_model_card(served(http))]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, http: Request) -> dict:
    s = served(http)
    s.check_model(model_id)
    return _model_card(s)


@router.get("/health")
async def health(http: Request) -> JSONResponse:
    if getattr(http.app.state, "served", None) is None:
        failed = getattr(http.app.state, "load_error", None)
        return JSONResponse({"status": "error" if failed else "loading"}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/status")
async def status(http: Request) -> dict:
    s = served(http)
    return render_status(s, await s.engine.status())


@router.get("/metrics")
async def metrics(http: Request) -> Response:
    """Prometheus exposition, from the same snapshot as /status. It needs the API key like /status (the
    guard opens only /health). While the model loads, or once the engine stopped, only the edge's own
    counters are shown, so a scrape still succeeds."""
    s = getattr(http.app.state, "served", None)
    stats = None
    if s is not None:
        try:
            stats = await s.engine.status()
        except EngineStopped:
            pass
    body, content_type = metrics_of(http.app).render(http.headers.get("accept"), s.model_id if s else None, stats)
    return Response(body, media_type=content_type)


def render_status(s: Served, st: EngineStats) -> dict:
    sched, facts = st.scheduler, s.engine.facts
    slots = [{"seq_id": slot.seq_id, "state": slot.state, "tokens": slot.tokens, "request_id": slot.request_id}
             for slot in sched.slots]
    body = {
        "model": s.model_id,
        "model_facts": {"n_ctx_train": facts.n_ctx_train, "n_vocab": facts.n_vocab, "size_bytes": facts.weights_bytes},
        "plan": s.plan,
        "sequences": {"cap": st.cap, "active": sched.running, "max": len(sched.slots), "ctx_size": s.ctx_size,
                      "slots": slots},
        "queue": {"waiting": st.queued},
        "kv": {"cells_total": st.cells_total, "cells_used": sched.cells_used, "cells_cached": st.cache.cells},
        "prefix_cache": _prefix_cache(st, facts.kv_bytes_per_token),
        "engine": {"steps": sched.steps, "decode_calls": st.decode_calls, "preemptions": sched.preemptions,
                   "tokens_generated": st.requests.generation_tokens if st.requests else 0},
    }
    if st.controller is not None:
        body["memory"] = _memory(st.controller)
        body["degradation"] = {"reason": st.controller.reason, "preemptions": sched.preemptions,
                               "resizes": sched.resizes, "cache_ram_releases": st.controller.releases}
    return body


def _prefix_cache(st: EngineStats, kv_bytes_per_token: int) -> dict:
    c = st.cache
    return {"entries": c.entries, "cells": c.cells, "kv_bytes": c.cells * kv_bytes_per_token, "hits": c.hits,
            "misses": c.misses, "tokens_reused": c.tokens_reused, "evictions": c.evictions,
            "ram": {"entries": c.ram_entries, "bytes": c.ram_bytes, "budget_bytes": c.ram_budget_bytes}}


def _memory(c: ControllerStats) -> dict:
    memory = {"reserve_bytes": c.reserve_bytes, "reserve": format_size(c.reserve_bytes)}
    r = c.reading
    if r is not None:
        memory |= {"host_free_bytes": r.host_free, "host_total_bytes": r.host_total,
                   "cgroup_limit_bytes": r.cgroup_limit, "gpu_free_bytes": r.gpu_free,
                   "gpu_total_bytes": r.gpu_total}
    return memory
