"""Keeping the running sequences' seq_ids consecutive.

With a KV stream per sequence (llama.cpp's default, non-unified KV), llama_decode splits a batch into
micro-batches of consecutive, increasing seq_ids (llama_batch_allocr::split_equal, "sequential"), and
computes the graph once per micro-batch. Eight sequences decoding on slots 2, 4, 8-10 and 13-15 take
four graph computations per step where slots 8-15 take one: measured on 2 CPU threads with SmolLM2,
8 closed-loop streams ran at 112 tok/s on 3-4 runs against 140 tok/s for llama-server on one (every
extra run costs about what decoding one sequence alone costs, ~5 ms of a ~57 ms step).

So a new sequence takes the free seq_id that adds no run when it can (one that fills a hole between
two runs removes one), and a cached prefix in a slot that would add a run must be worth it.
"""

from __future__ import annotations

from collections.abc import Collection

# A slot that adds a run is taken for its cached prefix only when that prefix is this many tokens longer
# than the best a slot adding no run offers. An extra run costs ~5 ms on every step the sequence decodes;
# a prompt token costs ~2-4 ms to compute once: 32 tokens is one short answer's worth of steps.
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
