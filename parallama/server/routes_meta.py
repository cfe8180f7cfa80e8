"""GET /v1/models, /v1/models/{id}, /health and /status."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from parallama.server.state import Served, served

router = APIRouter()


def _model_card(s: Served) -> dict:
    facts = s.engine.backend.facts
    return {"id": s.model_id, "object": "model", "created": s.created, "owned_by": "parallama",
            "meta": {"n_ctx_per_sequence": s.ctx_size, "n_ctx_train": facts.n_ctx_train, "n_vocab": facts.n_vocab,
                     "size_bytes": facts.weights_bytes}}


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
    st = await s.engine.status()
    slots = [{"seq_id": slot.seq_id, "state": slot.state, "tokens": slot.tokens, "request_id": slot.request_id}
             for slot in st.slots]
    return {
        "model": s.model_id,
        "plan": s.plan,
        "sequences": {"cap": st.cap, "active": st.active, "max": len(st.slots), "ctx_size": s.ctx_size,
                      "slots": slots},
        "queue": {"waiting": st.waiting},
        "kv": {"cells_total": st.cells_total, "cells_used": st.cells_used, "cells_cached": st.cells_cached},
        "engine": {"steps": st.steps, "decode_calls": st.decode_calls, "preemptions": st.preemptions},
        **st.extra,  # "memory" and "degradation" when the controller runs
    }
