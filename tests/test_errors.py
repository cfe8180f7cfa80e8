"""Bad input gets a clear OpenAI-shaped error with the right status, and the server keeps serving."""

from __future__ import annotations

import httpx
import pytest
from serving import live_server

pytestmark = pytest.mark.model

OK_MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server():
    with live_server(parallel=4, ctx_size=256, max_body_bytes=64 * 1024) as srv:
        yield srv


@pytest.fixture()
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        yield client


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None, code: str | None = None):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == ("invalid_request_error" if status < 500 else "server_error")
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"messages": "hello"}, "messages"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -5}, "max_tokens"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"n": 0}, "n"),
        ({"n": 5}, "n"),  # more than the 4 sequences this server runs at once
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": "x" * 1000}, "stop"),
        ({"logit_bias": {"99999999": 5}}, "logit_bias"),
        ({"logit_bias": {"abc": 5}}, "logit_bias"),
        ({"logit_bias": {"42": 500}}, "logit_bias.42"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"top_logprobs": 5}, "top_logprobs"),
        ({"logprobs": 7}, "logprobs"),  # chat's logprobs is a boolean
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema.schema"),
    ],
)
def test_chat_field_bounds(http, change, param):
    body = {"messages": OK_MESSAGES, "max_tokens": 4, **change}
    assert_openai_error(http.post("/v1/chat/completions", json=body), 400, param=param)


@pytest.mark.parametrize(
    ("prompt", "param"),
    [([], "prompt"), ([-1, 5], "prompt"), ([[1, 2], [10**9]], "prompt"), (None, "prompt"), ({"a": 1}, "prompt")],
)
def test_completion_prompt_bounds(http, prompt, param):
    response = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2})
    assert_openai_error(response, 400, param=param)


def test_prompt_longer_than_context_is_refused_with_numbers(http):
    long_text = "word " * 400
    response = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": long_text}]})
    error = assert_openai_error(response, 400, param="messages", code="context_length_exceeded")
    assert "256" in error["message"]
    response = http.post("/v1/completions", json={"prompt": long_text})
    assert_openai_error(response, 400, param="prompt", code="context_length_exceeded")  # the field it has
    response = http.post("/v1/completions", json={"prompt": "hello", "max_tokens": 300})
    error = assert_openai_error(response, 400, param="max_tokens", code="context_length_exceeded")
    assert "256" in error["message"] and "300" in error["message"]


def test_bodies_that_are_not_json_objects(http):
    headers = {"Content-Type": "application/json"}
    assert_openai_error(http.post("/v1/chat/completions", content=b"{not json", headers=headers), 400)
    assert_openai_error(http.post("/v1/chat/completions", content=b"[1, 2]", headers=headers), 400)
    assert_openai_error(http.post("/v1/chat/completions", content=b"", headers=headers), 400)
    form = http.post("/v1/chat/completions", data={"messages": "hi"})
    assert_openai_error(form, 400, code="invalid_content_type")


def test_oversized_bodies_get_413(http):
    big = b'{"prompt": "' + b"a" * (70 * 1024) + b'"}'
    headers = {"Content-Type": "application/json"}
    assert_openai_error(http.post("/v1/completions", content=big, headers=headers), 413, code="request_too_large")

    def chunked():  # no Content-Length: the limit is enforced while the body streams in
        yield big[:1000]
        yield big[1000:]

    assert_openai_error(http.post("/v1/completions", content=chunked(), headers=headers), 413,
                        code="request_too_large")


def test_unknown_model_path_and_method(http):
    response = http.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": OK_MESSAGES})
    assert_openai_error(response, 404, param="model", code="model_not_found")
    assert_openai_error(http.get("/v1/nothing-here"), 404)
    assert_openai_error(http.delete("/v1/models"), 405)
    assert_openai_error(http.get("/v1/chat/completions"), 405)


def test_internal_errors_are_generic(server, http, monkeypatch):
    def explode(*args, **kwargs):
        raise RuntimeError("secret at 0x7f3a2b1c0d00 in /home/user/model.gguf")

    monkeypatch.setattr(server.served.template, "render", explode)
    response = http.post("/v1/chat/completions", json={"messages": OK_MESSAGES, "max_tokens": 2})
    error = assert_openai_error(response, 500)
    assert error["message"] == "internal server error"
    assert "0x" not in response.text and "Traceback" not in response.text and "secret" not in response.text


def test_error_after_streaming_started_ends_with_error_event(server, http, monkeypatch):
    from parallama.sequences.backend import BackendError

    backend = server.served.engine.backend
    real_decode = backend.decode
    calls = {"n": 0}

    def failing_decode(plan):
        calls["n"] += 1
        if calls["n"] == 4:  # after a few tokens have streamed
            raise BackendError("simulated GPU fault")
        return real_decode(plan)

    monkeypatch.setattr(backend, "decode", failing_decode)
    body = {"messages": OK_MESSAGES, "max_tokens": 50, "temperature": 0, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert '"error"' in lines[-2] and "simulated" not in lines[-2]
    assert any('"content"' in line for line in lines[1:-2])  # tokens had streamed before the fault
    monkeypatch.undo()
    ok = http.post("/v1/chat/completions", json={"messages": OK_MESSAGES, "max_tokens": 3})
    assert ok.status_code == 200  # the fault failed one request; the server serves on


def test_server_still_serves_after_bad_input(http):
    response = http.post("/v1/chat/completions", json={"messages": OK_MESSAGES, "max_tokens": 3})
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] <= 3
