"""Server-sent events in OpenAI's exact chunk shapes."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from parallama.batching import Event, RequestStream, Usage
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
    for chunk in _role_chunks(len(streams) * n, writer):
        yield chunk
    async for text in _events(streams, n, writer, _TextChunks(writer, _chat_choice, logprobs_of)):
        yield text


async def chat_tool_events(streams: list[RequestStream], n: int, writer: ChunkWriter) -> AsyncIterator[str]:
    """Chat chunks when tools are in play: text streams as content until a call opens; each call goes
    out once complete as OpenAI's ``delta.tool_calls`` (id, type and name first, then its arguments)."""
    for chunk in _role_chunks(len(streams) * n, writer):
        yield chunk
    async for text in _events(streams, n, writer, _ToolChunks(writer)):
        yield text


async def completion_events(streams: list[RequestStream], n: int, writer: ChunkWriter,
                            echoes: list[str], logprobs_of: LogprobsOf = None) -> AsyncIterator[str]:
    for index, echo in enumerate(echoes):
        if echo:
            yield writer.chunk([_completion_choice(index, echo, None)])
    async for text in _events(streams, n, writer, _TextChunks(writer, _completion_choice, logprobs_of)):
        yield text


def _role_chunks(choices: int, writer: ChunkWriter) -> list[str]:
    return [writer.chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                           "finish_reason": None}]) for index in range(choices)]


async def _events(streams, n, writer: ChunkWriter, chunks_of: Callable[[int, Event], list[str]]) -> AsyncIterator[str]:
    """Every event's chunks, then the usage chunk if asked for, then [DONE]; an engine error ends the
    stream the OpenAI way (an error event, then [DONE])."""
    usage = Usage(0, 0)
    async for index, event in merged(streams, n):
        if event.error:
            yield error_event(event.error)
            yield DONE
            return
        for chunk in chunks_of(index, event):
            yield chunk
        if event.usage:
            usage += event.usage
    if writer.include_usage:
        yield writer.chunk([], usage)
    yield DONE


class _TextChunks:
    """An event's text (with its logprobs when asked for), then its finish_reason."""

    def __init__(self, writer: ChunkWriter, make_choice, logprobs_of: LogprobsOf) -> None:
        self.writer, self.make_choice, self.logprobs_of = writer, make_choice, logprobs_of

    def __call__(self, index: int, event: Event) -> list[str]:
        out = []
        logprobs = self.logprobs_of(index, event.logprobs) if self.logprobs_of and event.logprobs else None
        if event.text or logprobs:
            out.append(self.writer.chunk([self.make_choice(index, event.text, None, logprobs)]))
        if event.finish_reason:
            out.append(self.writer.chunk([self.make_choice(index, "", event.finish_reason)]))
        return out


class _ToolChunks:
    """Content until a call opens; each complete call as two ``delta.tool_calls`` chunks; finish_reason
    "tool_calls" when the choice made any."""

    def __init__(self, writer: ChunkWriter) -> None:
        self.writer = writer
        self.parsers: dict[int, CallStream] = {}

    def __call__(self, index: int, event: Event) -> list[str]:
        parser = self.parsers.setdefault(index, CallStream())
        text, calls = parser.feed(event.text)
        if event.finish_reason:
            text += parser.finish()
        out = [self.writer.chunk([_chat_choice(index, text, None)])] if text else []
        first = len(parser.calls) - len(calls)
        for k, call in enumerate(calls, start=first):
            head = {"index": k, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}
            out.append(self._delta(index, {"tool_calls": [head]}))
            out.append(self._delta(index, {"tool_calls": [{"index": k, "function": {"arguments": call.arguments}}]}))
        if event.finish_reason:
            out.append(self.writer.chunk([_chat_choice(index, "", "tool_calls" if parser.calls else event.finish_reason)]))
        return out

    def _delta(self, index: int, delta: dict) -> str:
        return self.writer.chunk([{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}])


def _chat_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict[str, Any]:
    delta = {"content": text} if text or logprobs else {}
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def _completion_choice(index: int, text: str, finish_reason: str | None,
                       logprobs: dict | None = None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
