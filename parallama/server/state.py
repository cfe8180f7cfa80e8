"""What the routes share: the served model once it is loaded, reached through ``app.state``."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from parallama.batching import Engine
from parallama.server.chat_template import ChatTemplate
from parallama.server.errors import ModelNotFound, NotReady


@dataclass(slots=True)
class Served:
    """The loaded model and its engine, as the HTTP layer sees them."""

    engine: Engine
    model_id: str
    ctx_size: int
    plan: str
    template: ChatTemplate
    created: int
    request_timeout: float | None = None

    @property
    def n_vocab(self) -> int:
        return self.engine.backend.facts.n_vocab

    def check_model(self, requested: str | None) -> None:
        if requested and requested != self.model_id:
            raise ModelNotFound(f"The model '{requested}' does not exist; this server serves '{self.model_id}'.",
                                param="model")


def served(request: Request) -> Served:
    value = getattr(request.app.state, "served", None)
    if value is None:
        raise NotReady("the model is still loading; retry shortly", headers={"Retry-After": "1"})
    return value
