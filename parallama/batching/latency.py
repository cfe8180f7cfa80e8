"""How requests end and how long each phase took, recorded by the worker where it happens.

The scheduler stamps ``time.monotonic()`` on a request when it arrives, when it first takes a sequence,
when its first token is sampled and when it ends, and calls this recorder at those moments: a few
times per request, never per token. The histograms are plain lists written by the worker thread
alone, so they need no lock; ``stats()`` copies them into the engine's one statistics snapshot, which
``/metrics`` renders (vLLM's metric names and buckets, where the meaning is the same).
"""

from __future__ import annotations

from bisect import bisect_left

from parallama.batching.sequence import FinishReason, Request, Sequence
from parallama.batching.stats import HistogramStats, RequestStats

# vLLM's buckets (vllm/v1/metrics/loggers.py), so dashboards built for it read the same here. The request
# phases get a few finer buckets below 0.3 s: a local server often queues a request for no time at all.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
PHASE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)

_SUCCESS = (FinishReason.STOP, FinishReason.LENGTH)


class Histogram:
    """Counts per bucket (upper bounds inclusive, as Prometheus's ``le``) and a running sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float, weight: int = 1) -> None:
        """``weight``: the same value observed that many times (see ``sequence_ended``)."""
        self.counts[bisect_left(self.bounds, value)] += weight
        self.sum += value * weight

    def stats(self) -> HistogramStats:
        return HistogramStats(self.bounds, tuple(self.counts), self.sum)


class RequestMetrics:
    def __init__(self) -> None:
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(PHASE_BUCKETS)
        self.queue = Histogram(PHASE_BUCKETS)
        self.prefill = Histogram(PHASE_BUCKETS)
        self.decode = Histogram(PHASE_BUCKETS)
        self.prompt_tokens = 0
        self.finished_tokens = 0  # completion tokens of sequences that have ended
        self.finished = {FinishReason.STOP.value: 0, FinishReason.LENGTH.value: 0}
        self.cancelled = 0
        self.failed = 0

    def admitted(self, request: Request, now: float) -> None:
        """The request takes its first sequence (a preempted one resuming is not counted again)."""
        request.admitted_at = now
        self.queue.observe(now - request.arrival)

    def first_token(self, seq: Sequence, now: float) -> None:
        """A sequence sampled its first token: its prompt is in. The request's first is its TTFT."""
        if seq.first_token_at is not None:
            return
        seq.first_token_at = now
        request = seq.request
        if request.first_token_at is None:
            request.first_token_at = now
            self.ttft.observe(now - request.arrival)
            self.prompt_tokens += len(request.prompt)

    def sequence_ended(self, seq: Sequence, now: float) -> None:
        """Inter-token latency, once per sequence: its decode time spread evenly over the tokens it
        sampled after the first, observed with that many as the weight. The count and the sum are exactly
        those of a per-token observation (so rate(sum)/rate(count) is the true mean), at no cost per
        token; only the spread inside one sequence is lost, which a step-synchronous batch mostly lacks."""
        self.finished_tokens += len(seq.output)
        if seq.finish_reason not in _SUCCESS or seq.first_token_at is None:
            return
        intervals = len(seq.output) - 1 + seq.ended_by_eog  # the end-of-generation token was sampled too
        if intervals > 0:
            self.itl.observe((now - seq.first_token_at) / intervals, intervals)

    def request_ended(self, request: Request, now: float) -> None:
        reasons = {seq.finish_reason for seq in request.sequences}
        if FinishReason.CANCELLED in reasons:
            self.cancelled += 1
            return
        if FinishReason.ERROR in reasons or request.error:
            self.failed += 1
            return
        self.finished[(FinishReason.LENGTH if FinishReason.LENGTH in reasons else FinishReason.STOP).value] += 1
        self.e2e.observe(now - request.arrival)
        if request.first_token_at is not None:
            if request.admitted_at is not None:
                self.prefill.observe(request.first_token_at - request.admitted_at)
            self.decode.observe(now - request.first_token_at)

    def stats(self, running_tokens: int) -> RequestStats:
        """``running_tokens``: completion tokens of sequences still running or parked. Counting them here,
        at snapshot time, keeps the generation counter current with nothing added per token."""
        return RequestStats(
            prompt_tokens=self.prompt_tokens, generation_tokens=self.finished_tokens + running_tokens,
            finished=tuple(self.finished.items()), cancelled=self.cancelled, failed=self.failed,
            time_to_first_token=self.ttft.stats(), inter_token_latency=self.itl.stats(), e2e_latency=self.e2e.stats(),
            queue_time=self.queue.stats(), prefill_time=self.prefill.stats(), decode_time=self.decode.stats())
