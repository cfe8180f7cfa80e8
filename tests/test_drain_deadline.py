"""When the shutdown drain's deadline runs out, every request still in flight ends the OpenAI way.

A stream gets an error event and ``data: [DONE]``, a non-streaming request a 500 with an OpenAI error
body, a queued one the same; the process logs one line (no traceback) and exits 0. The requests are far
too long to finish within the 1 s drain on any machine (4,000 tokens, end-of-generation banned), so
the deadline is always what ends them; nothing here waits for a request to be slow enough.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from serving import free_port

from parallama.batching import Engine, EngineConfig
from parallama.batching.commands import Reply
from parallama.sequences import SamplingParams
from parallama.sequences.fake_backend import FakeBackend

NO_EOG = {"0": -100, "2": -100}  # <|endoftext|> and <|im_end|> in SmolLM2: the answer runs to max_tokens


# --- the engine's FailAll command (fake backend, driven by hand: no thread, no timing) -------------


def test_fail_all_ends_running_and_queued_requests_with_an_error_and_answers_the_count():
    engine = Engine(FakeBackend(n_ctx=256, n_seq_max=2), EngineConfig(ctx_size=128))  # never started

    async def main():
        params = SamplingParams(temperature=0.0, max_tokens=100)
        streams = [engine.submit([2, 3, 4], params) for _ in range(3)]
        engine._drain_commands()
        engine._step()  # two take the engine's two sequences and generate; the third waits for one
        assert len(engine.scheduler.running) == 2 and len(engine.scheduler.waiting) == 1
        future = asyncio.get_running_loop().create_future()
        engine.fail_all("shutting down", Reply(asyncio.get_running_loop(), future))
        engine._drain_commands()
        ended = await asyncio.wait_for(future, 5)
        events = [[e async for e in s] for s in streams]
        return ended, events

    ended, events = asyncio.run(main())
    assert ended == 3
    for stream_events in events:
        last = stream_events[-1]
        assert (last.finish_reason, last.error) == ("error", "shutting down")
        assert last.usage is not None  # the stream's last event: the edge closes it
    assert not engine.scheduler.has_work and engine.is_idle
    assert engine.num_queued == 0  # the queue bound's count is back to zero
    assert sorted(engine.scheduler.free_ids) == [0, 1]  # the sequences were given back


def test_fail_all_with_nothing_in_flight_answers_zero():
    engine = Engine(FakeBackend(), EngineConfig(ctx_size=64))

    async def main():
        future = asyncio.get_running_loop().create_future()
        engine.fail_all("shutting down", Reply(asyncio.get_running_loop(), future))
        engine._drain_commands()
        return await asyncio.wait_for(future, 5)

    assert asyncio.run(main()) == 0


def test_fail_all_sent_after_the_worker_stopped_is_still_answered():
    engine = Engine(FakeBackend(), EngineConfig(ctx_size=64))
    engine.start()
    engine.shutdown(timeout=10)

    async def main():
        future = asyncio.get_running_loop().create_future()
        engine.fail_all("late", Reply(asyncio.get_running_loop(), future))
        engine._refuse_pending()  # what the worker does with commands left when it exits
        return await asyncio.wait_for(future, 5)

    assert asyncio.run(main()) == 0


# --- the real server: SIGTERM, a 1 s drain, three requests that cannot finish in it ----------------


@pytest.mark.model
def test_drain_deadline_ends_every_request_in_flight_the_openai_way():
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "parallama.server.cli", "serve", "--port", str(port), "--parallel", "2",
         "--ctx-size", "4096", "--shutdown-timeout", "1", "--prefix-cache", "false"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_healthy(base, proc)
        body = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 4000,
                "logit_bias": NO_EOG, "temperature": 0}
        results: dict[str, dict] = {}
        clients = [
            threading.Thread(target=streamed, args=(base, body, results, "stream")),
            threading.Thread(target=whole, args=(base, body, results, "whole")),
        ]
        for client in clients:
            client.start()
        wait_status(base, lambda s: s["sequences"]["active"] == 2, "both requests running")
        queued = threading.Thread(target=streamed, args=(base, body, results, "queued"))  # no sequence left
        queued.start()
        clients.append(queued)
        wait_status(base, lambda s: s["queue"]["waiting"] == 1, "the third request queued")

        proc.send_signal(signal.SIGTERM)
        for client in clients:
            client.join(120)
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = proc.stdout.read()

    assert code == 0, output
    assert "Traceback" not in output, output
    assert "timeout graceful shutdown exceeded" not in output, output  # uvicorn never had to cancel
    assert "ending 3 requests in flight with an error" in output, output

    for name in ("stream", "queued"):
        result = results[name]
        assert result["status"] == 200, result
        lines = result["lines"]
        assert lines[-1] == "data: [DONE]", lines[-3:]
        error = json.loads(lines[-2].removeprefix("data: "))["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "server_error"
        assert "shut down" in error["message"] and "--shutdown-timeout 1" in error["message"]
        assert all("finish_reason\":\"length" not in line for line in lines)  # it did not finish on its own
    whole_result = results["whole"]
    assert whole_result["status"] == 500, whole_result
    error = whole_result["json"]["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "server_error"


def streamed(base: str, body: dict, results: dict, name: str) -> None:
    try:
        with httpx.stream("POST", f"{base}/v1/chat/completions", json={**body, "stream": True},
                          timeout=120) as response:
            results[name] = {"status": response.status_code,
                             "lines": [line for line in response.iter_lines() if line]}
    except httpx.HTTPError as exc:  # the stream broke off: recorded, and the test fails on it
        results[name] = {"status": None, "lines": [], "exception": repr(exc)}


def whole(base: str, body: dict, results: dict, name: str) -> None:
    try:
        response = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=120)
        results[name] = {"status": response.status_code, "json": response.json()}
    except (httpx.HTTPError, ValueError) as exc:
        results[name] = {"status": None, "exception": repr(exc)}


def wait_healthy(base: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("the server did not become healthy")


def wait_status(base: str, ready, what: str) -> None:
    deadline = time.monotonic() + 60
    while not ready(httpx.get(f"{base}/status", timeout=5).json()):
        assert time.monotonic() < deadline, f"never reached: {what}"
        time.sleep(0.02)
