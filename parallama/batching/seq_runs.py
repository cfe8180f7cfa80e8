"""Keeping the running sequences' seq_ids consecutive.

With a KV stream per sequence (llama.cpp's default, non-unified KV), llama_decode splits a batch into
micro-batches of consecutive, increasing seq_ids (llama_batch_allocr::split_equal, "sequential"), and
computes the graph once per micro-batch. Eight sequences decoding on slots 2, 4, 8-10 and 13-15 take
four graph computations per step where slots 8-15 take one. Measured with SmolLM2 on 2 CPU threads, one
decode step of 8 sequences: 45 ms on 1 run, 52.5 on 2, 64.5 on 4, 79 on 8 (one sequence alone: 9.6 ms);
8 closed-loop HTTP streams on 16 slots ran on 3-4 runs at 112 tok/s, against llama-server's 140.

So a new sequence takes the free seq_id that adds no run when it can (one that fills a hole between
two runs removes one), and a cached prefix in a slot that would add a run must be worth it.
"""

from __future__ import annotations

from collections.abc import Collection

# A slot that adds a run is taken for its cached prefix only when that prefix is this many tokens longer
# than the best a slot adding no run offers. An extra run costs 5-8 ms on every step while it lasts; a
# prompt token costs 3.5-3.8 ms to compute, once (same measurements): 32 tokens pay for 16-25 steps.
RUN_COST_TOKENS = 32


def runs_added(busy: Collection[int], seq_id: int) -> int:
    """How the number of runs of consecutive busy seq_ids changes when ``seq_id`` joins them: +1 when it
    starts a run of its own, 0 when it extends one, -1 when it joins two."""
    return 1 - ((seq_id - 1) in busy) - ((seq_id + 1) in busy)


def take_adjacent(free_ids: list[int], busy: Collection[int]) -> int:
    """Remove and return the free seq_id that adds the fewest runs (the lowest on a tie)."""
    seq_id = min(free_ids, key=lambda s: (runs_added(busy, s), s))
    free_ids.remove(seq_id)
    return seq_id
