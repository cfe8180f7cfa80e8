"""The continuous-batching scheduler, driven step by step over FakeBackend (no model, no threads).

FakeBackend's tokens are the letters a..z: a sequence's next token is the letter after the last
token in its KV cells, so prompt "a" generates "bcdef..." and every output can be predicted.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import threading
from collections import defaultdict

import pytest
from conftest import collect

from parallama.batching import Engine, EngineConfig, QueueFull
from parallama.batching.scheduler import Scheduler, SchedulerConfig
from parallama.batching.sequence import Request
from parallama.sequences import SamplingParams
from parallama.sequences.backend import BackendError, DecodeOutcome
from parallama.sequences.fake_backend import (EOS, FIRST_TEXT_TOKEN, FakeBackend, FakeConstraint, letter_token,
                                            next_allowed)

_ids = itertools.count(1)


def make_request(prompt: str = "a", max_tokens: int = 8, n: int = 1, stop: tuple[str, ...] = (),
                 request_id: str | None = None) -> Request:
    tokens = [letter_token(c) for c in prompt]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, stop=stop)
    return Request(request_id or f"r{next(_ids)}", tokens, params, n)


def expected_letters(prompt: str, count: int) -> str:
    """What FakeBackend generates after ``prompt``: the letters that follow its last one."""
    last = ord(prompt[-1]) - ord("a")
    return "".join(chr(ord("a") + (last + k) % 26) for k in range(1, count + 1))


def letters(n: int, start: str = "a") -> str:
    return "".join(chr(ord("a") + (ord(start) - ord("a") + k) % 26) for k in range(n))


class Driver:
    """Steps a scheduler to the end, checking invariants after every step."""

    def __init__(self, backend: FakeBackend, ctx_size: int = 1024, growth_margin: int = 16) -> None:
        self.backend = backend
        self.sched = Scheduler(backend, SchedulerConfig(ctx_size, growth_margin))
        self.events: dict[str, list] = defaultdict(list)
        self.event_steps: dict[str, list[int]] = defaultdict(list)  # step number of each event
        self.max_running = 0
        self.cap: int | None = None  # the degradation controller's part; None: every slot
        self.preempted: list[str] = []  # request ids, in the order their sequences were parked
        preempt = self.sched.preempt
        self.sched.preempt = lambda seq: (self.preempted.append(seq.request.request_id), preempt(seq))[1]

    def add(self, *requests: Request) -> None:
        for request in requests:
            self.sched.add(request)

    def step(self) -> list:
        out = self.sched.step(self.cap).events
        for request_id, event in out:
            self.events[request_id].append(event)
            self.event_steps[request_id].append(self.sched.num_steps)
        self.check()
        return out

    def check(self) -> None:
        sched, backend = self.sched, self.backend
        self.max_running = max(self.max_running, len(sched.running))
        assert backend.decode_calls == sched.num_steps, "one decode per step"
        assert backend.cells_used == sched.kv_cells_used(), "scheduler's KV count drifts from the backend's"
        held = [s.seq_id for s in sched.running]
        assert len(held) == len(set(held)), "a seq_id is held twice"
        assert sorted(held + sched.free_ids) == list(range(backend.n_seq_max)), "a seq_id leaked"
        assert len(sched.running) <= backend.n_seq_max

    def run(self, max_steps: int = 2000) -> None:
        for _ in range(max_steps):
            if not self.sched.has_work:
                break
            self.step()
        assert not self.sched.has_work, f"still working after {max_steps} steps"
        assert self.backend.cells_used == 0
        assert sorted(self.sched.free_ids) == list(range(self.backend.n_seq_max))
        assert not self.sched.requests

    def text(self, request: Request, index: int = 0) -> str:
        return "".join(e.text for e in self.events[request.request_id] if e.index == index)

    def reasons(self, request: Request) -> list[str]:
        finals = sorted((e.index, e.finish_reason) for e in self.events[request.request_id] if e.finish_reason)
        return [reason for _, reason in finals]

    def usage(self, request: Request):
        usages = [e.usage for e in self.events[request.request_id] if e.usage is not None]
        assert len(usages) == 1, "exactly one event carries usage"
        assert self.events[request.request_id][-1].usage is not None, "usage comes on the last event"
        return usages[0]

    def running_ids(self) -> list[str]:
        return [s.request.request_id for s in self.sched.running]


# --- the basics ---------------------------------------------------------------------------------------
def test_single_request_generates_predictable_text_and_usage():
    d = Driver(FakeBackend())
    r = make_request("abc", max_tokens=5)
    d.add(r)
    d.run()
    assert d.text(r) == "defgh"
    assert d.reasons(r) == ["length"]
    usage = d.usage(r)
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (3, 5, 8)
    tokens = [t for e in d.events[r.request_id] for t in e.token_ids]
    assert tokens == [letter_token(c) for c in "defgh"]
    # one step for the prompt (which samples "d"), then one per further token
    assert d.sched.num_steps == 5


def test_max_tokens_gives_length():
    d = Driver(FakeBackend())
    r = make_request("a", max_tokens=3)
    d.add(r)
    d.run()
    assert d.reasons(r) == ["length"]
    assert d.text(r) == "bcd"
    assert d.usage(r).completion_tokens == 3


def test_ctx_size_bounds_prompt_plus_output():
    d = Driver(FakeBackend(), ctx_size=6)
    r = make_request("abcd", max_tokens=100)
    d.add(r)
    d.run()
    assert d.reasons(r) == ["length"]
    assert d.usage(r).completion_tokens == 2  # 4 prompt + 2 output = ctx_size


@pytest.mark.parametrize("k", [0, 1, 4])
def test_eos_gives_stop_after_k_tokens(k):
    backend = FakeBackend(eos_after=k)
    d = Driver(backend)
    r = make_request("a", max_tokens=50)
    d.add(r)
    d.run()
    assert d.reasons(r) == ["stop"]
    assert d.text(r) == expected_letters("a", k)
    assert d.usage(r).completion_tokens == k  # the EOS token is not counted as output
    assert d.events[r.request_id][-1].token_ids == [EOS]
    assert backend.closed_samplers == 1


# --- admission ----------------------------------------------------------------------------------------
def test_admission_up_to_n_seq_max_then_fcfs():
    d = Driver(FakeBackend(n_seq_max=2))
    short = make_request("a", max_tokens=2)
    long = make_request("a", max_tokens=10)
    third = make_request("a", max_tokens=3)
    fourth = make_request("a", max_tokens=3)
    d.add(short, long, third, fourth)
    d.step()
    assert d.running_ids() == [short.request_id, long.request_id]
    assert [g[0].request.request_id for g in d.sched.waiting] == [third.request_id, fourth.request_id]
    assert d.sched.num_dequeued == 2
    # short finishes at step 2; its seq_id goes to the first in line, and only to it
    d.step()
    assert d.reasons(short) == ["length"]
    d.step()
    assert d.running_ids() == [long.request_id, third.request_id]
    assert [g[0].request.request_id for g in d.sched.waiting] == [fourth.request_id]
    d.run()
    assert d.max_running == 2
    # fourth only started once third (or long) let go of a seq_id
    assert d.event_steps[fourth.request_id][0] > d.event_steps[third.request_id][0]
    for r in (short, long, third, fourth):
        assert d.text(r) == expected_letters("a", r.params.max_tokens)


def test_cap_below_n_seq_max_limits_running():
    d = Driver(FakeBackend(n_seq_max=4))
    d.cap = 2
    requests = [make_request("a", max_tokens=4) for _ in range(5)]
    d.add(*requests)
    d.step()
    assert len(d.sched.running) == 2
    assert len(d.sched.free_ids) == 2  # seq_ids are there, the cap holds them back
    d.run()
    assert d.max_running == 2
    assert all(d.reasons(r) == ["length"] for r in requests)


def test_idle_scheduler_admits_head_even_when_cap_is_zero():
    d = Driver(FakeBackend(n_seq_max=2))
    d.cap = 0
    r = make_request("a", max_tokens=2)
    d.add(r)
    d.run()
    assert d.reasons(r) == ["length"]


# --- chunked prefill and decode priority ----------------------------------------------------------------
def test_long_prompt_is_chunked_within_n_batch():
    backend = FakeBackend(n_batch=8)
    d = Driver(backend)
    prompt = letters(30)
    r = make_request(prompt, max_tokens=2)
    d.add(r)
    d.run()
    chunks = math.ceil(len(prompt) / backend.n_batch)
    assert all(plan.num_tokens <= backend.n_batch for plan in backend.plans)
    prefill = backend.plans[:chunks]
    assert [item.start_pos for plan in prefill for item in plan.items] == [0, 8, 16, 24]
    assert [item.wants_logits for plan in prefill for item in plan.items] == [False, False, False, True]
    assert sum(plan.num_tokens for plan in prefill) == len(prompt)
    # the first token comes with the last chunk, not before
    assert d.event_steps[r.request_id][0] == chunks
    assert d.text(r) == expected_letters(prompt, 2)


def test_decode_is_never_starved_by_prefill():
    backend = FakeBackend(n_batch=8, n_seq_max=4, n_ctx=1000)
    d = Driver(backend)
    gens = [make_request("a", max_tokens=40), make_request("m", max_tokens=40)]
    d.add(*gens)
    d.step()  # both prompts in, both sampled a first token
    gen_ids = [s.seq_id for s in d.sched.running]
    long = make_request(letters(40), max_tokens=3)
    d.add(long)
    first_step = d.sched.num_steps + 1
    for _ in range(100):
        if d.events[long.request_id]:
            break
        d.step()
    long_first_token_step = d.event_steps[long.request_id][0]
    prefill_plans = backend.plans[first_step - 1:long_first_token_step]
    budget = backend.n_batch - len(gens)
    assert len(prefill_plans) == math.ceil(40 / budget)
    for plan in prefill_plans:
        assert plan.num_tokens <= backend.n_batch
        decodes = plan.items[:len(gens)]
        assert [i.seq_id for i in decodes] == gen_ids, "generating sequences come first in every plan"
        assert all(len(i.token_ids) == 1 and i.wants_logits for i in decodes)
        assert len(plan.items) == len(gens) + 1
    # and each generating sequence got a token in every one of those steps
    for g in gens:
        steps = d.event_steps[g.request_id]
        assert set(range(first_step, long_first_token_step + 1)) <= set(steps)
    d.run()
    assert d.text(long) == expected_letters(letters(40), 3)
    assert d.text(gens[1]) == expected_letters("m", 40)


def test_exactly_one_decode_per_step_with_many_sequences():
    backend = FakeBackend(n_seq_max=4, n_batch=16, n_ctx=2000)
    d = Driver(backend)
    requests = [make_request(letters(3 + 5 * i), max_tokens=3 + 2 * i) for i in range(7)]
    d.add(*requests)
    d.run()  # Driver.check asserts decode_calls == num_steps after every step
    assert backend.decode_calls == d.sched.num_steps == len(backend.plans)
    assert max(len(p.items) for p in backend.plans) == 4  # steps really batched several sequences
    assert all(p.num_tokens <= backend.n_batch for p in backend.plans)
    for r in requests:
        assert d.text(r) == expected_letters(letters(len(r.prompt)), r.params.max_tokens)


# --- freeing ----------------------------------------------------------------------------------------------
def test_finished_sequences_free_seq_ids_and_cells_every_step():
    backend = FakeBackend(n_seq_max=3, n_batch=16, n_ctx=500)
    d = Driver(backend)
    requests = [make_request(letters(4 + i), max_tokens=2 + 3 * i) for i in range(6)]
    requests.append(make_request(letters(6), max_tokens=5, n=2))
    requests.append(make_request("a", max_tokens=9, stop=("e",)))
    d.add(*requests)
    seen_used = 0
    for _ in range(1000):
        if not d.sched.has_work:
            break
        d.step()  # Driver.check: cells_used == kv_cells_used() after each
        seen_used = max(seen_used, backend.cells_used)
    d.run()  # and at the end: nothing held
    assert seen_used > 0
    assert backend.cells_used == 0 and d.sched.kv_cells_used() == 0
    assert sorted(d.sched.free_ids) == [0, 1, 2]
    assert backend.closed_samplers == sum(r.n for r in requests)


def test_abort_waiting_request():
    backend = FakeBackend(n_seq_max=1)
    d = Driver(backend)
    running = make_request("a", max_tokens=5)
    waiting = make_request("abc", max_tokens=5)
    d.add(running, waiting)
    d.step()
    assert d.sched.num_dequeued == 1
    out = d.sched.abort(waiting.request_id)
    assert len(out) == 1
    request_id, event = out[0]
    assert request_id == waiting.request_id
    assert event.finish_reason == "cancelled" and event.text == "" and event.token_ids == []
    assert (event.usage.prompt_tokens, event.usage.completion_tokens) == (3, 0)
    assert not d.sched.waiting
    assert d.sched.num_dequeued == 2  # it left the queue: the engine's queue count goes down
    assert waiting.request_id not in d.sched.requests
    d.run()
    assert d.text(running) == "bcdef"
    assert all(item.seq_id == 0 for plan in backend.plans for item in plan.items)
    assert backend.closed_samplers == 1  # the waiting one never had a sampler


def test_abort_running_request_frees_everything():
    backend = FakeBackend(n_seq_max=2)
    d = Driver(backend)
    victim = make_request("abcd", max_tokens=50)
    other = make_request("a", max_tokens=6)
    d.add(victim, other)
    for _ in range(3):
        d.step()
    assert backend.cells_used > 0
    victim_seq = victim.sequences[0]
    seq_id = victim_seq.seq_id
    out = d.sched.abort(victim.request_id)
    assert [(rid, e.finish_reason) for rid, e in out] == [(victim.request_id, "cancelled")]
    assert out[0][1].usage.completion_tokens == 3
    assert backend.kv_tokens(seq_id) == []
    assert seq_id in d.sched.free_ids
    assert backend.cells_used == d.sched.kv_cells_used() == 3  # only "other": 1 prompt + 2 decoded
    assert backend.closed_samplers == 1
    d.run()
    assert not [e for e in d.events[victim.request_id][3:] if e.finish_reason != "cancelled"]
    assert d.sched.abort(victim.request_id) == []  # a second abort is a no-op
    assert d.text(other) == "bcdefg"


def test_abort_of_a_parallel_request_mid_prefix_share():
    backend = FakeBackend(n_seq_max=3, n_batch=4)
    d = Driver(backend)
    r = make_request(letters(10), max_tokens=5, n=3)
    d.add(r)
    d.step()  # the leader is prefilling its prefix, the followers wait for the copy
    out = d.sched.abort(r.request_id)
    assert sorted(e.index for _, e in out) == [0, 1, 2]
    assert all(e.finish_reason == "cancelled" for _, e in out)
    assert [e.usage is not None for _, e in out].count(True) == 1
    d.check()
    assert backend.cells_used == 0 and not d.sched.has_work


def test_expired_deadline_finishes_with_length_and_frees():
    backend = FakeBackend(n_seq_max=1)
    d = Driver(backend)
    running = make_request("a", max_tokens=50)
    queued = make_request("a", max_tokens=50)
    d.add(running, queued)
    d.step()
    d.step()
    running.deadline = queued.deadline = 0.0  # long past
    d.step()
    assert d.reasons(running) == ["length"] and d.reasons(queued) == ["length"]
    assert d.usage(running).completion_tokens == 2
    assert d.usage(queued).completion_tokens == 0
    assert not d.sched.has_work and backend.cells_used == 0


# --- stop strings -----------------------------------------------------------------------------------------
def test_stop_string_across_tokens_is_cut_and_never_emitted():
    d = Driver(FakeBackend())
    r = make_request("a", max_tokens=20, stop=("de",))
    d.add(r)
    d.run()
    assert d.text(r) == "bc"
    assert d.reasons(r) == ["stop"]
    assert not any("d" in e.text or "e" in e.text for e in d.events[r.request_id])
    assert d.usage(r).completion_tokens == 4  # b c d e were generated


def test_held_back_stop_prefix_is_released_when_it_is_no_stop():
    d = Driver(FakeBackend())
    r = make_request("a", max_tokens=6, stop=("bd",))
    d.add(r)
    d.run()
    texts = [e.text for e in d.events[r.request_id]]
    assert texts[0] == ""  # "b" could start "bd": held back
    assert texts[1] == "bc"  # "c" proves it is not: released with it
    assert d.text(r) == "bcdefg"
    assert d.reasons(r) == ["length"]


def test_pending_stop_prefix_is_flushed_at_length():
    d = Driver(FakeBackend())
    r = make_request("a", max_tokens=3, stop=("de",))
    d.add(r)
    d.run()
    assert d.text(r) == "bcd"
    assert d.reasons(r) == ["length"]


def test_earliest_of_several_stops_wins():
    d = Driver(FakeBackend())
    r = make_request("a", max_tokens=20, stop=("xyz", "fg", "de"))
    d.add(r)
    d.run()
    assert d.text(r) == "bc"
    assert d.reasons(r) == ["stop"]


# --- n > 1 ---------------------------------------------------------------------------------------------------
def test_parallel_choices_share_the_prompt_prefix():
    backend = FakeBackend(n_seq_max=4, n_batch=32)
    d = Driver(backend)
    prompt = letters(10)
    r = make_request(prompt, max_tokens=4, n=2)
    d.add(r)
    d.step()
    # step 1: only the leader decodes the shared part of the prompt (all but its last token)
    assert [(i.start_pos, len(i.token_ids), i.wants_logits) for i in backend.plans[0].items] == [(0, 9, False)]
    d.step()
    # step 2: the prefix was copied; each choice decodes just the last prompt token
    assert [(i.start_pos, len(i.token_ids)) for i in backend.plans[1].items] == [(9, 1), (9, 1)]
    assert backend.cells_used == 9 + 1 + 1  # the 9-cell prefix counts once
    assert d.sched.kv_cells_used() == backend.cells_used
    d.run()
    assert sum(p.num_tokens for p in backend.plans[:2]) == 11  # not 20: the prompt was decoded once
    assert d.text(r, 0) == d.text(r, 1) == expected_letters(prompt, 4)
    assert d.reasons(r) == ["length", "length"]
    usage = d.usage(r)
    assert (usage.prompt_tokens, usage.completion_tokens) == (10, 8)


def test_parallel_choices_with_a_one_token_prompt_run_on_their_own():
    backend = FakeBackend(n_seq_max=4)
    d = Driver(backend)
    r = make_request("a", max_tokens=3, n=3)
    d.add(r)
    d.run()
    assert [d.text(r, i) for i in range(3)] == ["bcd"] * 3
    assert d.usage(r).completion_tokens == 9


# --- KV pressure ---------------------------------------------------------------------------------------------
class RecordingBackend(FakeBackend):
    """FakeBackend that also records each decode's outcome."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.outcomes: list[DecodeOutcome] = []

    def decode(self, plan):
        outcome = super().decode(plan)
        self.outcomes.append(outcome)
        return outcome


WORKLOAD = [("abcd", 12), ("mnop", 12), ("wxyz", 12)]


def run_workload(backend: FakeBackend, workload=WORKLOAD) -> tuple[Driver, list[Request]]:
    d = Driver(backend)
    requests = [make_request(p, max_tokens=m, request_id=f"w{i}") for i, (p, m) in enumerate(workload)]
    d.add(*requests)
    d.run()
    return d, requests


def outcome(d: Driver, requests: list[Request]):
    return [(d.text(r), d.reasons(r), d.usage(r)) for r in requests]


def test_workload_without_pressure():
    d, requests = run_workload(RecordingBackend(n_ctx=1000, n_seq_max=3))
    assert d.sched.num_preemptions == 0
    assert DecodeOutcome.NO_KV_SLOT not in d.backend.outcomes
    assert [d.text(r) for r in requests] == ["efghijklmnop", "qrstuvwxyzab", "abcdefghijkl"]


def test_kv_exhaustion_preempts_the_newest_and_it_resumes_with_the_same_output():
    calm, calm_requests = run_workload(FakeBackend(n_ctx=1000, n_seq_max=3))
    # 3 x (4 + 12) = 48 cells are needed by the end, 40 exist: someone must make room
    backend = RecordingBackend(n_ctx=40, n_seq_max=3)
    d = Driver(backend)
    requests = [make_request(p, max_tokens=m, request_id=f"w{i}") for i, (p, m) in enumerate(WORKLOAD)]
    d.add(*requests)
    d.step()
    assert len(d.sched.running) == 3  # all three fit at first
    newest = max(d.sched.running, key=lambda s: s.admitted)
    oldest = min(d.sched.running, key=lambda s: s.admitted)
    d.run()
    assert DecodeOutcome.NO_KV_SLOT in backend.outcomes
    assert d.sched.num_preemptions > 0
    assert newest.request.request_id in d.preempted
    assert oldest.request.request_id not in d.preempted
    assert outcome(d, requests) == outcome(calm, calm_requests)  # nothing lost, nothing changed


def test_transient_decode_failure_preempts_and_output_is_unchanged():
    calm, calm_requests = run_workload(FakeBackend(n_seq_max=3))
    backend = RecordingBackend(n_seq_max=3, fail_decodes={3})
    d, requests = run_workload(backend)
    assert backend.outcomes[2] is DecodeOutcome.NO_KV_SLOT
    assert d.sched.num_preemptions == 1
    assert d.preempted == ["w2"]  # the newest
    assert outcome(d, requests) == outcome(calm, calm_requests)


def test_preempted_sequence_resumes_from_its_parked_kv():
    backend = RecordingBackend(n_seq_max=2, fail_decodes={4})
    d = Driver(backend)
    first, newest = make_request("abc", max_tokens=6), make_request("xy", max_tokens=6)
    d.add(first, newest)
    for _ in range(4):
        d.step()
    # decode 4 failed: "xy" (the newest) was parked with its 4 cells (x y z a), "b" sampled and pending
    assert backend.outcomes[3] is DecodeOutcome.NO_KV_SLOT
    seq = newest.sequences[0]
    assert seq.seq_id is None and d.preempted == [newest.request_id]
    assert seq.parked == bytes(letter_token(c) for c in "xyza")
    d.step()
    # decode 5: it was restored, not recomputed: one token at position 4, after the parked cells
    assert [(i.start_pos, i.token_ids) for i in backend.plans[4].items if i.seq_id == seq.seq_id] == \
        [(4, [letter_token("b")])]
    assert backend.kv_tokens(seq.seq_id) == [letter_token(c) for c in "xyzab"]
    assert seq.parked is None
    d.run()
    assert d.text(newest) == "zabcde"
    assert d.text(first) == "defghi"


class NoRoomToRestore(RecordingBackend):
    def seq_restore(self, seq_id: int, data: bytes) -> None:
        raise BackendError(f"seq {seq_id}: no room")


def test_preempted_sequence_recomputes_when_its_kv_cannot_be_restored():
    backend = NoRoomToRestore(n_seq_max=2, fail_decodes={4})
    d = Driver(backend)
    first, newest = make_request("abc", max_tokens=6), make_request("xy", max_tokens=6)
    d.add(first, newest)
    d.run()
    # at decode 5 its KV is rebuilt from position 0: prompt + the 3 output tokens it had
    rebuilt = [i for i in backend.plans[4].items if i.start_pos == 0]
    assert [(i.token_ids, i.wants_logits) for i in rebuilt] == [([letter_token(c) for c in "xyzab"], True)]
    assert d.text(newest) == "zabcde"
    assert d.text(first) == "defghi"


def test_abort_of_a_parked_sequence():
    backend = RecordingBackend(n_seq_max=2, fail_decodes={4})
    d = Driver(backend)
    first, newest = make_request("abc", max_tokens=20), make_request("xy", max_tokens=20)
    d.add(first, newest)
    for _ in range(4):
        d.step()
    assert d.preempted == [newest.request_id]
    seq = newest.sequences[0]
    assert seq.parked is not None and seq.seq_id is None
    dequeued = d.sched.num_dequeued
    out = d.sched.abort(newest.request_id)
    assert [(e.finish_reason, e.usage.completion_tokens) for _, e in out] == [("cancelled", len(seq.output))]
    assert not d.sched.waiting
    assert d.sched.num_dequeued == dequeued  # it had left the queue once already
    d.run()
    assert d.reasons(first) == ["length"]
    assert backend.closed_samplers == 2


def test_preempted_parallel_choice_resumes():
    calm, calm_requests = run_workload(FakeBackend(n_seq_max=4), [("abcdef", 8), ("ghij", 8)])
    backend = RecordingBackend(n_seq_max=4, n_ctx=300, fail_decodes={3, 4})
    d = Driver(backend)
    requests = [make_request("abcdef", max_tokens=8, request_id="w0", n=2),
                make_request("ghij", max_tokens=8, request_id="w1")]
    d.add(*requests)
    d.run()
    assert d.sched.num_preemptions == 2
    assert d.text(requests[0], 0) == d.text(requests[0], 1) == "ghijklmn"
    assert d.text(requests[1]) == d.text(calm_requests[1])
    assert d.usage(requests[0]).completion_tokens == 16


def test_sequence_that_cannot_fit_alone_finishes_with_length():
    backend = RecordingBackend(n_ctx=10, n_seq_max=2)
    d = Driver(backend)
    r = make_request("abcd", max_tokens=100)
    d.add(r)
    d.run()
    assert d.reasons(r) == ["length"]
    # 10 cells: 4 prompt + 6 decoded; the 7th sampled token could not go in
    assert d.usage(r).completion_tokens == 7
    assert d.text(r) == "efghijk"
    assert backend.outcomes[-1] is DecodeOutcome.NO_KV_SLOT
    assert d.sched.num_preemptions == 0


def test_prompt_larger_than_the_cache_finishes_with_length_and_the_next_one_runs():
    backend = FakeBackend(n_ctx=10, n_seq_max=2)
    d = Driver(backend)
    huge = make_request(letters(12), max_tokens=5)
    small = make_request("a", max_tokens=3)
    d.add(huge, small)
    d.run()
    assert d.reasons(huge) == ["length"] and d.usage(huge).completion_tokens == 0
    assert d.text(small) == "bcd" and d.reasons(small) == ["length"]


def test_under_pressure_no_request_is_lost():
    backend = RecordingBackend(n_ctx=48, n_seq_max=4, n_batch=16)
    d = Driver(backend)
    requests = [make_request(letters(3 + i % 5, start=chr(ord("a") + i)), max_tokens=10 + 3 * (i % 4))
                for i in range(10)]
    d.add(*requests)
    d.run()
    assert d.sched.num_preemptions > 0
    for r in requests:
        prompt = "".join(chr(ord("a") + t - 2) for t in r.prompt)
        assert d.text(r) == expected_letters(prompt, r.params.max_tokens)
        assert d.reasons(r) == ["length"]


def test_request_with_more_choices_than_seq_ids_is_refused_and_blocks_nothing():
    d = Driver(FakeBackend(n_seq_max=2))
    with pytest.raises(ValueError, match="n=3"):
        d.add(make_request("abc", max_tokens=3, n=3))
    normal = make_request("a", max_tokens=3)
    d.add(normal)
    for _ in range(20):
        d.step()
    assert d.reasons(normal) == ["length"]


# --- the engine's queue bound --------------------------------------------------------------------------------
def test_queue_bound_on_an_engine_not_started():
    """The bound counts requests beyond what free sequences take at the next step: with one free
    sequence and max_queue=2, three requests are accepted and the fourth is refused."""
    engine = Engine(FakeBackend(n_seq_max=1), EngineConfig(ctx_size=64, max_queue=2))

    async def main():
        for c in "abc":
            engine.submit([letter_token(c)], SamplingParams(max_tokens=2))
        assert engine.num_queued == 3 and engine.num_beyond_capacity == 2
        with pytest.raises(QueueFull):
            engine.submit([letter_token("d")], SamplingParams(max_tokens=2))
        assert engine.num_queued == 3

    asyncio.run(main())


class BlockingBackend(FakeBackend):
    """Its first decode blocks until the test lets it go: the worker is busy, the queue fills."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def decode(self, plan):
        if self.decode_calls == 0:
            self.entered.set()
            assert self.release.wait(30), "the test never released the decode"
        return super().decode(plan)


def test_queue_bound_on_a_running_engine(make_engine):
    backend = BlockingBackend(n_seq_max=1)
    engine = make_engine(backend, 64, max_queue=2)
    params = SamplingParams(max_tokens=3)

    async def main():
        first = engine.submit([letter_token("a")], params)
        try:
            assert backend.entered.wait(30)  # admitted; the worker now sits in its first decode
            assert engine.num_queued == 0
            queued = [engine.submit([letter_token(c)], params) for c in "mw"]
            assert engine.num_queued == 2
            with pytest.raises(QueueFull):
                engine.submit([letter_token("x")], params)
        finally:
            backend.release.set()
        results = [await collect(s) for s in [first, *queued]]
        assert [text for text, _, _ in results] == ["bcd", "nop", "xyz"]
        assert engine.num_queued == 0
        later = engine.submit([letter_token("x")], params)  # room again
        assert (await collect(later))[0] == "yza"
        status = await engine.status()
        assert (status.scheduler.running, status.queued, status.scheduler.cells_used) == (0, 0, 0)
        assert status.decode_calls == status.scheduler.steps

    asyncio.run(main())


def test_a_request_whose_start_fails_ends_with_an_error_and_the_rest_run():
    class Refusing(FakeBackend):
        def new_sampler(self, params):
            if params.seed == 666:
                raise RuntimeError("sampler refused")
            return super().new_sampler(params)

    d = Driver(Refusing(n_seq_max=2))
    bad = Request("bad", [letter_token("a")], SamplingParams(max_tokens=3, seed=666), 1)
    good = make_request("a", max_tokens=3)
    d.add(bad)
    d.add(good)
    for _ in range(20):
        d.step()
    assert d.reasons(bad) == ["error"]
    assert d.reasons(good) == ["length"]
    assert len(d.sched.free_ids) == 2 and not d.sched.running


# --- commands always answer their callers ----------------------------------------------------------------------
def test_a_failing_snapshot_answers_the_caller_with_its_error(make_engine, monkeypatch):
    engine = make_engine(FakeBackend(n_seq_max=2), 64)

    def broken_stats():
        raise RuntimeError("stats broke")

    async def main():
        monkeypatch.setattr(engine.scheduler, "stats", broken_stats)
        with pytest.raises(RuntimeError, match="stats broke"):
            await asyncio.wait_for(engine.status(), 30)
        monkeypatch.undo()
        status = await asyncio.wait_for(engine.status(), 30)  # the worker lives on
        assert status.scheduler.running == 0 and status.cap == 2

    asyncio.run(main())


def test_a_failing_add_ends_that_stream_with_an_error_and_others_run(make_engine, monkeypatch):
    engine = make_engine(FakeBackend(n_seq_max=2), 64)
    real_add = engine.scheduler.add

    def picky_add(request):
        if request.prompt == [letter_token("z")]:
            raise RuntimeError("add broke")
        real_add(request)

    monkeypatch.setattr(engine.scheduler, "add", picky_add)

    async def main():
        bad = engine.submit([letter_token("z")], SamplingParams(max_tokens=3))
        good = engine.submit([letter_token("a")], SamplingParams(max_tokens=3))
        events = [event async for event in bad]
        assert len(events) == 1 and events[0].error == "the engine could not queue this request" and events[0].usage is not None
        assert (await asyncio.wait_for(collect(good), 30))[0] == "bcd"
        assert engine.num_queued == 0  # the failed request does not linger in the queue count

    asyncio.run(main())


def test_status_of_a_stopped_engine_raises_instead_of_hanging():
    from parallama.batching import EngineStopped

    engine = Engine(FakeBackend(n_seq_max=1), EngineConfig(ctx_size=64))
    engine.start()
    engine.shutdown(timeout=30)

    async def main():
        with pytest.raises(EngineStopped):
            await asyncio.wait_for(engine.status(), 30)

    asyncio.run(main())


# --- constrained sequences (a FakeConstraint stands in for a compiled grammar) ---------------------------
def constrained_request(prompt: str, grammar: FakeConstraint | None, max_tokens: int = 12, n: int = 1,
                        request_id: str | None = None) -> Request:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, constraint=grammar)
    return Request(request_id or f"c{next(_ids)}", [letter_token(c) for c in prompt], params, n)


def expected_constrained(prompt: str, grammar: FakeConstraint) -> str:
    """The greedy output under the grammar, worked out without the scheduler."""
    state, last, out = grammar.matcher(), letter_token(prompt[-1]), ""
    while True:
        token = next_allowed(FIRST_TEXT_TOKEN + (last - FIRST_TEXT_TOKEN + 1) % 26, state.allowed())
        state.accept(token)
        if token == EOS:
            return out
        out, last = out + chr(ord("a") + token - FIRST_TEXT_TOKEN), token


GRAMMARS = [FakeConstraint("aeiou", 5), FakeConstraint("xyz", 3), FakeConstraint("q", 1), FakeConstraint("mb", 4)]


def test_a_step_mixing_constrained_and_free_sequences_finishes_each_by_its_own_rule():
    d = Driver(FakeBackend(n_seq_max=8, n_batch=64))
    prompts = ["hello", "dog", "cat", "zebra", "abc", "king", "moon", "sun"]
    grammars = [GRAMMARS[0], None, GRAMMARS[1], None, GRAMMARS[2], None, GRAMMARS[3], None]
    requests = [constrained_request(p, g) for p, g in zip(prompts, grammars)]
    d.add(*requests)
    d.run()
    assert any(len(plan.items) == 8 for plan in d.backend.plans)  # all eight decoded in the same steps
    for prompt, grammar, request in zip(prompts, grammars, requests):
        if grammar is None:
            assert (d.text(request), d.reasons(request)) == (expected_letters(prompt, 12), ["length"])
        else:
            text = d.text(request)
            assert text == expected_constrained(prompt, grammar) and d.reasons(request) == ["stop"]
            assert len(text) == grammar.length and set(text) <= set(grammar.letters)
    assert expected_constrained("hello", GRAMMARS[0]) == "uaeio"  # the mask really changed greedy choices


def test_a_preempted_constrained_sequence_resumes_where_its_grammar_was():
    grammar = FakeConstraint("aeiou", 10)
    workload = [("abcd", None), ("mnop", None), ("wxyz", grammar)]  # the newest, preempted first, is constrained

    def run(backend: FakeBackend) -> tuple[Driver, list[Request]]:
        d = Driver(backend)
        requests = [constrained_request(p, g, max_tokens=12, request_id=f"k{i}") for i, (p, g) in enumerate(workload)]
        d.add(*requests)
        d.run()
        return d, requests

    calm, calm_requests = run(FakeBackend(n_ctx=1000, n_seq_max=3))
    squeezed, requests = run(FakeBackend(n_ctx=36, n_seq_max=3))
    assert "k2" in squeezed.preempted
    assert outcome(squeezed, requests) == outcome(calm, calm_requests)
    assert squeezed.text(requests[2]) == expected_constrained("wxyz", grammar)


def test_each_choice_of_a_constrained_request_has_its_own_grammar_state():
    d = Driver(FakeBackend(n_seq_max=4))
    grammar = FakeConstraint("xyz", 3)
    request = constrained_request("abc", grammar, n=3)
    d.add(request)
    d.run()
    expected = expected_constrained("abc", grammar)
    assert [d.text(request, i) for i in range(3)] == [expected] * 3  # a shared matcher would run out early
    assert d.reasons(request) == ["stop"] * 3
