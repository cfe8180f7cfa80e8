"""GET /metrics: the Prometheus exposition, checked by what it says after things happen.

The first half runs the fake backend (no model, no timing): the scheduler's latency record, the
exposition's shape and HELP lines, the API key, bad requests, and a scripted memory squeeze that moves
the degradation gauges, the cap and the KV size through a cache rebuild and back. The second half
runs the real model: requests long enough to watch (max_tokens with end-of-generation banned) show up
as running and then not, a full queue's 503 and a client's disconnect are counted. Nothing sleeps in
place of work: every wait is on a condition read from /metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from serving import live_server

from parallama.batching import Engine, EngineConfig
from parallama.batching.scheduler import Scheduler, SchedulerConfig
from parallama.batching.sequence import Request
from parallama.memory.degradation import DegradationConfig, DegradationController
from parallama.memory.probes import GiB, GpuDevice, MemoryReading, MiB, ScriptedProbe
from parallama.memory.sizing import SeqLayout
from parallama.sequences import SamplingParams
from parallama.sequences.fake_backend import FakeBackend
from parallama.server.app import create_app
from parallama.server.chat_template import ChatTemplate
from parallama.server.settings import Settings
from parallama.server.state import ModelNames, Served

NO_EOG = {"0": -100, "2": -100}  # <|endoftext|> and <|im_end|> in SmolLM2: the answer runs to max_tokens
KEY = "sk-metrics-test"


# --- reading /metrics ------------------------------------------------------------------------------


class Scrape:
    """One /metrics answer, parsed with prometheus_client's own parser."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}

    def value(self, sample: str, **labels: str) -> float:
        """The sample's value (summed over labels not given); 0 when it is absent."""
        name = "parallama:" + sample
        return sum(s.value for family in self.families.values() for s in family.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def scrape(client, **headers) -> Scrape:
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return Scrape(response.text)


# --- the scheduler's record (fake backend, stepped by hand) ----------------------------------------


def run_to_end(scheduler: Scheduler) -> None:
    for _ in range(10_000):
        if not scheduler.has_work:
            return
        scheduler.step()
    raise AssertionError("the scheduler never finished")


def test_every_finished_request_is_counted_once_with_its_phases():
    backend = FakeBackend(n_ctx=512, n_seq_max=2, n_batch=64)
    scheduler = Scheduler(backend, SchedulerConfig(ctx_size=128))
    lengths = [3, 7, 1, 12, 5]  # more requests than sequences: some wait in the queue
    for i, max_tokens in enumerate(lengths):
        scheduler.add(Request(f"r{i}", [2, 3, 4 + i], SamplingParams(temperature=0.0, max_tokens=max_tokens), 1))
    run_to_end(scheduler)
    st = scheduler.request_stats()
    assert dict(st.finished) == {"stop": 0, "length": 5}
    for h in (st.time_to_first_token, st.e2e_latency, st.queue_time, st.prefill_time, st.decode_time):
        assert h.count == 5 and h.sum >= 0
    assert st.prompt_tokens == 15 and st.generation_tokens == sum(lengths)
    # One observation per token after a sequence's first: 2 + 6 + 0 + 11 + 4.
    assert st.inter_token_latency.count == sum(n - 1 for n in lengths)
    assert st.cancelled == st.failed == 0


def test_generation_tokens_are_current_while_running_and_cancels_are_counted_apart():
    backend = FakeBackend(n_ctx=512, n_seq_max=2, n_batch=64, eos_after=4)
    scheduler = Scheduler(backend, SchedulerConfig(ctx_size=128))
    scheduler.add(Request("long", [2, 3], SamplingParams(temperature=0.0, max_tokens=50), 1))
    scheduler.add(Request("eos", [2, 3], SamplingParams(temperature=0.0, max_tokens=50), 2))
    seen = []
    for _ in range(3):
        scheduler.step()
        seen.append(scheduler.request_stats().generation_tokens)
    assert seen == sorted(seen) and seen[-1] > 0  # counted while running, never going back
    assert seen[-1] == sum(len(s.output) for r in scheduler.requests.values() for s in r.sequences)
    run_to_end(scheduler)
    st = scheduler.request_stats()
    assert dict(st.finished) == {"stop": 2, "length": 0}  # the eos_after sampler ends every sequence
    assert st.generation_tokens == 3 * 4  # 4 tokens per sequence, the end-of-generation one not counted
    # Each sequence sampled 5 times (4 tokens, then end-of-generation): 4 intervals each.
    assert st.inter_token_latency.count == 3 * 4
    assert st.time_to_first_token.count == 2  # per request, not per sequence

    scheduler.add(Request("gone", [2, 3], SamplingParams(temperature=0.0, max_tokens=50), 1))
    scheduler.step()
    scheduler.abort("gone")
    after = scheduler.request_stats()
    assert after.cancelled == 1 and dict(after.finished) == {"stop": 2, "length": 0}
    assert after.e2e_latency.count == 2  # a cancelled request has no end-to-end latency


def test_prefix_cache_queries_and_hits_count_tokens_and_shared_cells_count_as_in_use():
    layout = SeqLayout(2, 4)
    backend = FakeBackend(n_ctx=512, n_seq_max=layout.n_seq_max, n_batch=64)
    scheduler = Scheduler(backend, SchedulerConfig(ctx_size=200, layout=layout))
    prompt = backend.tokenize("abcdefghijklmnopqrstuvwxyz" * 2)  # 52 tokens: well above MIN_REUSE
    scheduler.add(Request("first", prompt, SamplingParams(temperature=0.0, max_tokens=20), 1))
    scheduler.step()  # the prompt is in and kept in the cache, which the running sequence now shares
    cache = scheduler.cache_stats()
    assert cache.pinned_cells == cache.cells == len(prompt)
    assert scheduler.stats().cells_used == 0  # its own cells beyond the shared prefix: the first token is pending
    run_to_end(scheduler)
    assert scheduler.cache_stats().pinned_cells == 0  # finished: every cached cell can be given back
    scheduler.add(Request("again", prompt, SamplingParams(temperature=0.0, max_tokens=2), 1))
    run_to_end(scheduler)
    cache = scheduler.cache_stats()
    assert cache.tokens_queried == 2 * len(prompt)
    assert cache.tokens_reused == len(prompt) - 1  # all but the last token, whose logits give the first sample


# --- an app on the fake backend, through HTTP ------------------------------------------------------

RESERVE = 1 * GiB
CELL = 1 * MiB  # the controller's bytes per KV cell: one MiB keeps the arithmetic readable


def reading(free: int) -> MemoryReading:
    return MemoryReading(host_available=free, host_total=32 * GiB, cgroup_limit=16 * GiB, cgroup_usage=2 * GiB,
                         gpus=(GpuDevice(0, "fake", 3 * GiB, 8 * GiB),))


@contextlib.contextmanager
def fake_server(api_key: str | None = None, probe: ScriptedProbe | None = None, **engine_config):
    """A parallama app on the fake backend (4 sequences of 256 tokens, 1024 KV cells), with a
    degradation controller reading ``probe``. ``TestClient`` runs the lifespan, so the engine starts
    and stops as in the real server."""
    backend = FakeBackend(n_ctx=1024, n_seq_max=4, n_batch=64)
    controller = DegradationController(DegradationConfig(
        reserve_bytes=RESERVE, kv_bytes_per_token=CELL, ctx_size=256, max_cells=1024, max_cap=4,
        probe_interval=0.01, recover_after=0.0, hysteresis_bytes=64 * MiB))
    probe = probe or ScriptedProbe(reading(8 * GiB))
    engine = Engine(backend, EngineConfig(ctx_size=256, **engine_config), probe, controller)

    def build(settings: Settings) -> Served:
        engine.start()
        return Served(engine, ModelNames.from_alias("fake-model", "fake"), 256, "fake plan", ChatTemplate(None), 0)

    app = create_app(Settings(api_key=api_key, allowed_hosts="testserver"), build)
    auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with TestClient(app, headers=auth) as client:
        wait_until(lambda: client.get("/health").status_code == 200, "the fake model loaded")
        yield client


def wait_until(condition, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"never true: {what}")


def complete(client, max_tokens: int, **extra) -> dict:
    response = client.post("/v1/completions", json={"prompt": "abc", "max_tokens": max_tokens, **extra})
    assert response.status_code == 200, response.text
    return response.json()


EXPECTED_FAMILIES = {
    "num_requests_running": "gauge", "num_requests_waiting": "gauge", "kv_cache_usage_perc": "gauge",
    "prompt_tokens": "counter", "generation_tokens": "counter", "request_success": "counter",
    "num_preemptions": "counter", "prefix_cache_queries": "counter", "prefix_cache_hits": "counter",
    "time_to_first_token_seconds": "histogram", "inter_token_latency_seconds": "histogram",
    "e2e_request_latency_seconds": "histogram", "request_queue_time_seconds": "histogram",
    "request_prefill_time_seconds": "histogram", "request_decode_time_seconds": "histogram",
    "sequence_cap": "gauge", "sequence_cap_startup": "gauge", "kv_cells_total": "gauge", "kv_cells_used": "gauge",
    "memory_free_bytes": "gauge", "memory_reserve_bytes": "gauge", "degradation_state": "gauge",
    "sequence_cap_changes": "counter", "kv_cache_rebuilds": "counter", "requests_refused": "counter",
    "requests_cancelled": "counter", "bad_requests": "counter",
}


def test_the_exposition_has_every_family_with_help_and_a_model_name():
    with fake_server() as client:
        before = scrape(client)
        answers = [complete(client, n) for n in (3, 5, 8)]
        after = scrape(client)
    for name, kind in EXPECTED_FAMILIES.items():
        family = after.families.get("parallama:" + name)
        assert family is not None, name
        assert family.type == kind, name
    for family in after.families.values():
        assert len(family.documentation) > 20, family.name  # a sentence a person understands
        for sample in family.samples:
            if family.name not in ("parallama:requests_refused", "parallama:bad_requests"):
                assert sample.labels.get("model_name") == "fake-model", sample
    delta = lambda name, **labels: after.value(name, **labels) - before.value(name, **labels)  # noqa: E731
    assert delta("request_success_total", finished_reason="length") == 3
    assert delta("time_to_first_token_seconds_count") == 3
    assert delta("e2e_request_latency_seconds_count") == 3
    assert delta("request_queue_time_seconds_count") == 3
    assert delta("generation_tokens_total") == sum(a["usage"]["completion_tokens"] for a in answers) == 16
    assert delta("prompt_tokens_total") == sum(a["usage"]["prompt_tokens"] for a in answers)
    assert delta("inter_token_latency_seconds_count") == 2 + 4 + 7
    buckets = [s.value for s in after.families["parallama:time_to_first_token_seconds"].samples
               if s.name.endswith("_bucket")]
    assert buckets == sorted(buckets) and buckets[-1] == after.value("time_to_first_token_seconds_count")
    assert after.value("num_requests_running") == 0 and after.value("kv_cells_used") == 0
    assert after.value("sequence_cap") == after.value("sequence_cap_startup") == 4
    assert after.value("degradation_state", reason="none") == 1
    assert after.value("memory_free_bytes", device="host") == 8 * GiB
    assert after.value("memory_free_bytes", device="container") == 14 * GiB
    assert after.value("memory_total_bytes", device="gpu0") == 8 * GiB
    assert after.value("memory_reserve_bytes", device="gpu0") == RESERVE


def test_metrics_needs_the_api_key_like_status():
    with fake_server(api_key=KEY) as client:
        bare = client.get("/metrics", headers={"Authorization": ""})
        assert bare.status_code == 401 and bare.json()["error"]["code"] == "invalid_api_key"
        assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert "parallama:num_requests_running" in scrape(client).families  # the client sends the key
        assert client.get("/health", headers={"Authorization": ""}).status_code == 200


def test_refusals_before_the_routes_are_counted_too():
    with fake_server(api_key=KEY) as client:
        before = scrape(client)
        assert client.get("/status", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.post("/v1/completions", content=b"x", headers={"Content-Type": "text/plain"}).status_code == 400
        client.app.state.draining = True
        assert client.post("/v1/completions", json={"prompt": "abc"}).status_code == 503
        client.app.state.draining = False
        after = scrape(client)
    for status in ("401", "400"):
        assert after.value("bad_requests_total", status=status) - before.value("bad_requests_total", status=status) == 1
    assert after.value("requests_refused_total") - before.value("requests_refused_total") == 1


def test_bad_requests_are_counted_by_status():
    with fake_server() as client:
        before = scrape(client)
        assert client.post("/v1/completions", json={"prompt": "abc", "max_tokens": -5}).status_code == 400
        assert client.post("/v1/completions", json={"prompt": "abc", "model": "nope"}).status_code == 404
        assert client.get("/v1/nowhere").status_code == 404
        after = scrape(client)
    assert after.value("bad_requests_total", status="400") - before.value("bad_requests_total", status="400") == 1
    assert after.value("bad_requests_total", status="404") - before.value("bad_requests_total", status="404") == 2
    assert after.value("requests_refused_total") == 0


def test_a_memory_squeeze_moves_the_degradation_gauges_and_the_cap_and_metrics_survive_the_rebuild():
    probe = ScriptedProbe(reading(8 * GiB))
    with fake_server(probe=probe) as client:
        complete(client, 4)
        before = scrape(client)
        assert before.value("kv_cells_total") == before.value("kv_cells_startup") == 1024

        # Another program takes memory: 256 one-MiB cells fit above the reserve -> 256 cells, cap 2.
        probe.reading = reading(RESERVE - 768 * CELL)
        low = wait_until(lambda: (s := scrape(client)).value("kv_cells_total") == 256 and s, "the cache shrank")
        assert low.value("degradation_state", reason="memory_below_reserve") == 1
        assert low.value("degradation_state", reason="none") == 0
        assert low.value("sequence_cap") == 2 < low.value("sequence_cap_startup") == 4
        assert low.value("kv_cache_rebuilds_total") == before.value("kv_cache_rebuilds_total") + 1
        assert low.value("sequence_cap_changes_total") >= before.value("sequence_cap_changes_total") + 1
        assert low.value("degradation_decreases_total") >= 1
        assert low.value("memory_free_bytes", device="host") == RESERVE - 768 * CELL
        # The rebuild reset nothing: what was counted before is still there, and new requests add to it.
        for name in ("request_success_total", "time_to_first_token_seconds_count", "generation_tokens_total",
                     "prompt_tokens_total", "e2e_request_latency_seconds_sum"):
            assert low.value(name) == before.value(name), name
        complete(client, 6)
        during = scrape(client)
        assert during.value("request_success_total") == before.value("request_success_total") + 1
        ttft = "time_to_first_token_seconds_count"
        assert during.value(ttft) == before.value(ttft) + 1
        assert during.value("generation_tokens_total") == before.value("generation_tokens_total") + 6

        probe.reading = reading(8 * GiB)  # it leaves: the cache grows back, then the cap, a step at a time
        back = wait_until(lambda: (s := scrape(client)).value("degradation_state", reason="none") == 1
                          and s.value("sequence_cap") == 4 and s, "recovered")
        assert back.value("kv_cells_total") == 1024
        assert back.value("kv_cache_rebuilds_total") == low.value("kv_cache_rebuilds_total") + 1
        assert back.value("sequence_cap_changes_total") >= low.value("sequence_cap_changes_total") + 2
        assert back.value("request_success_total") == during.value("request_success_total")


# --- the real model over HTTP ----------------------------------------------------------------------

CHAT = {"messages": [{"role": "user", "content": "Tell me a long story about a dragon."}], "temperature": 0}
HOG = {**CHAT, "max_tokens": 400, "logit_bias": NO_EOG}  # cannot end early: runs until cancelled


@pytest.fixture(scope="module")
def model_server():
    with live_server(parallel=2, ctx_size=512, max_queue=1, api_key=KEY) as server:
        yield server


def model_client(server, **kwargs) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=server.base_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120,
                             **kwargs)


async def ascrape(client: httpx.AsyncClient) -> Scrape:
    response = await client.get("/metrics")
    assert response.status_code == 200, response.text
    return Scrape(response.text)


async def await_metrics(client: httpx.AsyncClient, predicate, what: str, timeout: float = 120.0) -> Scrape:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = await ascrape(client)
        if predicate(current):
            return current
        await asyncio.sleep(0.02)
    raise AssertionError(f"/metrics never showed: {what}\n{current.text}")


@pytest.mark.model
def test_n_requests_raise_success_and_ttft_by_n(model_server):
    async def main():
        async with model_client(model_server) as client:
            before = await ascrape(client)
            answers = [await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 6}) for _ in range(3)]
            assert all(a.status_code == 200 for a in answers)
            return before, await ascrape(client), [a.json()["usage"] for a in answers]

    before, after, usages = asyncio.run(main())
    delta = lambda name, **labels: after.value(name, **labels) - before.value(name, **labels)  # noqa: E731
    assert delta("request_success_total") == 3
    assert delta("time_to_first_token_seconds_count") == 3
    assert delta("e2e_request_latency_seconds_count") == 3
    assert delta("generation_tokens_total") == sum(u["completion_tokens"] for u in usages)
    assert delta("prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
    assert delta("time_to_first_token_seconds_sum") > 0
    assert after.value("num_requests_running") == 0
    assert after.value("kv_cells_total") > 0 and after.value("sequence_cap") == 2


@pytest.mark.model
def test_running_shows_during_a_request_and_disconnects_are_counted(model_server):
    async def main():
        async with model_client(model_server) as client:
            before = await ascrape(client)
            hog = asyncio.create_task(client.post("/v1/chat/completions", json=HOG))
            generated = before.value("generation_tokens_total")
            during = await await_metrics(client, lambda s: s.value("num_requests_running") >= 1
                                         and s.value("generation_tokens_total") > generated,
                                         "a running request generating")
            assert during.value("kv_cache_usage_perc") > 0  # its prompt's cells at least, shared with the cache
            hog.cancel()  # the client hangs up
            with contextlib.suppress(asyncio.CancelledError):
                await hog
            # A streaming client that hangs up after its first chunk.
            async with client.stream("POST", "/v1/chat/completions", json={**HOG, "stream": True}) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: {"):
                        break
            after = await await_metrics(client, lambda s: s.value("requests_cancelled_total")
                                        == before.value("requests_cancelled_total") + 2
                                        and s.value("num_requests_running") == 0, "both cancels counted")
            return before, after

    before, after = asyncio.run(main())
    assert after.value("request_success_total") == before.value("request_success_total")
    assert after.value("kv_cells_used") == 0 and after.value("kv_cache_usage_perc") == 0


@pytest.mark.model
def test_a_full_queue_503_is_counted(model_server):
    async def main():
        async with model_client(model_server) as client:
            before = await ascrape(client)
            # Two hogs take both sequences, a third fills the one-place queue.
            hogs = [asyncio.create_task(client.post("/v1/chat/completions", json=HOG)) for _ in range(3)]
            await await_metrics(client, lambda s: s.value("num_requests_running") == 2
                                and s.value("num_requests_waiting") == 1, "two running, one waiting")
            refused = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 4})
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "server_is_overloaded"
            mid = await ascrape(client)
            for hog in hogs:
                hog.cancel()
            await asyncio.gather(*hogs, return_exceptions=True)
            after = await await_metrics(client, lambda s: s.value("num_requests_running") == 0
                                        and s.value("num_requests_waiting") == 0
                                        and s.value("requests_cancelled_total")
                                        == before.value("requests_cancelled_total") + 3, "all three cancelled")
            return before, mid, after

    before, mid, after = asyncio.run(main())
    code = {"code": "server_is_overloaded"}
    assert mid.value("requests_refused_total", **code) == before.value("requests_refused_total", **code) + 1
    assert after.value("requests_refused_total", **code) == mid.value("requests_refused_total", **code)
    assert after.value("bad_requests_total") == before.value("bad_requests_total")  # a 503 is not a bad request
