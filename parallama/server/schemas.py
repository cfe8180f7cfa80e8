"""OpenAI request bodies (pydantic). Responses are plain dicts built in the routes: cheaper per token.

Fields we do not implement are declared so that a request using them gets a clear 400 instead of
being silently ignored; fields nobody declared are dropped, never passed through to llama.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

MAX_STOPS = 4
MAX_STOP_LENGTH = 256


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str | None = Field(None, max_length=64)
    description: str | None = None
    json_schema: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class SamplingFields(BaseModel):
    """Fields shared by /v1/chat/completions and /v1/completions. ``None`` means the default."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, description="llama.cpp extension; 0 = off")
    min_p: float | None = Field(None, ge=0.0, le=1.0, description="llama.cpp extension")
    repeat_penalty: float | None = Field(None, gt=0.0, le=10.0, description="llama.cpp extension")
    max_tokens: int | None = Field(None, ge=1)
    stop: str | Annotated[list[str], Field(max_length=MAX_STOPS)] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    n: int | None = Field(None, ge=1, le=256)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=512)
    # Structured output: OpenAI's response_format, and llama-server's json_schema and grammar (GBNF)
    response_format: ResponseFormat | None = None
    json_schema: dict[str, Any] | None = None
    grammar: str | None = Field(None, max_length=65536)
    # Declared only to refuse them clearly (see UNSUPPORTED).
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    best_of: Any = None
    suffix: Any = None

    @field_validator("stop")
    @classmethod
    def _bounded_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        for stop in [value] if isinstance(value, str) else value or []:
            if len(stop) > MAX_STOP_LENGTH:
                raise ValueError(f"each stop string must be at most {MAX_STOP_LENGTH} characters")
        return value

    implemented: ClassVar[frozenset[str]] = frozenset()  # UNSUPPORTED fields this endpoint does implement

    def unsupported_field(self) -> str | None:
        """The first field set that this server does not implement, if any."""
        for name, allowed in UNSUPPORTED.items():
            if name in self.implemented:
                continue
            value = getattr(self, name)
            if value is not None and value not in allowed:
                return name
        return None

    def constraint_specs(self) -> list[tuple[str, str, Any]]:
        """(kind, param, source) of each output constraint asked for: kind is "json_schema",
        "json_object" or "grammar"; param names the field for errors; source is None when missing."""
        specs = []
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            specs.append(("json_object", "response_format", {"type": "object"}))
        elif rf is not None and rf.type == "json_schema":
            schema = rf.json_schema.json_schema if rf.json_schema is not None else None
            specs.append(("json_schema", "response_format.json_schema", schema))
        if self.json_schema is not None:
            specs.append(("json_schema", "json_schema", self.json_schema))
        if self.grammar is not None:
            specs.append(("grammar", "grammar", self.grammar))
        return specs

    def logprobs_wanted(self) -> int | None:
        return None

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


# Field -> values that mean "not used" (accepted because clients send them by default).
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "tools": ([],),
    "tool_choice": ("none",),
    "functions": ([],),
    "function_call": ("none",),
    "best_of": (1,),
    "suffix": ("",),
}


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(pattern=r"^[a-zA-Z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionTool(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: FunctionDef


class FunctionName(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: FunctionName


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    arguments: str = "{}"


class ToolCallIn(BaseModel):
    """A call an assistant message made earlier in the conversation."""

    model_config = ConfigDict(extra="ignore")
    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None  # assistant messages
    tool_call_id: str | None = None  # tool messages: the call this answers

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[FunctionTool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    implemented: ClassVar[frozenset[str]] = frozenset({"tools", "tool_choice"})

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return value

    def logprobs_wanted(self) -> int | None:
        """None: no logprobs; k: the sampled token's and the k most likely tokens'."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        union_mode="left_to_right",
    )
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=5)

    def logprobs_wanted(self) -> int | None:
        return self.logprobs

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be an empty list")
        return value
