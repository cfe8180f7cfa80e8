"""GET /metrics: Prometheus exposition of the engine's statistics snapshot and the edge's own counters.

Nothing here is recorded per token or per step. The engine's gauges and counters, and its latency
histograms, are already in the one ``EngineStats`` value the worker builds on request (``/status``
renders the same value): at scrape time a custom collector turns it into metric families, and
prometheus_client writes the exposition. What only the HTTP edge sees (requests refused with 503, bad
requests by status code) is counted by the error handlers in ``Metrics``, one per app, with its own
``CollectorRegistry``: tests build many apps in one process, and the global registry would mix them.

Names follow vLLM's (``vllm:`` becomes ``parallama:``) where the meaning is the same, each with a
``model_name`` label as vLLM has; the rest are parallama's own.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator

from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily,
                                            Metric)
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

from parallama.batching.stats import EngineStats, HistogramStats, RequestStats
from parallama.memory.degradation import ControllerStats
from parallama.memory.probes import MemoryReading

P = "parallama:"
# The degradation controller's reasons (ControllerStats.reason), as label values.
DEGRADATION_REASONS = {"none": "none", "kv cache full": "kv_cache_full",
                       "memory below reserve": "memory_below_reserve", "recovering": "recovering"}
REFUSAL_CODES = ("server_is_overloaded", "model_loading")  # shown at 0 before the first refusal

_HISTOGRAMS = (  # (EngineStats.requests field, name, help)
    ("time_to_first_token", "time_to_first_token_seconds",
     "Seconds from a request's arrival to its first generated token (queue and prompt included)."),
    ("inter_token_latency", "inter_token_latency_seconds",
     "Seconds between two tokens of one sequence. Each finished sequence adds its mean, once per token "
     "after its first: count and sum are exact, the spread within one sequence is not kept."),
    ("e2e_latency", "e2e_request_latency_seconds",
     "Seconds from a request's arrival to its last token, for requests that finished (stop or length)."),
    ("queue_time", "request_queue_time_seconds",
     "Seconds a request waited in the queue before it took its first sequence."),
    ("prefill_time", "request_prefill_time_seconds",
     "Seconds from taking a sequence to the first token: the prompt's computation (or its copy from "
     "the prefix cache), for finished requests."),
    ("decode_time", "request_decode_time_seconds",
     "Seconds from a request's first token to its last, for finished requests."),
)


class Metrics:
    """One app's metrics: the edge's counters, and the registry that renders them with a snapshot."""

    def __init__(self) -> None:
        self.refused: Counter[str] = Counter({code: 0 for code in REFUSAL_CODES})
        self.bad_requests: Counter[int] = Counter()
        self.registry = CollectorRegistry(auto_describe=False)
        self._collector = _Collector(self)
        self.registry.register(self._collector)

    def count_error(self, status: int, code: str | None) -> None:
        """An error answer the edge sent: 503s are refusals (by error code), 4xx bad requests."""
        if status == 503:
            self.refused[code or "unknown"] += 1
        elif 400 <= status < 500:
            self.bad_requests[status] += 1

    def render(self, accept: str | None, model: str | None, stats: EngineStats | None) -> tuple[bytes, str]:
        """The exposition the scraper asked for (Prometheus text, or OpenMetrics) and its content type.
        ``stats`` is None while the model loads: only the edge's counters are shown then."""
        encode, content_type = choose_encoder(accept or "")
        self._collector.snapshot = (model or "", stats) if stats is not None else None
        try:  # synchronous: no other scrape can run between setting the snapshot and reading it
            return encode(self.registry), content_type
        finally:
            self._collector.snapshot = None


def metrics_of(app) -> Metrics:
    """The app's ``Metrics``, made on first use (the error handlers may count before the model loads)."""
    metrics = getattr(app.state, "metrics", None)
    if metrics is None:
        metrics = app.state.metrics = Metrics()
    return metrics


class _Collector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.snapshot: tuple[str, EngineStats] | None = None

    def collect(self) -> Iterator[Metric]:
        yield from _edge(self.metrics)
        if self.snapshot is not None:
            yield from _engine(*self.snapshot)


def _edge(m: Metrics) -> Iterator[Metric]:
    refused = CounterMetricFamily(
        P + "requests_refused", "Requests answered 503 at once instead of queued, by error code: "
        "server_is_overloaded (the queue is full, see --max-queue) or model_loading.", labels=["code"])
    for code, n in sorted(m.refused.items()):
        refused.add_metric([code], n)
    yield refused
    bad = CounterMetricFamily(
        P + "bad_requests", "Requests answered with a 4xx error (invalid body, unknown model or path, body too "
        "large), by HTTP status code.", labels=["status"])
    for status, n in sorted(m.bad_requests.items()):
        bad.add_metric([str(status)], n)
    yield bad


def _engine(model: str, st: EngineStats) -> Iterator[Metric]:
    m = [model]
    sched, cache, req = st.scheduler, st.cache, st.requests

    def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
        return _one(GaugeMetricFamily(P + name, doc, labels=["model_name"]), m, value)

    def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
        return _one(CounterMetricFamily(P + name, doc, labels=["model_name"]), m, value)

    # --- queue and sequences
    yield gauge("num_requests_running", "Requests with a sequence running now (a request with n > 1 runs n).",
                sched.running_requests)
    yield gauge("num_requests_waiting", "Requests queued for their first sequence.", st.queued)
    yield gauge("num_sequences_running", "Sequences generating or computing their prompt now (what the cap limits).",
                sched.running)
    yield gauge("num_sequences_parked", "Preempted sequences waiting to resume (their KV saved in host memory).",
                sched.parked)
    yield gauge("sequence_cap", "Most sequences allowed to run at once now; the degradation controller lowers it "
                "under memory pressure and raises it back.", st.cap)
    yield gauge("sequence_cap_startup", "The sequence cap the server started with (--parallel, or sized at "
                "start-up): the cap never grows above it.", st.cap_startup)
    yield counter("sequence_cap_changes", "Times the sequence cap moved (down under pressure, up on recovery).",
                  st.cap_changes)
    # --- KV cache
    needed = sched.cells_used + cache.pinned_cells
    usage = needed / st.cells_total if st.cells_total else 0.0
    yield gauge("kv_cache_usage_perc", "KV cache usage by running sequences, 0 to 1 (1 means full): their own "
                "cells and the prefix-cache cells they share. Cells only the prefix cache holds count as free, "
                "since they are given back on demand.", usage)
    yield gauge("kv_cells_total", "KV cells in the cache now (below kv_cells_startup after a shrink).",
                st.cells_total)
    yield gauge("kv_cells_startup", "KV cells the cache was built with at start-up.", st.cells_startup)
    yield gauge("kv_cells_used", "KV cells held by running sequences beyond what they share with the prefix "
                "cache (as /status's kv.cells_used).", sched.cells_used)
    yield gauge("kv_cells_cached", "KV cells held by the prefix cache for later requests (running sequences may "
                "share some: see kv_cache_usage_perc).", cache.cells)
    yield counter("kv_cache_rebuilds", "Times the KV cache was rebuilt at another size (memory pressure or "
                  "recovery); running sequences were parked and restored.", sched.resizes)
    yield counter("num_preemptions", "Sequences preempted (KV parked in host memory, resumed later) because "
                  "the KV cache ran out or was rebuilt.", sched.preemptions)
    # --- prefix cache
    yield counter("prefix_cache_queries", "Prefix cache queries, in prompt tokens looked up.", cache.tokens_queried)
    yield counter("prefix_cache_hits", "Prefix cache hits, in prompt tokens copied from the cache instead of "
                  "computed.", cache.tokens_reused)
    yield gauge("prefix_cache_entries", "Entries the prefix cache holds in KV cells.", cache.entries)
    yield gauge("prefix_cache_ram_bytes", "Bytes of the prefix cache's host-RAM tier (--cache-ram).", cache.ram_bytes)
    # --- requests
    if req is not None:
        yield from _requests(m, req)
    # --- memory and degradation
    if st.controller is not None:
        yield from _controller(m, st.controller)


def _requests(m: list[str], req: RequestStats) -> Iterator[Metric]:
    yield _one(CounterMetricFamily(P + "prompt_tokens", "Prompt tokens of requests that reached their first token "
                                   "(those copied from the prefix cache included).", labels=["model_name"]),
               m, req.prompt_tokens)
    yield _one(CounterMetricFamily(P + "generation_tokens", "Generated tokens, as counted in usage.completion_tokens "
                                   "(sequences still running included).", labels=["model_name"]),
               m, req.generation_tokens)
    success = CounterMetricFamily(P + "request_success", "Requests that finished, by finish reason: stop (end of "
                                  "generation or a stop string) or length (max_tokens, context, or timeout).",
                                  labels=["model_name", "finished_reason"])
    for reason, n in req.finished:
        success.add_metric([*m, reason], n)
    yield success
    yield _one(CounterMetricFamily(P + "requests_cancelled", "Requests ended before their answer was complete "
                                   "because the client went away; their sequences were freed at once.",
                                   labels=["model_name"]), m, req.cancelled)
    yield _one(CounterMetricFamily(P + "requests_failed", "Requests ended by an engine error or the shutdown "
                                   "deadline.", labels=["model_name"]), m, req.failed)
    for field, name, doc in _HISTOGRAMS:
        yield _histogram(P + name, doc, m, getattr(req, field))


def _controller(m: list[str], c: ControllerStats) -> Iterator[Metric]:
    state = GaugeMetricFamily(P + "degradation_state", "1 for the degradation controller's current state, 0 for "
                              "the others: none, kv_cache_full (cap halved), memory_below_reserve (cache shrunk), "
                              "recovering (growing back).", labels=["model_name", "reason"])
    current = DEGRADATION_REASONS.get(c.reason, c.reason)
    for reason in sorted({*DEGRADATION_REASONS.values(), current}):
        state.add_metric([*m, reason], 1 if reason == current else 0)
    yield state
    yield _one(CounterMetricFamily(P + "degradation_decreases", "Times the controller lowered the cap or shrank "
                                   "the KV cache.", labels=["model_name"]), m, c.decreases)
    yield _one(CounterMetricFamily(P + "prefix_cache_ram_releases", "Times memory pressure emptied the prefix "
                                   "cache's RAM tier (before any shrink of the KV cache).", labels=["model_name"]),
               m, c.releases)
    if c.reading is None:
        return
    free = GaugeMetricFamily(P + "memory_free_bytes", "Free memory per device at the last reading: host "
                             "(available RAM), container (cgroup limit minus its working set), gpuN.",
                             labels=["model_name", "device"])
    total = GaugeMetricFamily(P + "memory_total_bytes", "Memory per device: host RAM, the container's limit, "
                              "each GPU's total.", labels=["model_name", "device"])
    reserve = GaugeMetricFamily(P + "memory_reserve_bytes", "Memory the server leaves free on each device "
                                "(--memory-reserve); below it the KV cache shrinks.", labels=["model_name", "device"])
    for device, free_bytes, total_bytes in _devices(c.reading):
        free.add_metric([*m, device], free_bytes)
        total.add_metric([*m, device], total_bytes)
        reserve.add_metric([*m, device], c.reserve_bytes)
    yield free
    yield total
    yield reserve


def _devices(r: MemoryReading) -> Iterable[tuple[str, int, int]]:
    yield "host", r.host_available, r.host_total
    if r.cgroup_limit is not None:
        yield "container", max(0, r.cgroup_limit - (r.cgroup_usage or 0)), r.cgroup_limit
    for gpu in r.gpus:
        yield f"gpu{gpu.index}", gpu.free, gpu.total


def _one(family, labels: list[str], value: float):
    family.add_metric(labels, value)
    return family


def _histogram(name: str, doc: str, labels: list[str], h: HistogramStats) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=["model_name"])
    buckets, cumulative = [], 0
    for bound, n in zip((*h.bounds, float("inf")), h.counts):
        cumulative += n
        buckets.append((floatToGoString(bound), cumulative))
    family.add_metric(labels, buckets, h.sum)
    return family
