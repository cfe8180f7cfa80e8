"""POST /v1/chat/completions and POST /v1/completions."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from parallama.batching import RequestStream
from parallama.server import generation as gen
from parallama.server import tools
from parallama.server.errors import InvalidRequest
from parallama.server.logprobs import chat_logprobs, completion_logprobs
from parallama.server.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields
from parallama.server.state import Served, served
from parallama.server.streaming import ChunkWriter, chat_events, chat_tool_events, completion_events, usage_dict

router = APIRouter()
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, http: Request):
    s = _checked(http, body)
    plan = tools.plan_tools(body)
    native = s.template.takes_tools
    messages = tools.template_messages(body.messages, plan, native)
    text = s.template.render(messages, [t.model_dump(exclude_none=True) for t in plan.tools] if plan and native else None)
    prompt = s.engine.tokenize(text, add_special=True, parse_special=True)
    requested = body.max_completion_tokens or body.max_tokens
    limit = gen.resolve_max_tokens(requested, len(prompt), s.ctx_size, None, prompt_param="messages")
    params = gen.sampling_params(body, limit, s.n_vocab, await gen.compile_constraint(body, s.engine, plan))
    n = _n(body, s)
    head = _head("chatcmpl", "chat.completion", s)
    stream = gen.submit(s.engine, prompt, params, n, s.request_timeout)
    calls_expected = plan is not None and plan.choice != "none"
    chat_lp = None if params.logprobs is None else (lambda _, lps: chat_logprobs(lps, s.engine.token_bytes))
    if body.stream:
        writer = ChunkWriter({**head, "object": "chat.completion.chunk"}, _include_usage(body))
        events = chat_tool_events([stream], n, writer) if calls_expected else chat_events([stream], n, writer, chat_lp)
        return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)
    outcome = await gen.collect([stream], n, http)
    choices = [{"index": i, **_assistant_message(c.text, c.finish_reason, calls_expected),
                "logprobs": chat_lp(i, c.logprobs) if chat_lp else None} for i, c in enumerate(outcome.choices)]
    return JSONResponse({**head, "choices": choices, "usage": usage_dict(outcome.usage)})


@router.post("/v1/completions")
async def completions(body: CompletionRequest, http: Request):
    s = _checked(http, body)
    prompts = _prompt_tokens(body, s)
    n = _n(body, s)
    max_tokens = [gen.resolve_max_tokens(body.max_tokens, len(p), s.ctx_size, COMPLETIONS_DEFAULT_MAX_TOKENS,
                                         prompt_param="prompt") for p in prompts]
    constraint = await gen.compile_constraint(body, s.engine)
    streams: list[RequestStream] = []
    try:
        for prompt, limit in zip(prompts, max_tokens):
            params = gen.sampling_params(body, limit, s.n_vocab, constraint)
            streams.append(gen.submit(s.engine, prompt, params, n, s.request_timeout))
    except Exception:
        for stream in streams:
            stream.cancel()
        raise
    echoes = [s.engine.detokenize(p) if body.echo else "" for p in prompts for _ in range(n)]
    head = _head("cmpl", "text_completion", s)
    offsets = [len(echo) for echo in echoes]  # where each choice's next token starts in its text

    def completion_lp(index: int, lps: list) -> dict:
        out = completion_logprobs(lps, s.engine.token_bytes, offsets[index])
        offsets[index] += sum(len(t) for t in out["tokens"])
        return out

    lp = None if body.logprobs is None else completion_lp
    if body.stream:
        writer = ChunkWriter(head, _include_usage(body))
        return StreamingResponse(completion_events(streams, n, writer, echoes, lp), media_type="text/event-stream",
                                 headers=SSE_HEADERS)
    outcome = await gen.collect(streams, n, http)
    choices = [{"index": i, "text": echoes[i] + c.text, "logprobs": lp(i, c.logprobs) if lp else None,
                "finish_reason": c.finish_reason} for i, c in enumerate(outcome.choices)]
    return JSONResponse({**head, "choices": choices, "usage": usage_dict(outcome.usage)})


def _assistant_message(text: str, finish_reason: str | None, calls_expected: bool) -> dict:
    content, calls = tools.parse_calls(text) if calls_expected else (text, [])
    message = {"role": "assistant", "content": content, "refusal": None}
    if calls:
        message["tool_calls"] = [call.as_dict() for call in calls]
        finish_reason = "tool_calls"
    return {"message": message, "finish_reason": finish_reason}


def _checked(http: Request, body: SamplingFields) -> Served:
    s = served(http)
    s.check_model(body.model)
    gen.check_supported(body)
    return s


def _n(body: SamplingFields, s: Served) -> int:
    n = body.n or 1
    cap = s.engine.num_slots
    if n > cap:
        raise InvalidRequest(f"n={n} is more than the {cap} sequences this server runs at once", "n")
    return n


def _prompt_tokens(body: CompletionRequest, s: Served) -> list[list[int]]:
    prompt = body.prompt
    if isinstance(prompt, str):
        prompts = [s.engine.tokenize(prompt, add_special=True, parse_special=True)]
    elif all(isinstance(p, str) for p in prompt):
        prompts = [s.engine.tokenize(p, add_special=True, parse_special=True) for p in prompt]
    elif all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]
    else:
        prompts = [list(p) for p in prompt]
    for tokens in prompts:
        gen.check_prompt_tokens(tokens, s.n_vocab)
    return prompts


def _include_usage(body: SamplingFields) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


def _head(prefix: str, obj: str, s: Served) -> dict:
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": obj, "created": int(time.time()), "model": s.model_id}
