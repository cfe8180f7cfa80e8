"""Continuous batching: each step is one ``llama_decode`` over every running sequence.

A step admits waiting requests, plans one batch (one token for each generating sequence first, then
prompt chunks within what is left of the ``n_batch`` budget), decodes it, samples, and turns the
samples into text events. Finished and cancelled sequences give their seq_id and KV cells back at
once. Pure Python over a ``Backend``: no threads here, so tests drive it step by step.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field

from parallama.batching.detokenizer import IncrementalDetokenizer
from parallama.batching.events import Event
from parallama.batching.latency import RequestMetrics
from parallama.batching.prefix_cache import MIN_REUSE, Hit, PrefixCache
from parallama.batching.token_prefix import common_prefix
from parallama.batching.ram_tier import RamTier
from parallama.batching.seq_runs import take_adjacent
from parallama.batching.sequence import FinishReason, Request, SeqStatus, Sequence, SharedPrefix
from parallama.batching.slot_cache import SlotCache, SlotHit
from parallama.batching.stats import CacheStats, RequestStats, SchedulerStats, SlotStats
from parallama.batching.stops import StopMatcher
from parallama.memory.sizing import SeqLayout
from parallama.sequences import Backend, BatchItem, BatchPlan, DecodeOutcome
from parallama.sequences.backend import BackendError

log = logging.getLogger(__name__)
# What a client reads when a step fails (Request.error reaches the client): the details go to the log.
GENERATION_FAILED = "the engine failed while generating this request"

Delivery = tuple[str, Event]  # (request id, event): where it goes is the engine's business


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    ctx_size: int  # most tokens (prompt + output) one sequence may hold
    growth_margin: int = 16  # cells a newly admitted sequence should find free beyond its prompt
    layout: SeqLayout | None = None  # the plan's seq_ids; None: every seq_id is a slot, no prefix cache
    cache_ram_bytes: int = 0  # the prefix cache's host-RAM tier; 0: none


@dataclass(slots=True)
class StepResult:
    """What one step produced: the events to deliver, and whether the KV cache ran out (the number of
    sequences that were running then, for the degradation controller; 0 when it did not)."""

    events: list[Delivery] = field(default_factory=list)
    kv_full_running: int = 0


class Scheduler:
    def __init__(self, backend: Backend, config: SchedulerConfig) -> None:
        self.backend = backend
        self.config = config
        layout = config.layout or SeqLayout(backend.n_seq_max)
        if layout.n_seq_max > backend.n_seq_max:
            raise ValueError(f"the layout needs {layout.n_seq_max} seq_ids; the context has {backend.n_seq_max}")
        self.layout = layout
        ram = RamTier(config.cache_ram_bytes) if config.cache_ram_bytes > 0 else None
        self.cache: PrefixCache | SlotCache | None = None
        if layout.cache_ids and backend.kv_unified:
            self.cache = PrefixCache(backend, layout.cache_seq_ids, ram)
        elif layout.slot_cache and not backend.kv_unified:
            self.cache = SlotCache(backend, ram)
        self.num_slots = layout.slots  # seq_ids requests may take
        self.waiting: deque[list[Sequence]] = deque()  # groups admitted together, FCFS
        self.running: list[Sequence] = []
        self.requests: dict[str, Request] = {}
        self.free_ids = list(range(self.num_slots - 1, -1, -1))
        self.num_steps = 0
        self.num_preemptions = 0
        self.num_dequeued = 0  # requests that left the queue for the first time (admitted or ended)
        self.num_resizes = 0
        self.metrics = RequestMetrics()  # latencies and outcomes, recorded at admission, first token and end
        self._admissions = itertools.count()
        self._out: list[Delivery] = []
        self._kv_full_running = 0

    # --- commands ------------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        if request.n > self.num_slots:  # it could never take its sequences all at once
            raise ValueError(f"n={request.n} exceeds the {self.num_slots} sequences of this engine")
        request.sequences = [Sequence(request, i) for i in range(request.n)]
        request.num_unfinished = request.n
        self.requests[request.request_id] = request
        self.waiting.append(list(request.sequences))

    def abort(self, request_id: str) -> list[Delivery]:
        request = self.requests.get(request_id)
        if request is None:
            return []
        self._end(request, FinishReason.CANCELLED)
        return self._take_out().events

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def kv_cells_used(self) -> int:
        """Cells in use, the prefix cache's included; a shared prefix counts once, as in llama.cpp."""
        prefixes = {id(s.prefix): s.prefix.length for s in self.running if s.prefix and s.prefix.node is None}
        return sum(s.own_cells() for s in self.running) + sum(prefixes.values()) + self.kv_cells_cached()

    def kv_cells_cached(self) -> int:
        return self.cache.num_cells if self.cache else 0

    def stats(self) -> SchedulerStats:
        by_id = {s.seq_id: s for s in self.running}
        slots = []
        for seq_id in range(self.num_slots):
            seq = by_id.get(seq_id)
            if seq is None:
                slots.append(SlotStats(seq_id, "idle", 0))
            else:
                state = "generating" if seq.output else "prefill"
                slots.append(SlotStats(seq_id, state, seq.num_computed, seq.request.request_id))
        return SchedulerStats(
            running=len(self.running), slots=tuple(slots), cells_used=self.kv_cells_used() - self.kv_cells_cached(),
            steps=self.num_steps, preemptions=self.num_preemptions, resizes=self.num_resizes,
            running_requests=len({id(s.request) for s in self.running}),
            parked=sum(len(g) for g in self.waiting if not _first_admission(g)))

    def request_stats(self) -> RequestStats:
        in_flight = sum(len(s.output) for r in self.requests.values() for s in r.sequences
                        if s.status != SeqStatus.FINISHED)
        return self.metrics.stats(in_flight)

    def cache_ram_bytes(self) -> int:
        return self.cache.ram.num_bytes if self.cache is not None and self.cache.ram is not None else 0

    def release_cache_ram(self) -> int:
        return self.cache.ram.clear() if self.cache is not None and self.cache.ram is not None else 0

    def cache_stats(self) -> CacheStats:
        return self.cache.stats() if self.cache else CacheStats()

    # --- one step ------------------------------------------------------------------------------
    def step(self, cap: int | None = None) -> StepResult:
        """One step with at most ``cap`` sequences running (default: every slot). The cap is the
        degradation controller's to decide; the scheduler obeys it and reports when KV runs out."""
        self.schedule(cap)
        return self.run()

    def schedule(self, cap: int | None = None) -> None:
        """The first half of a step: end expired requests, admit what fits, share group prompts."""
        self._expire(time.monotonic())
        self._admit(self.num_slots if cap is None else cap)
        self._share_prefixes()

    def run(self) -> StepResult:
        """The second half: one decode over everything running, then sampling and events."""
        plan, seqs = self._plan()
        if plan.items:
            self.num_steps += 1
            self._decode(plan, seqs)
        return self._take_out()

    def _decode(self, plan: BatchPlan, seqs: list[Sequence]) -> None:
        try:
            outcome = self.backend.decode(plan)
        except BackendError as exc:
            log.error("decode failed: %s", exc)
            self._fail({s.request for s in seqs}, GENERATION_FAILED)
            return
        if outcome is DecodeOutcome.NO_KV_SLOT:
            self._on_kv_full(plan)
            return
        for seq, item, row in zip(seqs, plan.items, plan.logits_index):
            seq.num_computed += len(item.token_ids)
            if item.wants_logits:
                if not seq.output:
                    self._keep_in_cache(seq)  # the prompt is in: later requests can share it now
                    self.metrics.first_token(seq, time.monotonic())  # once per sequence, not per token
                self._accept(seq, seq.sampler.sample(row))

    def _expire(self, now: float) -> None:
        """Requests past their deadline finish with what they have (finish_reason "length")."""
        for request in [r for r in self.requests.values() if r.deadline is not None and r.deadline <= now]:
            self._end(request, FinishReason.LENGTH)

    # --- admission -----------------------------------------------------------------------------
    def _admit(self, cap: int) -> None:
        while self.waiting:
            group = self.waiting[0]
            if len(group) > len(self.free_ids):
                break  # before the lookup: with every slot taken there is nothing to look up for
            hit = self._lookup(group)
            if self._wait_for_shared_prefill(group, hit) or not self._can_admit(group, cap, hit):
                break
            self.waiting.popleft()
            if _first_admission(group):
                self.num_dequeued += 1
                self.metrics.admitted(group[0].request, time.monotonic())
            try:
                for seq in group:
                    self._start(seq, hit if seq is group[0] else None)
            except Exception as exc:  # e.g. llama.cpp refused a sampler: fail this request, not the engine
                log.exception("could not start %s", group[0].request.request_id)
                self._fail({group[0].request}, str(exc))
                continue
            leader, followers = group[0], group[1:]
            if followers and len(leader.prompt) > 1 and leader.num_computed == 0:
                leader.followers = followers
                for f in followers:
                    f.copy_from = leader

    def _can_admit(self, group: list[Sequence], cap: int, hit: Hit | None) -> bool:
        """Free slots are checked first, in _admit."""
        if not self.running:
            return True  # an idle engine always takes the head of the queue, so nothing waits forever
        if len(self.running) + len(group) > cap:
            return False
        if not self.backend.kv_unified:
            return True  # every sequence has a stream of its own: no one's cells to wait for
        margin = min(self.config.growth_margin, group[0].request.params.max_tokens)
        copied = hit.tokens if hit is not None and hit.node is not None else 0  # shared cells cost nothing
        need = group[0].num_tokens - copied + len(group) * margin
        room = self.backend.n_ctx - self._committed_cells()
        if need > room and self.cache:  # the cache gives cells back before anyone waits
            room += self.cache.evict(need - room, keep=hit.node if hit is not None else None)
        return need <= room

    def _lookup(self, group: list[Sequence]) -> Hit | None:
        """The prefix cache's best offer for a single new sequence (groups share their own prompt)."""
        seq = group[0]
        if self.cache is None or len(group) > 1 or seq.num_computed or seq.parked is not None:
            return None
        if isinstance(self.cache, SlotCache):
            computed = ((s.seq_id, s.tokens(0, s.num_computed)) for s in self.running if s.num_computed)
            return self.cache.lookup(seq.prompt, self.free_ids, computed, self._busy_ids())
        return self.cache.lookup(seq.prompt, self.backend.n_ctx - self._committed_cells())

    def _wait_for_shared_prefill(self, group: list[Sequence], hit: Hit | None) -> bool:
        """A fan-out: the head of the queue shares a long prefix with a prompt still being prefilled.
        It waits a step or two for that prompt to reach the cache, then copies it, instead of
        computing the same tokens again beside it."""
        if self.cache is None or len(group) > 1 or group[0].num_computed or group[0].parked is not None:
            return False
        prompt, have = group[0].prompt, hit.tokens if hit is not None else 0
        for seq in self.running:
            if not seq.output and seq.request.n == 1:
                shared = common_prefix(seq.prompt, prompt, 0, min(len(prompt), len(seq.prompt)) - 1)
                if shared >= have + 4 * MIN_REUSE:
                    return True
        return False

    def _committed_cells(self) -> int:
        """Cells the running sequences hold once their pending tokens are in."""
        return self.kv_cells_used() + sum(s.num_pending for s in self.running if s.copy_from is None)

    def _start(self, seq: Sequence, hit: Hit | None) -> None:
        if seq.sampler is None:  # first admission; built before taking a seq_id, in case it raises
            params = seq.request.params
            seq.sampler = self.backend.new_sampler(params)
            seq.detokenizer = IncrementalDetokenizer(self.backend.token_bytes)
            seq.stops = StopMatcher(params.stop)
        seq.seq_id = self._take_seq_id(hit)
        seq.status = SeqStatus.RUNNING
        seq.admitted = next(self._admissions)
        self.running.append(seq)
        if seq.parked is not None:
            self._unpark(seq)
            return
        if self._cacheable(seq) and seq.num_computed == 0:
            self.cache.tokens_queried += len(seq.prompt)  # the prefix cache's queries, in tokens as vLLM's
            if hit is None:
                self.cache.misses += 1
        if hit is not None:
            self._take_hit(seq, hit)

    def _take_seq_id(self, hit: Hit | SlotHit | None) -> int:
        if isinstance(self.cache, SlotCache):  # the slot holding the hit, or the one holding least of value
            return self.cache.claim(self.free_ids, hit, self._busy_ids())
        return take_adjacent(self.free_ids, self._busy_ids())

    def _busy_ids(self) -> set[int]:
        return {s.seq_id for s in self.running if s.seq_id is not None}

    def _take_hit(self, seq: Sequence, hit: Hit | SlotHit) -> None:
        try:
            node = self.cache.attach(seq.seq_id, hit)
        except BackendError as exc:  # a RAM copy that does not fit after all: compute instead
            log.warning("seq=%d: cached prefix not restored (%s); computing it", seq.seq_id, exc)
            return
        seq.num_computed = hit.tokens
        seq.prefix = SharedPrefix(hit.tokens, node) if node is not None else None
        seq.request.cached_tokens = hit.tokens

    def _cacheable(self, seq: Sequence) -> bool:
        return self.cache is not None and seq.request.n == 1

    def _keep_in_cache(self, seq: Sequence) -> None:
        """Leave this sequence's KV in the prefix cache (its prompt once computed, then prompt and answer
        when it finishes); from then on it shares those cells with the cache."""
        if not self._cacheable(seq) or seq.seq_id is None or isinstance(self.cache, SlotCache):
            return  # a slot's stream keeps its KV when the sequence ends (_release)
        shared = seq.prefix.node if seq.prefix is not None else None
        node = self.cache.insert(seq.seq_id, seq.tokens(0, seq.num_computed), shared)
        if node is not None and node is not shared:
            seq.prefix = SharedPrefix(node.end, node)

    def _unpark(self, seq: Sequence) -> None:
        """Put a preempted sequence's saved KV back; if it does not fit, it recomputes instead."""
        try:
            self.backend.seq_restore(seq.seq_id, seq.parked)
            seq.num_computed = seq.parked_tokens
        except BackendError as exc:
            log.warning("seq=%d could not be restored (%s); recomputing its %d tokens", seq.seq_id, exc,
                        seq.parked_tokens)
            self.backend.seq_remove(seq.seq_id)
        seq.parked, seq.parked_tokens = None, 0

    def _share_prefixes(self) -> None:
        """Copy a leader's prompt cells (all but the last token) to the group members waiting on it."""
        for leader in self.running:
            shared = len(leader.prompt) - 1
            if not leader.followers or leader.num_computed < shared:
                continue
            prefix = SharedPrefix(shared) if self.backend.kv_unified else None  # streams copy, not share
            leader.prefix = prefix
            for f in leader.followers:
                self.backend.seq_copy(leader.seq_id, f.seq_id, shared)
                f.num_computed, f.prefix, f.copy_from = shared, prefix, None
            leader.followers = []

    # --- planning ------------------------------------------------------------------------------
    def _plan(self) -> tuple[BatchPlan, list[Sequence]]:
        items: list[tuple[Sequence, BatchItem]] = []
        for seq in self.running:  # decode first: one token for every generating sequence
            if seq.is_generating:
                items.append((seq, BatchItem(seq.seq_id, seq.num_computed, [seq.output[-1]], True)))
        budget = self.backend.n_batch - len(items)
        for seq in self.running:  # then prompt chunks, oldest first, within the token budget
            if budget <= 0:
                break
            if seq.is_generating or seq.copy_from is not None:
                continue
            end = len(seq.prompt) - 1 if seq.followers else seq.num_tokens
            n = min(budget, end - seq.num_computed)
            if n <= 0:
                continue
            start = seq.num_computed
            items.append((seq, BatchItem(seq.seq_id, start, seq.tokens(start, start + n), start + n == seq.num_tokens)))
            budget -= n
        if not self.backend.kv_unified:
            # llama.cpp splits a batch over streams into micro-batches of consecutive, increasing seq_ids
            # (split_equal): in seq_id order, all slots that run decode in one; in arrival order, one each.
            items.sort(key=lambda pair: pair[1].seq_id)
        plan = BatchPlan()
        for _, item in items:
            plan.add(item)
        return plan, [seq for seq, _ in items]

    # --- results -------------------------------------------------------------------------------
    def _accept(self, seq: Sequence, token: int) -> None:
        if self.backend.is_eog(token):
            seq.ended_by_eog = True
            self._finish(seq, FinishReason.STOP, token_ids=[token])
            return
        seq.output.append(token)
        seq.last_logprob = seq.sampler.last_logprob  # None unless the request asked for logprobs
        text, stopped = seq.stops.feed(seq.detokenizer.add(token))
        if stopped:
            self._finish(seq, FinishReason.STOP, text, [token], flush=False)
        elif len(seq.output) >= seq.request.params.max_tokens or seq.num_tokens >= self._max_seq_tokens():
            self._finish(seq, FinishReason.LENGTH, text, [token])
        else:
            self._out.append((seq.request.request_id, seq.text_event(token, text)))

    def _max_seq_tokens(self) -> int:
        """ctx_size, or less when the sequence's own KV stream is smaller (sized down for want of memory)."""
        if self.backend.kv_unified:
            return self.config.ctx_size  # a full pool is NO_KV_SLOT's business (_on_kv_full)
        return min(self.config.ctx_size, self.backend.n_ctx_seq)

    def _finish(self, seq: Sequence, reason: FinishReason, text: str = "", token_ids: list[int] | None = None,
                flush: bool = True) -> None:
        if flush and seq.detokenizer is not None:
            text += seq.stops.feed(seq.detokenizer.flush())[0] + seq.stops.flush()
        completed = reason in (FinishReason.STOP, FinishReason.LENGTH)
        if completed:
            self._keep_in_cache(seq)  # the next turn of this conversation starts with all of it
        self._release(seq, keep=completed)
        seq.status, seq.finish_reason = SeqStatus.FINISHED, reason
        if seq.sampler is not None:
            seq.sampler.close()
        event = seq.final_event(text, token_ids or [])
        request = seq.request
        request.num_unfinished -= 1
        now = time.monotonic()
        self.metrics.sequence_ended(seq, now)
        if request.num_unfinished == 0:
            event.usage, event.error = request.usage(), request.error
            self.requests.pop(request.request_id, None)
            self.metrics.request_ended(request, now)
        self._out.append((request.request_id, event))

    def _release(self, seq: Sequence, keep: bool = False) -> None:
        """Give back the seq_id and KV cells (with a stream per slot, a completed sequence's cells stay in
        its slot for the prefix cache); group members still waiting on it go their own way."""
        if seq.seq_id is None:
            return
        if keep and isinstance(self.cache, SlotCache) and self._cacheable(seq):
            self.cache.retain(seq.seq_id, seq.tokens(0, seq.num_computed))
        else:
            self.backend.seq_remove(seq.seq_id)
        self.free_ids.append(seq.seq_id)
        self.running.remove(seq)
        for f in seq.followers:
            f.copy_from = None
        if seq.copy_from is not None:
            seq.copy_from.followers.remove(seq)
        if seq.prefix is not None and seq.prefix.node is not None:
            self.cache.release(seq.prefix.node)
        seq.seq_id, seq.followers, seq.copy_from, seq.prefix, seq.num_computed = None, [], None, None, 0

    # --- pressure and failure ------------------------------------------------------------------
    def _on_kv_full(self, plan: BatchPlan) -> None:
        """The cache had no room for this batch: drop any partial writes and park the
        newest sequence. The batch runs again next step without it."""
        for item in plan.items:
            self.backend.seq_remove(item.seq_id, item.start_pos)
        if not self.backend.kv_unified and self._end_overflowing_streams(plan):
            return  # the others' batch runs again next step
        if self.cache and self.cache.evict(plan.num_tokens):
            return  # the cache's cells may be enough: run the batch again as it was
        if len(self.running) > 1:
            self._kv_full_running = len(self.running)  # reported with this step's result
            self.preempt(max(self.running, key=lambda s: s.admitted))
        else:
            log.warning("seq=%s does not fit in %d KV cells alone", self.running[0].seq_id, self.backend.n_ctx)
            self._finish(self.running[0], FinishReason.LENGTH)

    def _end_overflowing_streams(self, plan: BatchPlan) -> bool:
        """With a stream per sequence, a full stream is that sequence's own limit: nobody else's cells would
        make room, so it ends there ("length"). Returns whether any did."""
        by_id = {s.seq_id: s for s in self.running}
        full = [by_id[i.seq_id] for i in plan.items if i.start_pos + len(i.token_ids) > self.backend.n_ctx_seq]
        for seq in full:
            log.warning("seq=%d: its KV stream of %d cells is full", seq.seq_id, self.backend.n_ctx_seq)
            self._finish(seq, FinishReason.LENGTH)
        return bool(full)

    def preempt(self, seq: Sequence) -> None:
        """Park a running sequence's KV in host memory, free its cells and seq_id, and queue it first.
        Restored bit for bit when it resumes, so its output is the same as without the preemption."""
        log.info("seq=%d preempted at %d tokens", seq.seq_id, seq.num_tokens)
        if seq.num_computed:
            seq.parked, seq.parked_tokens = self.backend.seq_save(seq.seq_id), seq.num_computed
        self._release(seq)
        seq.status = SeqStatus.WAITING
        self.num_preemptions += 1
        self.waiting.appendleft([seq])

    def resize(self, n_ctx: int) -> None:
        """Rebuild the KV cache with ``n_ctx`` cells: park everything that runs, rebuild, and let
        admission restore the parked sequences, oldest first, as room allows."""
        for seq in sorted(self.running, key=lambda s: s.admitted, reverse=True):
            self.preempt(seq)
        self.backend.resize(n_ctx)
        if self.cache:
            self.cache.forget()
        # With a stream per seq_id the context may have fewer of them now (or more again, up to the slots).
        self.free_ids = list(range(min(self.num_slots, self.backend.n_seq_max) - 1, -1, -1))
        self.num_resizes += 1
        log.info("KV cache resized to %d cells", self.backend.n_ctx)

    def _fail(self, requests: set[Request], message: str) -> None:
        for request in requests:
            request.error = message
            self._end(request, FinishReason.ERROR)

    def _end(self, request: Request, reason: FinishReason) -> None:
        """Finish every sequence of a request that has not finished, queued or running."""
        self._unqueue(request)
        for seq in request.sequences:
            if seq.status != SeqStatus.FINISHED:
                self._finish(seq, reason)

    def fail_running(self, message: str) -> list[Delivery]:
        self._fail({s.request for s in self.running}, message)
        return self._take_out().events

    def fail_all(self, message: str) -> list[Delivery]:
        """End every request, queued or running, with an error (a shutdown deadline)."""
        self._fail(set(self.requests.values()), message)
        return self._take_out().events

    def _unqueue(self, request: Request) -> None:
        for group in [g for g in self.waiting if g[0].request is request]:
            self.waiting.remove(group)
            self.num_dequeued += _first_admission(group)

    def _take_out(self) -> StepResult:
        result = StepResult(self._out, self._kv_full_running)
        self._out, self._kv_full_running = [], 0
        return result


def _first_admission(group: list[Sequence]) -> bool:
    """The group leaves the queue for the first time (a resumed, preempted one was counted before)."""
    return group[0].admitted < 0
