"""The prefix cache when every sequence has a KV stream of its own (llama.cpp's default, non-unified KV).

In a stream of its own, a token attends only to its own sequence's cells, so a cached conversation costs
the running ones nothing; in one unified pool every token attends to every used cell, cached or not (at
16,000 cached cells, 8 sequences decode half as fast). Streams cannot share cells, only copy whole
streams. So a sequence that finishes leaves its KV where it is, in its slot's stream; the request that
continues it (a conversation's next turn) runs in that slot with nothing copied; and a slot that has to
take other work first saves what it holds to the host-RAM tier. A new request gets, best first:

- an idle slot whose stream holds the longest prefix of its prompt: it runs there, the rest trimmed;
- a RAM entry that matches further: restored into an idle slot (a copy of the used cells only);
- a running sequence's computed prompt (a fan-out sharing a system prompt), or an idle slot's content
  when running there would split the running seq_ids and an empty slot would not: its stream copied whole;
  (a copy is taken when the tokens it saves are worth the cells it moves: copy_pays)
- else the idle slot holding the least recently used content, and it computes everything.

Among idle slots, those that keep the running seq_ids consecutive come first, after keeping what slots
hold (seq_runs: every gap costs a graph computation per step).
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from parallama.batching.prefix_cache import MIN_REUSE
from parallama.batching.ram_tier import MIN_SAVED_TAIL, RamEntry, RamTier
from parallama.batching.seq_runs import RUN_COST_TOKENS, runs_added
from parallama.batching.stats import CacheStats
from parallama.batching.token_prefix import common_prefix
from parallama.sequences import Backend

# Copying KV costs far less than computing it: a restore from RAM or a copy between streams moves 2,000
# cells in 8-30 ms here, where one prompt token costs 4-6 ms to compute (SmolLM2, 2 CPU threads). A copy
# of N cells is taken when it saves at least N / CELLS_PER_TOKEN tokens over the best match in place.
CELLS_PER_TOKEN = 256


def copy_pays(tokens_saved: int, cells_copied: int) -> bool:
    return tokens_saved > 0 and tokens_saved * CELLS_PER_TOKEN >= cells_copied


@dataclass(frozen=True, slots=True)
class SlotHit:
    """Where a new sequence's first ``tokens`` come from: an idle slot holding them (it runs there), a RAM
    entry, or a running sequence (``source``) whose stream is copied."""

    tokens: int
    slot: int | None = None
    ram: RamEntry | None = None
    source: int | None = None  # a running sequence's stream, or an idle slot's away from the running ones


class SlotCache:
    def __init__(self, backend: Backend, ram: RamTier | None = None) -> None:
        self.backend = backend
        self.ram = ram
        self.held: dict[int, list[int]] = {}  # idle seq_id -> the tokens its stream holds from position 0
        self._used: dict[int, int] = {}  # idle seq_id -> when it was filled or hit (LRU clock)
        self.hits = self.misses = self.tokens_reused = self.evictions = 0
        self.tokens_queried = 0  # counted by the scheduler when a sequence starts
        self._clock = itertools.count(1)

    @property
    def num_cells(self) -> int:
        return sum(len(tokens) for tokens in self.held.values())

    # --- lookup --------------------------------------------------------------------------------
    def lookup(self, prompt: list[int], idle: Iterable[int], running: Iterable[tuple[int, list[int]]],
               busy: Collection[int]) -> SlotHit | None:
        """The best source for ``prompt``'s first tokens, leaving its last token to compute (its logits
        give the first sample). ``idle``: free seq_ids; ``running``: (seq_id, computed tokens); ``busy``:
        every running seq_id.

        Each offer is worth the tokens it saves, less what it costs, against computing everything in the
        slot ``claim`` would give: an idle slot that splits the running seq_ids into more runs than that
        one costs RUN_COST_TOKENS a run (seq_runs); a copy (a RAM entry, or a whole stream) must pay for
        its cells. An idle slot's stream is copied only into a slot that holds nothing, so a copy never
        pushes one conversation out to keep another's seq_ids together."""
        limit = len(prompt) - 1
        idle = list(idle)
        target = self._pick(idle, busy)
        extra_runs = {s: runs_added(busy, s) - runs_added(busy, target) for s in idle}
        best, worth = SlotHit(0), 0
        for seq_id in idle:
            n = common_prefix(self.held.get(seq_id, ()), prompt, 0, limit)
            value = n - RUN_COST_TOKENS * extra_runs[seq_id]
            if n >= MIN_REUSE and value > worth:
                best, worth = SlotHit(n, slot=seq_id), value
        if self.ram is not None:
            entry, m = self.ram.match(prompt, limit)
            if entry is not None and copy_pays(m - worth, len(entry.tokens)):
                best, worth = SlotHit(m, ram=entry), m
        streams = list(running)
        if target not in self.held:
            streams += [(s, self.held[s]) for s in idle if s in self.held and extra_runs[s] > 0]
        for seq_id, tokens in streams:
            n = common_prefix(tokens, prompt, 0, limit)
            if copy_pays(n - worth, self.backend.n_ctx_seq):  # a stream is copied whole
                best, worth = SlotHit(n, source=seq_id), n
        return best if best.tokens >= MIN_REUSE else None

    def claim(self, free_ids: list[int], hit: SlotHit | None, busy: Collection[int]) -> int:
        """Take a seq_id out of ``free_ids`` for a new sequence: the hit's slot, or else ``_pick``'s, whose
        content is vacated (saved to the RAM tier when worth keeping)."""
        if hit is not None and hit.slot is not None:
            free_ids.remove(hit.slot)
            return hit.slot
        seq_id = self._pick(free_ids, busy)
        free_ids.remove(seq_id)
        self._vacate(seq_id, keep=0)
        return seq_id

    def _pick(self, free_ids: Iterable[int], busy: Collection[int]) -> int:
        """The free slot a new sequence computes in: one that holds nothing before one that holds a
        conversation; then one that keeps the running seq_ids together (seq_runs); then the one whose
        content was used longest ago (saved to the RAM tier when vacated)."""
        return min(free_ids, key=lambda s: (s in self.held, runs_added(busy, s), self._used.get(s, 0), s))

    def attach(self, seq_id: int, hit: SlotHit) -> None:
        """Put the hit's tokens in ``seq_id``'s stream (claimed for this hit)."""
        if hit.slot is not None:
            self._vacate(seq_id, keep=hit.tokens)
        elif hit.ram is not None:
            self.ram.restore(self.backend, seq_id, hit.ram, hit.tokens)
        else:
            self.backend.seq_copy(hit.source, seq_id, hit.tokens)
        self.hits += 1
        self.tokens_reused += hit.tokens

    # --- keeping KV ----------------------------------------------------------------------------
    def retain(self, seq_id: int, tokens: list[int]) -> None:
        """A sequence finished on ``seq_id``: its stream keeps ``tokens`` for whoever continues them."""
        if len(tokens) < MIN_REUSE:
            self.backend.seq_remove(seq_id)
            return
        self.held[seq_id] = tokens
        self._used[seq_id] = next(self._clock)

    def _vacate(self, seq_id: int, keep: int) -> None:
        """``seq_id``'s stream goes to a new sequence that keeps its first ``keep`` cells. What it held
        beyond them goes to the RAM tier first when that is worth a restore later."""
        tokens = self.held.pop(seq_id, None)
        self._used.pop(seq_id, None)
        if tokens is None:
            return
        if len(tokens) - keep >= MIN_SAVED_TAIL:
            self.evictions += 1
            if self.ram is not None:
                self.ram.put(tokens, self.backend.seq_save(seq_id))
        self.backend.seq_remove(seq_id, keep)

    def evict(self, cells: int, keep: object = None) -> int:
        """Held cells are in idle slots' own streams: giving them back makes no room for anyone else."""
        return 0

    def forget(self) -> None:
        """The context was rebuilt: every stream is empty (the RAM tier keeps its copies)."""
        self.held.clear()
        self._used.clear()

    def stats(self) -> CacheStats:
        ram = self.ram.stats() if self.ram is not None else (0, 0, 0)
        return CacheStats(entries=len(self.held), cells=self.num_cells, hits=self.hits, misses=self.misses,
                          pinned_cells=0, tokens_queried=self.tokens_queried, tokens_reused=self.tokens_reused,
                          evictions=self.evictions, ram_entries=ram[0], ram_bytes=ram[1], ram_budget_bytes=ram[2])
