"""The OpenAI API through HTTP, against a real uvicorn server and the real model."""

from __future__ import annotations

import json

import httpx
import pytest
from serving import live_server

pytestmark = pytest.mark.model

HELLO = [{"role": "user", "content": "Write a short poem about the sea."}]


@pytest.fixture(scope="module")
def server():
    with live_server() as srv:
        yield srv


@pytest.fixture()
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=120) as client:
        yield client


def chat(http, **body):
    body = {"messages": HELLO, "temperature": 0, "max_tokens": 24, **body}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def stream_chunks(http, path, body):
    with http.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)
    return [json.loads(line[6:]) for line in lines[:-1]]


def test_chat_non_streaming_shape_and_usage(http, server):
    out = chat(http, max_tokens=12)
    assert out["object"] == "chat.completion"
    assert out["model"] == server.served.model_id
    (choice,) = out["choices"]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"]
    assert "refusal" in choice["message"] and choice["message"]["refusal"] is None  # required by OpenAI's schema
    assert "system_fingerprint" not in out  # typed as a string there: absent rather than null
    assert choice["finish_reason"] == "length"
    rendered = server.served.template.render(HELLO)
    prompt_tokens = len(server.served.engine.tokenize(rendered, True, True))
    usage = out["usage"]
    assert usage == {"prompt_tokens": prompt_tokens, "completion_tokens": 12, "total_tokens": prompt_tokens + 12,
                     "prompt_tokens_details": {"cached_tokens": usage["prompt_tokens_details"]["cached_tokens"]}}
    assert 0 <= usage["prompt_tokens_details"]["cached_tokens"] < prompt_tokens  # OpenAI's field: from the cache


def test_chat_streaming_chunks_and_equal_text(http):
    body = {"messages": HELLO, "temperature": 0, "max_tokens": 24, "stream_options": {"include_usage": True}}
    chunks = stream_chunks(http, "/v1/chat/completions", body)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and finals[0]["choices"][0]["delta"] == {}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 24
    assert all(c["usage"] is None for c in chunks[:-1])
    assert not any("system_fingerprint" in c for c in chunks)
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert streamed == chat(http)["choices"][0]["message"]["content"]


def test_stream_without_usage_has_no_usage_field(http):
    chunks = stream_chunks(http, "/v1/chat/completions", {"messages": HELLO, "max_tokens": 4})
    assert all("usage" not in c for c in chunks)


def test_stop_string_cuts_text_and_is_not_emitted(http):
    full = chat(http)["choices"][0]["message"]["content"]
    words = full.split()
    stop = words[len(words) // 2]
    out = chat(http, stop=[stop, "zzzz-never"])
    choice = out["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["content"] == full[: full.index(stop)]
    assert stop not in choice["message"]["content"]


def test_seed_makes_sampling_repeatable(http):
    runs = [chat(http, temperature=1.0, seed=1234, max_tokens=20)["choices"][0]["message"]["content"] for _ in range(2)]
    assert runs[0] == runs[1]
    others = {chat(http, temperature=1.0, seed=s, max_tokens=20)["choices"][0]["message"]["content"] for s in range(5)}
    assert len(others) > 1  # the seed really drives the sampler


def test_n_two_choices_share_the_prompt(http):
    out = chat(http, n=2, temperature=1.0, seed=5, max_tokens=10)
    assert [c["index"] for c in out["choices"]] == [0, 1]
    assert all(c["message"]["content"] for c in out["choices"])
    assert out["usage"]["completion_tokens"] == 20  # both ran to max_tokens


def test_completions_string_list_tokens_and_echo(http, server):
    body = {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}
    single = http.post("/v1/completions", json=body).json()
    assert single["object"] == "text_completion"
    text = single["choices"][0]["text"]
    assert single["usage"]["completion_tokens"] == 8
    tokens = server.served.engine.tokenize("Once upon a time", True, True)
    by_ids = http.post("/v1/completions", json={**body, "prompt": tokens}).json()
    assert by_ids["choices"][0]["text"] == text
    many = http.post("/v1/completions", json={**body, "prompt": ["Once upon a time", "The cat"]}).json()
    assert [c["index"] for c in many["choices"]] == [0, 1]
    assert many["choices"][0]["text"] == text
    assert many["usage"]["prompt_tokens"] == len(tokens) + len(server.served.engine.tokenize("The cat", True, True))
    echoed = http.post("/v1/completions", json={**body, "echo": True}).json()
    assert echoed["choices"][0]["text"] == "Once upon a time" + text


def test_completions_streaming_equals_non_streaming(http):
    body = {"prompt": "The capital of France is", "max_tokens": 10, "temperature": 0}
    chunks = stream_chunks(http, "/v1/completions", body)
    streamed = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert streamed == http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_models_and_model_lookup(http, server):
    models = http.get("/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [server.served.model_id]
    one = http.get(f"/v1/models/{server.served.model_id}")
    assert one.status_code == 200 and one.json()["id"] == server.served.model_id
    # Exactly OpenAI's Model object: the model's facts live in /status
    assert set(one.json()) == {"id", "object", "created", "owned_by"} == set(models["data"][0])
    assert http.get("/status").json()["model_facts"]["n_vocab"] == server.served.n_vocab
    missing = http.get("/v1/models/gpt-4")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_unsupported_field_is_a_clear_400(http):
    function = {"name": "f", "parameters": {}}  # the legacy field; tools are implemented
    response = http.post("/v1/chat/completions", json={"messages": HELLO, "functions": [function]})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "functions"


def test_health_and_status_contract(http, server):
    assert http.get("/health").json() == {"status": "ok"}
    status = http.get("/status").json()
    assert status["model"] == server.served.model_id
    seqs = status["sequences"]
    assert seqs["cap"] == 8 and seqs["active"] == 0 and len(seqs["slots"]) == 8
    assert {s["state"] for s in seqs["slots"]} == {"idle"}
    assert status["queue"]["waiting"] == 0
    assert status["kv"]["cells_used"] == 0 and status["kv"]["cells_total"] >= 8 * 512
    generated = status["engine"]["tokens_generated"]
    made = chat(http, max_tokens=5)["usage"]["completion_tokens"]
    assert made > 0 and http.get("/status").json()["engine"]["tokens_generated"] == generated + made


def test_penalties_and_sampling_extensions_are_applied(http):
    plain = chat(http, temperature=0, max_tokens=24)["choices"][0]["message"]["content"]
    penalized = chat(http, temperature=0, max_tokens=24, frequency_penalty=2.0, presence_penalty=2.0)
    assert penalized["usage"]["completion_tokens"] > 0
    assert penalized["choices"][0]["message"]["content"] != plain  # the penalty changed the greedy path
    extended = chat(http, temperature=0.8, seed=9, top_k=20, min_p=0.05, repeat_penalty=1.2, max_tokens=8)
    assert extended["usage"]["completion_tokens"] > 0
