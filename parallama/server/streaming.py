"""Server-sent events in OpenAI's exact chunk shapes."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from parallama.batching import RequestStream, Usage
from parallama.sequences.backend import TokenLogprob
from parallama.server.generation import merged
from parallama.server.tools import CallStream

# (choice index, the logprobs of an event's tokens) -> the choice's "logprobs" value; None: not asked for
LogprobsOf = Callable[[int, list[TokenLogprob]], dict[str, Any]] | None

DONE = "data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def usage_dict(usage: Usage) -> dict[str, Any]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens, "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


def error_event(message: str) -> str:
    return sse({"error": {"message": message, "type": "server_error", "param": None, "code": None}})


class ChunkWriter:
    """Builds the chunks of one streamed response; ``choice`` fills in the endpoint's own fields."""

    def __init__(self, head: dict[str, Any], include_usage: bool) -> None:
        self.head = head
        self.include_usage = include_usage

    def chunk(self, choices: list[dict[str, Any]], usage: Usage | None = None) -> str:
        payload = {**self.head, "choices": choices}
        if self.include_usage:
            payload["usage"] = usage_dict(usage) if usage else None
        return sse(payload)


async def chat_events(streams: list[RequestStream], n: int, writer: ChunkWriter,
                      logprobs_of: LogprobsOf = None) -> AsyncIterator[str]:
    for index in range(len(streams) * n):
        writer_choice = {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None}
        yield writer.chunk([writer_choice])
    async for text in _events(streams, n, writer, _chat_choice, logprobs_of):
        yield text


async def completion_events(streams: list[RequestStream], n: int, writer: ChunkWriter,
                            echoes: list[str], logprobs_of: LogprobsOf = None) -> AsyncIterator[str]:
    for index, echo in enumerate(echoes):
        if echo:
            yield writer.chunk([_completion_choice(index, echo, None)])
    async for text in _events(streams, n, writer, _completion_choice, logprobs_of):
        yield text


async def _events(streams, n, writer, make_choice, logprobs_of: LogprobsOf) -> AsyncIterator[str]:
    usage = Usage(0, 0)
    async for index, event in merged(streams, n):
        if event.error:
            yield error_event("the engine failed while generating this request")
            yield DONE
            return
        logprobs = logprobs_of(index, event.logprobs) if logprobs_of and event.logprobs else None
        if event.text or logprobs:
            yield writer.chunk([make_choice(index, event.text, None, logprobs)])
        if event.finish_reason:
            yield writer.chunk([make_choice(index, "", event.finish_reason)])
        if event.usage:
            usage += event.usage
    if writer.include_usage:
        yield writer.chunk([], usage)
    yield DONE


async def chat_tool_events(streams: list[RequestStream], n: int, writer: ChunkWriter) -> AsyncIterator[str]:
    """Chat chunks when tools are in play: text streams as content until a call opens; each call goes
    out once complete as OpenAI's ``delta.tool_calls`` (id, type and name first, then its arguments)."""
    for index in range(len(streams) * n):
        yield writer.chunk([_chat_choice(index, "", None) | {"delta": {"role": "assistant", "content": ""}}])
    parsers: dict[int, CallStream] = {}
    usage = Usage(0, 0)
    async for index, event in merged(streams, n):
        if event.error:
            yield error_event("the engine failed while generating this request")
            yield DONE
            return
        parser = parsers.setdefault(index, CallStream())
        text, calls = parser.feed(event.text)
        if event.finish_reason:
            text += parser.finish()
        if text:
            yield writer.chunk([_chat_choice(index, text, None)])
        for call in calls:
            k = len(parser.calls) - len(calls) + calls.index(call)
            head = {"index": k, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}
            yield writer.chunk([{**_chat_choice(index, "", None), "delta": {"tool_calls": [head]}}])
            args = {"index": k, "function": {"arguments": call.arguments}}
            yield writer.chunk([{**_chat_choice(index, "", None), "delta": {"tool_calls": [args]}}])
        if event.finish_reason:
            reason = "tool_calls" if parser.calls else event.finish_reason
            yield writer.chunk([_chat_choice(index, "", reason)])
        if event.usage:
            usage += event.usage
    if writer.include_usage:
        yield writer.chunk([], usage)
    yield DONE


def _chat_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict[str, Any]:
    delta = {"content": text} if text or logprobs else {}
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def _completion_choice(index: int, text: str, finish_reason: str | None,
                       logprobs: dict | None = None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
