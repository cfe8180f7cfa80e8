"""From a validated request to engine submissions, and back to per-choice results.

Shared by chat and completions: sampling parameters, context-length checks, the queue-full
answer, and watching for clients that hang up.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from fastapi import Request

from parallama.batching import Engine, EngineStopped, Event, QueueFull, RequestStream, Usage
from parallama.sequences import SamplingParams
from parallama.sequences.backend import TokenLogprob
from parallama.sequences.constraint import Constraint, ConstraintCompiler, ConstraintError
from parallama.server.errors import APIError, ContextLengthExceeded, InvalidRequest, Overloaded, Unsupported
from parallama.server.schemas import SamplingFields
from parallama.server.tools import OPEN, ToolPlan, call_grammar

RETRY_AFTER_SECONDS = "1"


@dataclass(slots=True)
class Choice:
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass(slots=True)
class Outcome:
    choices: list[Choice]
    usage: Usage = field(default_factory=lambda: Usage(0, 0))


def check_supported(body: SamplingFields) -> None:
    name = body.unsupported_field()
    if name is not None:
        raise Unsupported(f"'{name}' is not supported by this server", param=name)


async def compile_constraint(body: SamplingFields, engine: Engine, plan: ToolPlan | None = None) -> Constraint | None:
    """The request's output constraint, compiled on a worker thread of the event loop (never the
    engine's): a schema that cannot be compiled is a 400 naming the field, never free text."""
    specs = body.constraint_specs()
    if plan is not None and plan.choice != "none":
        if specs:
            raise InvalidRequest("tool calls and an output format cannot both constrain one answer", specs[0][1])
        return await _compile(engine, "tools", _tool_grammar(plan))
    if len(specs) > 1:
        raise InvalidRequest(f"use one of {', '.join(p for _, p, _ in specs)}, not several", specs[1][1])
    if not specs:
        return None
    kind, param, source = specs[0]
    if source is None:
        raise InvalidRequest(f"{param} needs a 'schema'", f"{param}.schema")
    return await _compile(engine, param, lambda c: (c.gbnf if kind == "grammar" else c.json_schema)(source))


def _tool_grammar(plan: ToolPlan) -> Callable[[ConstraintCompiler], Constraint]:
    if plan.constrained_from_start:
        return lambda c: c.lark(call_grammar(plan), "tools")
    return lambda c: c.lark(call_grammar(plan, after_open=True), "tools", trigger=OPEN)  # auto: lazy


async def _compile(engine: Engine, param: str, build: Callable[[ConstraintCompiler], Constraint]) -> Constraint:
    if engine.constraints is None:
        raise Unsupported("this engine cannot constrain its output", param=param)
    try:
        return await asyncio.to_thread(build, engine.constraints)
    except ConstraintError as exc:
        raise InvalidRequest(f"{param}: {exc}", param) from exc


def sampling_params(body: SamplingFields, max_tokens: int, n_vocab: int,
                    constraint: Constraint | None = None) -> SamplingParams:
    return SamplingParams(
        temperature=1.0 if body.temperature is None else body.temperature,
        top_k=body.top_k or 0,
        top_p=1.0 if body.top_p is None else body.top_p,
        min_p=body.min_p or 0.0,
        seed=body.seed,
        repeat_penalty=body.repeat_penalty or 1.0,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        logit_bias=_logit_bias(body.logit_bias, n_vocab),
        stop=body.stop_list(),
        max_tokens=max_tokens,
        constraint=constraint,
        logprobs=body.logprobs_wanted(),
    )


def _logit_bias(bias: dict[str, float] | None, n_vocab: int) -> tuple[tuple[int, float], ...]:
    out = []
    for key, value in (bias or {}).items():
        if not key.lstrip("-").isdigit() or not 0 <= int(key) < n_vocab:
            raise InvalidRequest(f"logit_bias key {key!r} is not a token id in [0, {n_vocab})", "logit_bias")
        out.append((int(key), value))
    return tuple(out)


def resolve_max_tokens(requested: int | None, prompt_tokens: int, ctx_size: int, default: int | None,
                       prompt_param: str) -> int:
    """Never truncate silently: a prompt or a max_tokens that cannot fit is a 400 with the numbers.
    ``prompt_param`` names the field that holds the prompt: "messages" on chat, "prompt" on completions."""
    room = ctx_size - prompt_tokens
    if room < 1:
        raise ContextLengthExceeded(
            f"This model's context is {ctx_size} tokens per sequence; your prompt has {prompt_tokens} tokens.",
            param=prompt_param)
    if requested is None:
        return min(default, room) if default else room
    if requested > room:
        raise ContextLengthExceeded(
            f"This model's context is {ctx_size} tokens per sequence; you requested {prompt_tokens + requested} "
            f"tokens ({prompt_tokens} in the prompt, {requested} for the completion).", param="max_tokens")
    return requested


def check_prompt_tokens(tokens: list[int], n_vocab: int) -> None:
    if not tokens:
        raise InvalidRequest("the prompt is empty", "prompt")
    if any(not 0 <= t < n_vocab for t in tokens):
        raise InvalidRequest(f"prompt token ids must be in [0, {n_vocab})", "prompt")


def submit(engine: Engine, prompt: list[int], params: SamplingParams, n: int,
           timeout: float | None = None) -> RequestStream:
    try:
        return engine.submit(prompt, params, n, timeout)
    except QueueFull as exc:
        raise Overloaded(f"the server is busy ({exc}); retry shortly",
                         headers={"Retry-After": RETRY_AFTER_SECONDS}) from exc
    except EngineStopped as exc:
        raise Overloaded(str(exc), headers={"Retry-After": RETRY_AFTER_SECONDS}) from exc


async def collect(streams: list[RequestStream], n: int, http: Request) -> Outcome:
    """Run requests to the end (non-streaming). A client that hangs up cancels them."""
    outcome = Outcome([Choice() for _ in range(len(streams) * n)])
    async with watch_disconnect(http, streams):
        for i, stream in enumerate(streams):
            async with stream:
                async for event in stream:
                    _raise_engine_error(event)
                    choice = outcome.choices[i * n + event.index]
                    choice.text += event.text
                    choice.finish_reason = event.finish_reason or choice.finish_reason
                    if event.logprobs:
                        choice.logprobs += event.logprobs
                    if event.usage:
                        outcome.usage += event.usage
    return outcome


async def merged(streams: list[RequestStream], n: int) -> AsyncIterator[tuple[int, Event]]:
    """Events of several requests as they come, tagged with the choice index across all of them."""
    if len(streams) == 1:
        async with streams[0] as stream:
            async for event in stream:
                yield event.index, event
        return
    queue: asyncio.Queue[tuple[int, Event] | None] = asyncio.Queue()

    async def pump(i: int, stream: RequestStream) -> None:
        async with stream:
            async for event in stream:
                await queue.put((i * n + event.index, event))
        await queue.put(None)

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()


def _raise_engine_error(event: Event) -> None:
    if event.error:
        raise APIError(event.error)


@contextlib.asynccontextmanager
async def watch_disconnect(http: Request, streams: list[RequestStream]) -> AsyncIterator[None]:
    """Cancel the requests when the client goes away before the answer is complete."""
    async def watch() -> None:
        while not await http.is_disconnected():
            await asyncio.sleep(0.05)
        for stream in streams:
            stream.cancel()

    task = asyncio.create_task(watch())
    try:
        yield
    finally:
        task.cancel()
