"""The cross-request prefix cache, driven step by step on the fake backend."""

from __future__ import annotations

from parallama.batching.prefix_cache import MIN_REUSE
from parallama.batching.scheduler import Scheduler, SchedulerConfig
from parallama.batching.sequence import Request
from parallama.memory.sizing import SeqLayout
from parallama.sequences import SamplingParams
from parallama.sequences.fake_backend import FakeBackend

SYSTEM = "abcdefghijklmnopqrstuvwxyz"  # 26 tokens every prompt starts with


def make(prefix_cache: bool, n_ctx: int = 400, n_seq_max: int = 5) -> Scheduler:
    backend = FakeBackend(n_ctx=n_ctx, n_seq_max=n_seq_max, n_batch=64)
    layout = SeqLayout(n_seq_max - 1, 1) if prefix_cache else SeqLayout(n_seq_max)
    return Scheduler(backend, SchedulerConfig(ctx_size=200, growth_margin=4, layout=layout))


def add(sched: Scheduler, name: str, text: str, max_tokens: int = 5, n: int = 1) -> Request:
    request = Request(name, sched.backend.tokenize(text), SamplingParams(temperature=0, max_tokens=max_tokens), n)
    sched.add(request)
    return request


def drain(sched: Scheduler) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for _ in range(300):
        if not sched.has_work:
            break
        for request_id, event in sched.step().events:
            out.setdefault(request_id, []).extend(event.token_ids)
        assert sched.backend.cells_used == sched.kv_cells_used()  # every cell counted exactly once
    assert not sched.has_work
    return out


def first_item(sched: Scheduler, seq_id: int, since: int):
    return next(item for plan in sched.backend.plans[since:] for item in plan.items if item.seq_id == seq_id)


def test_a_shared_prefix_is_copied_not_recomputed():
    sched = make(prefix_cache=True)
    add(sched, "first", SYSTEM + "hello")
    drain(sched)
    assert sched.kv_cells_cached() == len(SYSTEM + "hello") - 1  # the cache kept the prompt's cells
    assert sched.running == [] and sched.kv_cells_used() == sched.kv_cells_cached()
    before = len(sched.backend.plans)
    add(sched, "second", SYSTEM + "world")
    drain(sched)
    item = first_item(sched, 0, before)
    assert item.start_pos == len(SYSTEM)  # only the part after the shared prefix was decoded
    assert sched.cache.hits == 1 and sched.cache.tokens_reused == len(SYSTEM)


def test_outputs_are_the_same_with_and_without_the_cache():
    texts = [SYSTEM + t for t in ("hello", "world", "quick", "jumps")]
    results = []
    for enabled in (False, True):
        sched = make(prefix_cache=enabled)
        for i, text in enumerate(texts[:2]):
            add(sched, f"r{i}", text, 8)
        out = drain(sched)
        for i, text in enumerate(texts[2:], start=2):
            add(sched, f"r{i}", text, 8)
        out |= drain(sched)
        results.append(out)
    assert results[0] == results[1]


def test_the_reserved_seq_id_is_never_given_to_a_request():
    sched = make(prefix_cache=True, n_seq_max=3)
    assert sched.num_slots == 2 and sched.cache.seq_id == 2
    for i in range(4):
        add(sched, f"r{i}", SYSTEM + "xyz"[i % 3], 3)
    seen = set()
    for _ in range(100):
        sched.step()
        seen |= {s.seq_id for s in sched.running}
    assert seen <= {0, 1}


def test_short_matches_and_groups_do_not_use_the_cache():
    sched = make(prefix_cache=True)
    add(sched, "first", SYSTEM)
    drain(sched)
    add(sched, "short", SYSTEM[: MIN_REUSE - 2] + "zz")
    add(sched, "group", SYSTEM + "qq", n=2)
    drain(sched)
    assert sched.cache.hits == 0


def test_the_cache_is_not_replaced_while_shared():
    sched = make(prefix_cache=True)
    add(sched, "first", SYSTEM + "aa")
    drain(sched)
    cached = list(sched.cache.tokens)
    add(sched, "user", SYSTEM + "bb", 30)  # shares the cache while it runs
    add(sched, "other", "zyxwvutsrqponmlkjihgfedcba", 30)  # would replace it, but may not
    for _ in range(3):
        sched.step()
    assert sched.cache.tokens == cached and sched.cache.users == 1
    drain(sched)
    assert sched.cache.users == 0


def test_the_cache_gives_its_cells_back_before_anyone_waits():
    sched = make(prefix_cache=True, n_ctx=64)
    add(sched, "first", SYSTEM + "aa", 2)
    drain(sched)
    assert sched.kv_cells_cached() == 27
    other = add(sched, "other", "zyxwvutsrqponmlkjihgfedcba", 30)  # 56 cells: only fits without the cache
    out = drain(sched)
    assert len(out["other"]) == 30 and other.sequences[0].finish_reason.value == "length"
    assert sched.num_preemptions == 0
    assert sched.cache.tokens[:5] == sched.backend.tokenize("zyxwv")  # the cache now holds the newer prompt


def test_resize_forgets_the_cache():
    sched = make(prefix_cache=True)
    add(sched, "first", SYSTEM + "hello")
    drain(sched)
    sched.resize(256)
    assert sched.kv_cells_cached() == 0 and sched.backend.cells_used == 0
    add(sched, "again", SYSTEM + "hello")
    drain(sched)
    assert sched.cache.hits == 0 and sched.kv_cells_cached() > 0
