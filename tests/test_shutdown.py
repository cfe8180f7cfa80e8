"""SIGTERM with requests in flight: they finish, new ones get 503, and the process exits 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from serving import free_port

pytestmark = pytest.mark.model


def start_server(port: int, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "parallama.server.cli", "serve", "--port", str(port), "--parallel", "2",
           "--ctx-size", "512", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(proc.stdout.read())


def test_sigterm_drains_in_flight_requests_then_exits_zero():
    port = free_port()
    proc = start_server(port, "--shutdown-timeout", "60")
    base = f"http://127.0.0.1:{port}"
    result: dict = {}

    def long_request() -> None:
        body = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 48,
                "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=120) as response:
            result["status"] = response.status_code
            result["lines"] = [line for line in response.iter_lines() if line]

    client = threading.Thread(target=long_request)
    client.start()
    wait_until_active(base)
    proc.send_signal(signal.SIGTERM)
    # From here a new request is refused, whatever the machine's speed: with a 503 while the drain
    # runs, or at the socket once the in-flight request has finished and the listener has closed.
    # (The 503 itself is checked in-process below, where the drain cannot end under the test.)
    assert_refused_after_the_signal(base)
    client.join(120)
    assert result["status"] == 200
    assert result["lines"][-1] == "data: [DONE]"
    assert '"finish_reason":"length"' in result["lines"][-2] or '"finish_reason":"stop"' in result["lines"][-2]
    assert proc.wait(60) == 0


def test_second_signal_exits_at_once():
    port = free_port()
    proc = start_server(port, "--shutdown-timeout", "60")
    base = f"http://127.0.0.1:{port}"
    # End-of-generation banned (token 2 is <|im_end|> in SmolLM2): the request runs for 400 tokens.
    body = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 400,
            "logit_bias": {"0": -100, "2": -100}}
    threading.Thread(target=lambda: _quietly(httpx.post, f"{base}/v1/chat/completions", json=body, timeout=120),
                     daemon=True).start()
    wait_until_active(base)
    proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    os.kill(proc.pid, signal.SIGINT)
    code = proc.wait(10)
    assert time.monotonic() - started < 5
    assert code != 0  # forced: the request in flight was not allowed to finish


def assert_refused_after_the_signal(base: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            response = httpx.post(f"{base}/v1/completions", json={"prompt": "hi", "max_tokens": 1}, timeout=10)
        except httpx.ConnectError:
            return  # the drain is over and the listener closed
        if response.status_code == 503:
            assert response.headers["retry-after"]
            assert response.json()["error"]["code"] == "server_is_overloaded"
            return
        assert response.status_code == 200  # sent before the signal was handled: served normally
    raise AssertionError("new requests were still served 30 s after SIGTERM")


def test_a_draining_server_answers_new_requests_503_with_retry_after():
    from fastapi.testclient import TestClient

    from parallama.server.app import create_app
    from parallama.server.settings import Settings

    app = create_app(Settings(), build=lambda settings: (_ for _ in ()).throw(RuntimeError("no model needed")))
    with TestClient(app, base_url="http://127.0.0.1") as client:  # a loopback Host, as a local client sends
        app.state.draining = True
        response = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1})
    assert response.status_code == 503 and response.headers["retry-after"]
    assert response.json()["error"]["code"] == "server_is_overloaded"


def wait_until_active(base: str) -> None:
    deadline = time.monotonic() + 30
    while httpx.get(f"{base}/status", timeout=5).json()["sequences"]["active"] == 0:
        assert time.monotonic() < deadline, "the request never started"
        time.sleep(0.02)


def _quietly(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except httpx.HTTPError:
        pass
