"""Property-based fuzzing of the API with hypothesis: whatever the body, no 5xx, every 4xx is
OpenAI-shaped, and a normal request still works afterwards."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serving import live_server

pytestmark = pytest.mark.model

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                    st.text(max_size=40))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                           st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=12)
roles = st.sampled_from(["system", "user", "assistant", "tool", "developer", "", "robot", None])
messages = st.lists(st.fixed_dictionaries({"role": roles}, optional={"content": st.one_of(
    st.text(max_size=60), st.none(), st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": st.text(
        max_size=20)}), max_size=2), json_values), "name": json_values}), max_size=3)
# Small max_tokens keep the valid requests fast; the other fields roam freely, invalid values included.
fields = {
    "model": st.one_of(st.none(), st.text(max_size=20)),
    "temperature": st.one_of(st.floats(-1, 3), json_values),
    "top_p": st.one_of(st.floats(-1, 2), json_values),
    "n": st.one_of(st.integers(-2, 6), json_values),
    "stop": st.one_of(st.none(), st.text(max_size=10), st.lists(st.text(max_size=300), max_size=6), json_values),
    "seed": st.one_of(st.integers(-2**70, 2**70), json_values),
    "logit_bias": st.one_of(st.dictionaries(st.text(max_size=7), st.floats(-200, 200), max_size=3), json_values),
    "presence_penalty": st.one_of(st.floats(-3, 3), json_values),
    "stream": st.one_of(st.booleans(), json_values),
    "stream_options": json_values,
    "tools": json_values,
    "logprobs": json_values,
    "unknown_field": json_values,
}
max_tokens = st.one_of(st.integers(-5, 6), st.text(max_size=3))  # always set: no request runs long
chat_bodies = st.fixed_dictionaries({"messages": messages, "max_tokens": max_tokens}, optional={**fields})
completion_bodies = st.fixed_dictionaries({"max_tokens": max_tokens}, optional={
    **fields, "prompt": st.one_of(st.text(max_size=40), st.lists(st.integers(-5, 60000), max_size=5),
                                  st.lists(st.text(max_size=10), max_size=3), json_values),
    "echo": json_values})


@pytest.fixture(scope="module")
def client():
    with live_server(parallel=4, ctx_size=256, request_timeout=10) as server, httpx.Client(base_url=server.base_url, timeout=60) as http:
        yield http


def post(client: httpx.Client, path: str, body: dict) -> httpx.Response:
    # json.dumps, not httpx's encoder: it also sends NaN and Infinity, which Python's parser accepts.
    return client.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})


def check(response: httpx.Response) -> None:
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["message"]
    elif response.headers["content-type"].startswith("text/event-stream"):
        assert response.text.rstrip().endswith("data: [DONE]")


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(body=chat_bodies)
def test_fuzz_chat(client, body):
    check(post(client, "/v1/chat/completions", body))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(body=completion_bodies)
def test_fuzz_completions(client, body):
    check(post(client, "/v1/completions", body))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200))
def test_fuzz_raw_bytes(client, raw):
    check(client.post("/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"}))


def test_still_serves_after_fuzzing(client):
    response = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                         "max_tokens": 3})
    assert response.status_code == 200
    status = client.get("/status").json()
    assert status["sequences"]["active"] == 0 and status["kv"]["cells_used"] == 0
