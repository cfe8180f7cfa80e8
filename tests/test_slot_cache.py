"""The prefix cache with a KV stream per sequence, driven step by step on the fake backend.

Each slot's stream keeps what its last sequence computed; the next request that starts the same way runs in
that slot with nothing copied; a slot taken for other work saves what it held to the RAM tier. The fake
backend in stream mode gives every seq_id n_ctx // n_seq_max cells and copies cells between streams.
"""

from __future__ import annotations

import random

from cache_stepping import drain_checked, letters

from parallama.batching.scheduler import Scheduler, SchedulerConfig
from parallama.batching.sequence import Request
from parallama.batching.slot_cache import SlotCache
from parallama.memory.sizing import SeqLayout
from parallama.sequences import SamplingParams
from parallama.sequences.fake_backend import FakeBackend

SYSTEM = "abcdefghijklmnopqrstuvwxyz" * 3  # 78 tokens: long enough to be worth a copy or a restore


def make(slots: int = 4, ctx: int = 300, cache_ram: int = 0, cache: bool = True) -> Scheduler:
    layout = SeqLayout(slots, slot_cache=cache)
    backend = FakeBackend(n_ctx=slots * ctx, n_seq_max=slots, n_batch=64, kv_unified=False)
    return Scheduler(backend, SchedulerConfig(ctx_size=ctx, growth_margin=4, layout=layout, cache_ram_bytes=cache_ram))


def add(sched: Scheduler, name: str, text: str, max_tokens: int = 5, n: int = 1) -> Request:
    request = Request(name, sched.backend.tokenize(text), SamplingParams(temperature=0, max_tokens=max_tokens), n)
    sched.add(request)
    return request


def check(sched: Scheduler) -> None:
    """The invariants, after every step."""
    backend = sched.backend
    assert backend.cells_used == sched.kv_cells_used(), "every cell counted exactly once"
    held = [s.seq_id for s in sched.running]
    assert sorted(held + sched.free_ids) == list(range(min(sched.num_slots, backend.n_seq_max))), "a slot leaked"
    cache = sched.cache
    if cache is not None:
        assert set(cache.held) <= set(sched.free_ids), "a running slot is also held for the cache"
        for seq_id, tokens in cache.held.items():
            assert backend.kv_tokens(seq_id) == tokens, "a held stream holds other tokens"
        for seq_id in set(sched.free_ids) - set(cache.held):
            assert backend.kv_tokens(seq_id) == [], "an idle slot holds cells nobody counts"
    for seq in sched.running:
        assert len(backend.kv_tokens(seq.seq_id)) == seq.num_computed


def drain(sched: Scheduler, limit: int = 2000) -> dict[str, list[int]]:
    return drain_checked(sched, check, limit)


def prefill_tokens(sched: Scheduler, since: int = 0) -> int:
    """Tokens decoded as prompt chunks (more than one token of a sequence in a plan) since plan ``since``."""
    return sum(len(i.token_ids) for p in sched.backend.plans[since:] for i in p.items if len(i.token_ids) > 1)


def test_the_next_turn_runs_in_the_same_slot_with_nothing_copied():
    sched = make()
    first = add(sched, "t1", SYSTEM + "hello")
    answer = letters(sched, drain(sched)["t1"])
    assert first.cached_tokens == 0
    held = dict(sched.cache.held)
    assert len(held) == 1
    (slot, tokens), = held.items()
    assert letters(sched, tokens) == SYSTEM + "hello" + answer[:-1]  # the last sampled token was never decoded
    plans = len(sched.backend.plans)
    second = add(sched, "t2", SYSTEM + "hello" + answer + "more")
    drain(sched)
    assert second.cached_tokens == len(tokens)
    assert sched.backend.copies == 0
    assert prefill_tokens(sched, plans) == len(second.prompt) - len(tokens)
    assert sched.cache.hits == 1 and sched.cache.tokens_reused == len(tokens)
    assert list(sched.cache.held) == [slot]  # the conversation is still where it was


def test_outputs_are_the_same_with_and_without_the_cache():
    outs = []
    for cache in (True, False):
        sched = make(cache=cache)
        add(sched, "a", SYSTEM + "one")
        first = drain(sched)["a"]
        add(sched, "b", SYSTEM + "one" + letters(sched, first) + "two")
        outs.append(drain(sched)["b"])
    assert outs[0] == outs[1]


def test_a_miss_takes_an_empty_slot_before_one_that_holds_a_conversation():
    sched = make()
    add(sched, "a", SYSTEM + "aaa")
    drain(sched)
    (held_slot,) = sched.cache.held
    add(sched, "b", "zyxwvutsrqponmlkjihgfedcba" * 3)
    drain(sched)
    assert held_slot in sched.cache.held and len(sched.cache.held) == 2
    assert sched.cache.misses == 2 and sched.cache.evictions == 0


def test_a_slot_taken_for_other_work_saves_its_conversation_to_ram_and_it_comes_back():
    sched = make(slots=2, cache_ram=10_000)
    for name in ("a", "b"):
        add(sched, name, f"{name} " + SYSTEM)
    answers = drain(sched)
    add(sched, "c", "zyxwvutsrqponmlkjihgfedcba" * 3)  # both slots hold something: the older one goes to RAM
    drain(sched)
    assert sched.cache.evictions == 1 and sched.cache.ram.num_bytes > 0
    saved = sched.cache.ram.entries[0].tokens
    assert letters(sched, saved).startswith("a" + SYSTEM)
    turn = add(sched, "a2", "a " + SYSTEM + letters(sched, answers["a"]) + "next")
    drain(sched)
    assert turn.cached_tokens == len(saved)  # restored from RAM, not computed
    assert sched.cache.ram.num_bytes == 0 or all(e.tokens != saved for e in sched.cache.ram.entries)


def test_a_restore_is_taken_when_the_tokens_it_saves_are_worth_the_cells_it_copies():
    from parallama.batching.slot_cache import CELLS_PER_TOKEN, copy_pays

    assert copy_pays(1, CELLS_PER_TOKEN) and not copy_pays(1, CELLS_PER_TOKEN + 1) and not copy_pays(0, 1)
    sched = make(slots=1, cache_ram=10_000)
    short = add(sched, "short", SYSTEM + "hello", max_tokens=70)  # its answer makes the saved tail worth saving
    drain(sched)
    add(sched, "other", SYSTEM + "zz", max_tokens=70)  # runs in the slot: keeps SYSTEM, saves short's rest to RAM
    drain(sched)
    (entry,) = sched.cache.ram.entries
    assert letters(sched, entry.tokens).startswith(SYSTEM + "hello")
    # The slot matches SYSTEM; the entry matches 5 tokens more and holds ~150 cells: a restore pays
    again = add(sched, "again", SYSTEM + "hello" + "q")
    drain(sched)
    assert again.cached_tokens == len(SYSTEM) + 5  # restored, not computed from the slot's match
    assert copy_pays(5, len(entry.tokens)) and not copy_pays(5, 5 * CELLS_PER_TOKEN + 1)


def test_a_ram_entry_restored_in_part_stays_for_the_conversation_it_holds():
    sched = make(slots=1, cache_ram=10_000)
    add(sched, "a", SYSTEM + "hello", max_tokens=70)
    answer = letters(sched, drain(sched)["a"])
    add(sched, "b", SYSTEM + "zz", max_tokens=70)  # takes the slot: a's conversation goes to RAM
    drain(sched)
    (entry,) = sched.cache.ram.entries
    part = add(sched, "c", SYSTEM + "help")  # shares SYSTEM + "hel" with a's entry: restored in part
    drain(sched)
    assert part.cached_tokens == len(SYSTEM) + 3
    assert entry in sched.cache.ram.entries  # still there for a
    back = add(sched, "a2", SYSTEM + "hello" + answer + "more")
    drain(sched)
    assert back.cached_tokens == len(entry.tokens)  # a's whole conversation came back
    assert entry not in sched.cache.ram.entries  # restored whole: its sequence carries it on


def test_a_trimmed_slot_saves_the_tail_it_loses_to_ram():
    sched = make(slots=1, cache_ram=10_000)
    add(sched, "a", SYSTEM + "abcdefghijklmnopqrstuvwxyz" * 3, max_tokens=3)
    drain(sched)
    add(sched, "b", SYSTEM + "zzz")  # shares only SYSTEM with the slot: the slot is cut back to it
    drain(sched)
    assert [letters(sched, e.tokens)[:len(SYSTEM) + 3] for e in sched.cache.ram.entries] == [SYSTEM + "abc"]


def test_a_fan_out_prefills_the_shared_prompt_once_and_copies_it():
    sched = make()
    requests = [add(sched, f"f{i}", SYSTEM + "abcdefghijklmnopqrstuvwxyz" * 2 + "xyz"[i]) for i in range(3)]
    drain(sched)
    shared = len(SYSTEM) + 52
    # copied from the first request's stream once its prompt was in (up to a chunk short of all of it)
    assert all(r.cached_tokens >= shared - sched.backend.n_batch for r in requests[1:])
    assert sched.backend.copies == 2
    assert prefill_tokens(sched) < 2 * (shared + 1)


def test_groups_share_their_prompt_by_copying_streams():
    sched = make()
    request = add(sched, "g", SYSTEM + "hi", n=3, max_tokens=4)
    drain(sched)
    assert [len(seq.output) for seq in request.sequences] == [4, 4, 4]
    assert sched.backend.copies == 2
    assert prefill_tokens(sched) == len(request.prompt) - 1  # the prompt went in once


def test_resize_forgets_the_streams_and_fewer_slots_serve_everyone():
    sched = make(slots=4, ctx=300)
    requests = [add(sched, f"a{i}", SYSTEM + "abc"[i % 3] * (i + 1), max_tokens=20) for i in range(4)]
    for _ in range(3):
        sched.step()
    sched.resize(600)  # two streams of 300 now
    assert sched.backend.n_seq_max == 2 and sched.backend.n_ctx_seq == 300
    assert sched.cache.held == {} and len(sched.free_ids) == 2
    check(sched)
    drain(sched)
    assert [len(r.sequences[0].output) for r in requests] == [20] * 4  # the parked ones resumed and finished
    sched.resize(1200)  # memory came back: four streams again
    assert sched.backend.n_seq_max == 4 and len(sched.free_ids) == 4


def test_a_sequence_stops_at_the_end_of_its_stream():
    sched = make(slots=2, ctx=300)
    sched.resize(300)  # one stream: still 300 cells
    request = add(sched, "long", SYSTEM, max_tokens=1000)
    drain(sched)
    assert request.sequences[0].finish_reason.value == "length"
    assert len(request.prompt) + len(request.sequences[0].output) == 300


def test_random_load_with_groups_cancels_and_resizes_loses_nothing():
    rng = random.Random(7)
    sched = make(slots=4, ctx=300, cache_ram=4_000)
    names = []
    for step in range(400):
        if step < 300 and rng.random() < 0.3:
            name = f"r{step}"
            head = rng.choice([SYSTEM, SYSTEM[::-1], "hello world " * 8])
            add(sched, name, head + "abcdefghij"[: rng.randint(1, 10)], max_tokens=rng.randint(1, 12),
                n=rng.choice([1, 1, 1, 2]))
            names.append(name)
        if rng.random() < 0.03 and sched.running:
            sched.abort(rng.choice(sched.running).request.request_id)
        if step in (120, 200):
            sched.resize(600 if step == 120 else 1200)
        sched.step()
        check(sched)
    drain(sched)
    assert not sched.requests
    assert sched.kv_cells_used() == sched.kv_cells_cached() == sum(len(t) for t in sched.cache.held.values())
    assert isinstance(sched.cache, SlotCache) and sched.cache.hits > 0
