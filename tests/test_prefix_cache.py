"""The prefix cache, driven step by step on the fake backend: every cell counted once after every step.

FakeBackend's tokens are letters; a sequence's next token is the letter after the last one in its KV.
"""

from __future__ import annotations

import random

import pytest
from cache_stepping import drain_checked, letters

from parallama.batching.prefix_cache import MIN_REUSE
from parallama.batching.scheduler import Scheduler, SchedulerConfig
from parallama.batching.sequence import Request
from parallama.memory.sizing import SeqLayout
from parallama.sequences import SamplingParams
from parallama.sequences.fake_backend import FakeBackend

SYSTEM = "abcdefghijklmnopqrstuvwxyz"  # 26 tokens every prompt starts with
KV_PER_TOKEN = 1  # the fake backend saves one byte per cell


def make(cache_ids: int = 8, slots: int = 4, n_ctx: int = 400, cache_ram: int = 0) -> Scheduler:
    layout = SeqLayout(slots, cache_ids)
    backend = FakeBackend(n_ctx=n_ctx, n_seq_max=layout.n_seq_max, n_batch=64)
    return Scheduler(backend, SchedulerConfig(ctx_size=200, growth_margin=4, layout=layout, cache_ram_bytes=cache_ram))


def add(sched: Scheduler, name: str, text: str, max_tokens: int = 5, n: int = 1) -> Request:
    request = Request(name, sched.backend.tokenize(text), SamplingParams(temperature=0, max_tokens=max_tokens), n)
    sched.add(request)
    return request


def check(sched: Scheduler) -> None:
    """The invariants, after every step."""
    assert sched.backend.cells_used == sched.kv_cells_used(), "every cell counted exactly once"
    cache = sched.cache
    if cache is not None:
        assert sorted(list(cache.entries) + cache.free_ids) == list(sched.layout.cache_seq_ids), "a cache id leaked"
        for seq_id, node in cache.entries.items():
            assert node.seq_id == seq_id
            assert sched.backend.kv_tokens(seq_id) == node.path_tokens(), "an entry's cells hold other tokens"
        assert cache.num_cells == sum(len(n.tokens) for n in walk(cache.root) if n is not cache.root)
        for node in walk(cache.root):
            if node is not cache.root:
                assert any(n.seq_id is not None for n in walk(node)), "a node no entry holds"
    held = [s.seq_id for s in sched.running]
    assert sorted(held + sched.free_ids) == list(range(sched.num_slots)), "a slot leaked"


def walk(node):
    yield node
    for child in node.children:
        yield from walk(child)


def drain(sched: Scheduler, limit: int = 500) -> dict[str, list[int]]:
    return drain_checked(sched, check, limit)


def decoded_from(sched: Scheduler, since: int, seq_id: int = 0) -> int:
    """Position of the first token a sequence decoded after plan ``since``."""
    return next(item.start_pos for plan in sched.backend.plans[since:] for item in plan.items if item.seq_id == seq_id)


# --- hits -----------------------------------------------------------------------------------------------
def test_the_next_turn_reuses_the_previous_turns_prompt_and_answer():
    sched = make()
    first = add(sched, "t1", SYSTEM + "hello", 5)
    answer = letters(sched, drain(sched)["t1"])
    assert answer == "pqrst"
    # The conversation's KV (prompt + answer but its last token, never decoded) stays cached.
    kept = len(first.prompt) + len(answer) - 1
    assert sched.kv_cells_cached() == kept and sched.cache.stats().entries == 1
    before = len(sched.backend.plans)
    second = add(sched, "t2", SYSTEM + "hello" + answer + "more", 5)
    drain(sched)
    assert decoded_from(sched, before) == kept  # only the new part was computed
    assert second.usage().cached_tokens == kept
    assert sched.cache.hits == 1 and sched.cache.tokens_reused == kept


def test_each_request_counts_one_hit_or_one_miss_however_long_it_waits():
    sched = make(slots=1)
    add(sched, "m1", SYSTEM + "hello", 6)  # misses: nothing is cached yet
    add(sched, "m2", "zyxwvutsrq", 6)  # a miss too, looked up at the head of the queue while m1 runs
    add(sched, "h1", SYSTEM + "world", 6)  # shares m1's first 26 tokens: a hit
    drain(sched)
    assert (sched.cache.hits, sched.cache.misses) == (1, 2)


def test_outputs_are_the_same_with_and_without_the_cache():
    texts = [SYSTEM + t for t in ("hello", "world", "quick", "jumps")]
    results = []
    for cache_ids in (0, 8):
        sched = make(cache_ids=cache_ids)
        for i, text in enumerate(texts[:2]):
            add(sched, f"r{i}", text, 8)
        out = drain(sched)
        for i, text in enumerate(texts[2:], start=2):
            add(sched, f"r{i}", text, 8)
        out |= drain(sched)
        results.append(out)
    assert results[0] == results[1]


def test_a_partial_hit_splits_the_entry_and_counts_each_cell_once():
    sched = make()
    add(sched, "a", SYSTEM + "hello", 3)
    drain(sched)
    before = len(sched.backend.plans)
    b = add(sched, "b", SYSTEM + "world", 3)
    drain(sched)
    assert decoded_from(sched, before) == len(SYSTEM)
    assert b.usage().cached_tokens == len(SYSTEM)
    # Two conversations, one shared run of 26 cells: 26 + 7 + 7 cells in all, not 33 + 33
    assert sched.cache.stats().entries == 2
    assert sched.kv_cells_cached() == len(SYSTEM) + 2 * (len("hello") + 3 - 1)


def test_short_matches_and_groups_do_not_use_the_cache():
    sched = make()
    add(sched, "first", SYSTEM)
    drain(sched)
    add(sched, "short", SYSTEM[: MIN_REUSE - 2] + "zz")
    group = add(sched, "group", SYSTEM + "qq", n=2)
    drain(sched)
    assert sched.cache.hits == 0 and group.usage().cached_tokens == 0


def test_many_sequences_share_one_cached_prefix_while_they_run():
    sched = make(slots=4)
    add(sched, "warm", SYSTEM + "aa", 2)
    drain(sched)
    users = [add(sched, f"u{i}", SYSTEM + "bcdef"[i] * 3, 20) for i in range(4)]
    for _ in range(3):
        sched.step()
        check(sched)
    assert len(sched.running) == 4 and all(s.prefix is not None and s.prefix.node is not None for s in sched.running)
    drain(sched)
    assert all(u.usage().cached_tokens >= len(SYSTEM) for u in users)


# --- eviction ---------------------------------------------------------------------------------------------
def test_least_recently_used_entries_go_first_when_ids_run_out():
    sched = make(cache_ids=4, slots=1)
    convs = {name: name * 20 for name in "vwxyz"}  # no shared prefix between them
    for name in "vwx":
        add(sched, name, convs[name], 3)
        drain(sched)
    assert sched.cache.stats().entries == 3
    add(sched, "v-again", convs["v"] + "q", 3)  # a hit: v is now the most recently used
    drain(sched)
    add(sched, "y", convs["y"], 3)
    drain(sched)
    add(sched, "z", convs["z"], 3)
    drain(sched)
    kept = {letters(sched, n.path_tokens())[0] for n in sched.cache.entries.values()}
    assert kept == {"v", "y", "z"}  # w went first, then x; v was used again in between
    assert sched.cache.evictions >= 2


def test_the_cache_gives_its_cells_back_before_anyone_waits():
    sched = make(n_ctx=64, slots=2)
    add(sched, "first", SYSTEM + "aa", 2)
    drain(sched)
    assert sched.kv_cells_cached() == 29  # 28 prompt tokens and the first of 2 answer tokens
    other = add(sched, "other", "zyxwvutsrqponmlkjihgfedcba", 30)  # 56 cells: only fits without the cache
    before = len(sched.backend.plans)
    out = drain(sched)
    assert len(out["other"]) == 30 and other.sequences[0].finish_reason.value == "length"
    assert sched.num_preemptions == 0
    assert [item.start_pos for item in sched.backend.plans[before].items] == [0]  # admitted at once
    assert letters(sched, next(iter(sched.cache.entries.values())).path_tokens()).startswith("zyxwv")


def test_a_full_kv_cache_takes_cells_from_the_cache_before_preempting():
    sched = make(n_ctx=96, slots=2)
    for name in ("k", "m"):
        add(sched, name, name * 20, 2)
        drain(sched)
    cached = sched.kv_cells_cached()
    assert cached == 42
    # Admitted with room for its prompt; it then grows into the cache's cells.
    grower = add(sched, "grow", "n" * 20, 60)
    out = drain(sched)
    assert len(out["grow"]) == 60 and grower.sequences[0].finish_reason.value == "length"
    assert sched.num_preemptions == 0 and sched.cache.evictions >= 1


def test_a_cached_prefix_in_use_is_never_evicted():
    sched = make(n_ctx=72, slots=2)
    add(sched, "warm", SYSTEM + "aa", 2)
    drain(sched)
    user = add(sched, "user", SYSTEM + "bb", 40)
    early = [t for rid, e in sched.step().events if rid == "user" for t in e.token_ids]
    shared = user.sequences[0].prefix.node
    assert shared is not None and shared.end == len(SYSTEM) + 2  # its whole prompt, kept once computed
    add(sched, "hog", "z" * 40, 20)  # wants cells: the cache may give back only what nobody shares
    for _ in range(3):
        early += [t for rid, e in sched.step().events if rid == "user" for t in e.token_ids]
        check(sched)  # the shared run's cells still hold SYSTEM (checked against the backend's cells)
        assert user.sequences[0].prefix.node is shared and shared.pins == 1
    assert sched.cache.evictions >= 1  # the unshared rest of "warm" went
    out = drain(sched)
    assert user.usage().cached_tokens == len(SYSTEM)
    assert letters(sched, early + out["user"]) == letters(sched, sched.backend.tokenize("cdefghijklmnopqrstuvwxyzab" * 2))[:40]


# --- resize and the RAM tier -------------------------------------------------------------------------
def test_resize_forgets_the_kv_entries():
    sched = make()
    add(sched, "first", SYSTEM + "hello")
    drain(sched)
    sched.resize(256)
    check(sched)
    assert sched.kv_cells_cached() == 0 and sched.backend.cells_used == 0 and sched.cache.stats().entries == 0
    again = add(sched, "again", SYSTEM + "hello")
    drain(sched)
    assert again.usage().cached_tokens == 0 and sched.kv_cells_cached() > 0


def test_evicted_entries_are_saved_to_ram_and_restored_on_a_hit():
    reference = make(cache_ids=0, slots=1)
    sched = make(cache_ids=2, slots=1, cache_ram=10_000)
    long_a = "a" + "bcdefghijklmnopqrstuvwxy" * 4  # 97 tokens
    for s in (reference, sched):
        add(s, "a", long_a, 4)
        drain(s)
        for name in "xyz":  # push conversation a out of the KV cells
            add(s, name, name * 30, 2)
            drain(s)
    stats = sched.cache.stats()
    assert stats.ram_entries >= 1 and stats.ram_bytes > 0
    assert all(letters(sched, n.path_tokens())[0] != "a" for n in sched.cache.entries.values())
    before = len(sched.backend.plans)
    resumed = add(sched, "a2", long_a + "zzz", 6)
    add(reference, "a2", long_a + "zzz", 6)
    out, expected = drain(sched), drain(reference)
    assert out["a2"] == expected["a2"]  # the restored KV continues exactly as computed KV does
    assert resumed.usage().cached_tokens >= len(long_a)
    assert decoded_from(sched, before) >= len(long_a)
    moved = sched.backend.tokenize(long_a)
    assert not any(e.tokens[:len(moved)] == moved for e in sched.cache.ram.entries)  # it moved back into the cells


def test_the_ram_tier_stays_within_its_budget():
    sched = make(cache_ids=1, slots=1, cache_ram=100)
    for name in "abcdefgh":
        add(sched, name, name * 40, 2)
        drain(sched)
        assert sched.cache.stats().ram_bytes <= 100
    assert sched.cache.stats().ram_entries == 2  # 41 bytes each


def test_release_cache_ram_empties_the_tier():
    sched = make(cache_ids=1, slots=1, cache_ram=1000)
    for name in "abc":
        add(sched, name, name * 40, 2)
        drain(sched)
    assert sched.cache_ram_bytes() > 0
    assert sched.release_cache_ram() > 0 and sched.cache_ram_bytes() == 0


# --- fan-out, groups, load ----------------------------------------------------------------------------
def test_a_fan_out_prefills_the_shared_prompt_once():
    shared = SYSTEM * 4  # 104 tokens
    sched = make(slots=4, n_ctx=600)
    requests = [add(sched, f"f{i}", shared + "vwxy"[i] * 2, 4) for i in range(4)]
    drain(sched)
    computed = sum(item.start_pos == 0 and len(item.token_ids) for plan in sched.backend.plans for item in plan.items)
    prompt_tokens = sum(len(item.token_ids) for plan in sched.backend.plans for item in plan.items
                        if len(item.token_ids) > 1 or item.start_pos < len(shared))
    assert computed <= 64 and prompt_tokens < 2 * len(shared)  # once, in 64-token chunks, not four times
    assert sum(r.usage().cached_tokens for r in requests) >= 3 * len(shared)


def test_groups_preemption_and_the_cache_together_under_load():
    rng = random.Random(7)
    sched = make(cache_ids=6, slots=3, n_ctx=220)
    histories = {c: SYSTEM[: rng.randint(10, 26)] + c * 3 for c in "pqrs"}
    for i in range(40):
        conv = rng.choice("pqrs")
        n = 2 if i % 9 == 0 else 1
        req = add(sched, f"r{i}", histories[conv], rng.randint(1, 12), n=n)
        for _ in range(rng.randint(0, 6)):
            if sched.has_work:
                sched.step()
                check(sched)
        if n == 1 and rng.random() < 0.5:
            histories[conv] += "k"
        del req
    drain(sched)
    assert sched.cache.hits > 0 and not sched.requests


@pytest.mark.parametrize("cache_ids", [1, 3])
def test_every_request_finishes_with_few_cache_ids(cache_ids):
    sched = make(cache_ids=cache_ids, slots=2, n_ctx=200)
    reqs = [add(sched, f"r{i}", SYSTEM[: 16 + i] + "xyz", 5) for i in range(8)]
    drain(sched)
    assert all(r.sequences[0].finish_reason is not None for r in reqs)
