"""What the routes share: the served model once it is loaded, reached through ``app.state``."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from parallama.batching import Engine
from parallama.server.chat_template import ChatTemplate
from parallama.server.errors import ModelNotFound, NotReady

ANY_NAME = "*"


@dataclass(frozen=True, slots=True)
class ModelNames:
    """The names a request's ``model`` may use. ``model_id`` is what responses and /v1/models say."""

    model_id: str
    aliases: frozenset[str]
    any_name: bool = False  # "*" among the aliases: answer whatever name a client hard-codes

    @classmethod
    def from_alias(cls, alias: str | None, file_stem: str) -> ModelNames:
        """``--model-alias "a,b,*"``: the first real name is the id (default: the GGUF file's stem)."""
        names = [n.strip() for n in (alias or "").split(",") if n.strip()]
        real = [n for n in names if n != ANY_NAME]
        model_id = real[0] if real else file_stem
        return cls(model_id, frozenset(real) | {model_id}, ANY_NAME in names)

    def accepts(self, requested: str) -> bool:
        return self.any_name or requested in self.aliases


@dataclass(slots=True)
class Served:
    """The loaded model and its engine, as the HTTP layer sees them."""

    engine: Engine
    names: ModelNames
    ctx_size: int
    plan: str
    template: ChatTemplate
    created: int
    request_timeout: float | None = None

    @property
    def model_id(self) -> str:
        return self.names.model_id

    @property
    def n_vocab(self) -> int:
        return self.engine.facts.n_vocab

    def check_model(self, requested: str | None) -> None:
        if requested and not self.names.accepts(requested):
            raise ModelNotFound(f"The model '{requested}' does not exist; this server serves '{self.model_id}'.",
                                param="model")


def served(request: Request) -> Served:
    value = getattr(request.app.state, "served", None)
    if value is None:
        raise NotReady("the model is still loading; retry shortly", headers={"Retry-After": "1"})
    return value
