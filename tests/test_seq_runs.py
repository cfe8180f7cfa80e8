"""Running sequences keep consecutive seq_ids, so llama.cpp decodes them in one graph computation.

With a KV stream per sequence, llama_decode splits a batch wherever a seq_id is not the previous one plus
one (llama_batch_allocr::split_equal, "sequential"). The fake backend records every plan; a plan's "runs"
below are counted the way llama.cpp splits it.
"""

from __future__ import annotations

import random

from parallama.batching.scheduler import Scheduler, SchedulerConfig
from parallama.batching.seq_runs import RUN_COST_TOKENS, runs_added, take_adjacent
from parallama.batching.sequence import Request
from parallama.memory.sizing import SeqLayout
from parallama.sequences import BatchPlan, SamplingParams
from parallama.sequences.fake_backend import FakeBackend
from cache_stepping import drain_checked

ALPHABET = "abcdefghijklmnopqrstuvwxyz"
SYSTEM = ALPHABET * 3  # 78 tokens, shared by every prompt


def micro_batches(plan: BatchPlan) -> int:
    """How many graph computations llama.cpp makes of this plan: one per run of consecutive seq_ids."""
    ids = [item.seq_id for item in plan.items]
    return sum(1 for i, seq_id in enumerate(ids) if i == 0 or seq_id != ids[i - 1] + 1)


def make(slots: int, ctx: int = 300, cache: bool = True) -> Scheduler:
    backend = FakeBackend(n_ctx=slots * ctx, n_seq_max=slots, n_batch=512, kv_unified=False)
    return Scheduler(backend, SchedulerConfig(ctx_size=ctx, growth_margin=4, layout=SeqLayout(slots, slot_cache=cache)))


def add(sched: Scheduler, name: str, text: str, max_tokens: int) -> Request:
    request = Request(name, sched.backend.tokenize(text), SamplingParams(temperature=0, max_tokens=max_tokens), 1)
    sched.add(request)
    return request


def slot_of(request: Request) -> int:
    return request.sequences[0].seq_id


def test_runs_added_counts_the_runs_a_seq_id_starts_extends_or_joins():
    busy = {2, 3, 5}
    assert runs_added(busy, 0) == 1
    assert runs_added(busy, 1) == 0 and runs_added(busy, 6) == 0
    assert runs_added(busy, 4) == -1
    assert runs_added(set(), 7) == 1


def test_take_adjacent_fills_a_hole_first_then_extends_a_run():
    free = [0, 1, 4, 7, 9]
    assert take_adjacent(free, {2, 3, 5}) == 4  # joins 2-3 and 5
    assert take_adjacent(free, {2, 3, 4, 5}) == 1  # extends, lowest first
    assert take_adjacent(free, {9}) == 0  # 7 and 0 both start a run: the lowest
    assert free == [7, 9]


def closed_loop(sched: Scheduler, clients: int, total: int, seed: int) -> list[int]:
    """``clients`` in flight, each sending its next request when the last one ends; prompts share SYSTEM[:20]
    (a chat template's system prompt) and answers have random lengths, so clients finish at different
    steps. The micro-batches of every plan made while all clients were busy."""
    rng = random.Random(seed)
    sent, counts = 0, []

    def send() -> None:
        nonlocal sent
        tail = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(3, 12)))
        add(sched, f"r{sent}", SYSTEM[:20] + tail, rng.randint(8, 40))
        sent += 1

    for _ in range(clients):
        send()
    while sent < total:
        result = sched.step()
        counts.append(micro_batches(sched.backend.plans[-1]))
        for _, event in result.events:
            if event.usage is not None:
                send()
    drain_checked(sched, lambda _: None, limit=2000)
    return counts


def test_closed_loop_clients_decode_in_one_micro_batch_with_and_without_the_cache():
    for cache in (True, False):
        for seed in (1, 2):
            counts = closed_loop(make(slots=16, cache=cache), clients=8, total=150, seed=seed)
            # A step where several clients ended at once can admit into a hole it cannot fill at once.
            assert sum(c == 1 for c in counts) >= 0.95 * len(counts), (cache, seed, counts)


def three_running_and_an_idle_conversation_away_from_them(ctx: int, turn_tokens: int) -> tuple[Scheduler, Request]:
    """Slots 0-2 run long answers; slot 5 keeps a finished conversation; 3 and 4 are empty (their requests
    were too short to keep); 6 and 7 were never used."""
    sched = make(slots=8, ctx=ctx)
    for i in range(3):
        add(sched, f"long{i}", ALPHABET[::-1][i:] + ALPHABET[::-1], max_tokens=500)  # shares nothing with SYSTEM
    shorts = [add(sched, f"short{i}", "zzzzz", max_tokens=2) for i in range(2)]
    conversation = add(sched, "conversation", SYSTEM[:turn_tokens], max_tokens=2)
    drain_until_done(sched, [*shorts, conversation])
    assert [slot_of(r) for r in sched.requests.values()] == [0, 1, 2]
    assert list(sched.cache.held) == [5]
    return sched, conversation


def test_a_prefix_held_away_from_the_running_slots_is_copied_next_to_them():
    sched, _ = three_running_and_an_idle_conversation_away_from_them(ctx=300, turn_tokens=78)
    held = list(sched.cache.held[5])
    turn = add(sched, "turn", SYSTEM + "next", max_tokens=2)
    sched.step()
    assert slot_of(turn) == 3  # next to 0-2
    assert turn.cached_tokens == 78 and sched.backend.copies == 1  # a stream of 300 cells: worth copying
    assert sched.cache.held[5] == held  # the conversation is still there for its own next turn
    assert micro_batches(sched.backend.plans[-1]) == 1


def test_a_long_prefix_runs_in_its_own_slot_when_a_copy_costs_more_than_the_gap():
    # Streams of 20,000 cells: a copy costs more than RUN_COST_TOKENS tokens of compute here.
    sched, _ = three_running_and_an_idle_conversation_away_from_them(ctx=20_000, turn_tokens=78)
    turn = add(sched, "turn", SYSTEM + "next", max_tokens=2)
    sched.step()
    assert slot_of(turn) == 5 and turn.cached_tokens == 78 and sched.backend.copies == 0


def test_a_short_prefix_away_from_the_running_slots_is_computed_next_to_them():
    short = RUN_COST_TOKENS - 4  # worth less than the extra graph computation it would cost every step
    sched, _ = three_running_and_an_idle_conversation_away_from_them(ctx=20_000, turn_tokens=short)
    turn = add(sched, "turn", SYSTEM[:short] + "next", max_tokens=2)
    sched.step()
    assert slot_of(turn) == 3 and turn.cached_tokens == 0 and sched.backend.copies == 0


def test_an_idle_conversation_is_not_pushed_out_to_keep_another_next_to_the_running_slots():
    sched = make(slots=4, ctx=300)
    for i in range(2):
        add(sched, f"long{i}", ALPHABET[::-1][i:] + ALPHABET[::-1], max_tokens=500)
    first = add(sched, "first", ALPHABET[5:] + SYSTEM, max_tokens=2)
    second = add(sched, "second", SYSTEM, max_tokens=2)
    drain_until_done(sched, [first, second])
    assert sorted(sched.cache.held) == [2, 3]  # slot 2 (next to 0-1) holds first's, 3 holds second's
    turn = add(sched, "turn", SYSTEM + "next", max_tokens=2)
    sched.step()
    assert slot_of(turn) == 3 and sched.backend.copies == 0  # in place: slot 2's conversation stays
    assert 2 in sched.cache.held and sched.cache.evictions == 0


def drain_until_done(sched: Scheduler, requests: list[Request]) -> None:
    while any(r.sequences[0].finish_reason is None for r in requests):
        sched.step()
