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
    time.sleep(0.3)
    refused = httpx.post(f"{base}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=10)
    assert refused.status_code == 503 and refused.headers["retry-after"]
    assert refused.json()["error"]["code"] == "server_is_overloaded"
    client.join(120)
    assert result["status"] == 200
    assert result["lines"][-1] == "data: [DONE]"
    assert '"finish_reason":"length"' in result["lines"][-2] or '"finish_reason":"stop"' in result["lines"][-2]
    assert proc.wait(60) == 0


def test_second_signal_exits_at_once():
    port = free_port()
    proc = start_server(port, "--shutdown-timeout", "60")
    base = f"http://127.0.0.1:{port}"
    body = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 400}
    threading.Thread(target=lambda: _quietly(httpx.post, f"{base}/v1/chat/completions", json=body, timeout=120),
                     daemon=True).start()
    wait_until_active(base)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    started = time.monotonic()
    os.kill(proc.pid, signal.SIGINT)
    code = proc.wait(10)
    assert time.monotonic() - started < 5
    assert code != 0  # forced: the request in flight was not allowed to finish


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
