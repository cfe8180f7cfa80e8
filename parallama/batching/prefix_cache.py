"""A cross-request prefix cache: the KV of one recent prompt, kept under a reserved seq_id.

Chat prompts repeat themselves: the template's system prompt, earlier turns of a conversation. A new
sequence whose prompt starts like the cached one copies those cells (``seq_cp``, no compute) and only
prefills the rest. One entry, replaced only while no running sequence shares its cells, so every cell
is counted exactly once: by the cache while it holds it, by a sequence beyond its copied prefix.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from parallama.batching.stats import CacheStats
from parallama.sequences import Backend

MIN_REUSE = 16  # shorter matches are not worth a copy


@dataclass(slots=True)
class PrefixCache:
    backend: Backend
    seq_id: int  # reserved: no request ever runs on it
    tokens: list[int] = field(default_factory=list)  # what the cells under seq_id hold, from position 0
    users: int = 0  # running sequences whose first cells are shared with the cache
    hits: int = 0
    misses: int = 0
    tokens_reused: int = 0

    @property
    def num_cells(self) -> int:
        return len(self.tokens)

    def stats(self) -> CacheStats:
        return CacheStats(entries=1 if self.tokens else 0, cells=self.num_cells, hits=self.hits, misses=self.misses,
                          tokens_reused=self.tokens_reused)

    def match(self, prompt: list[int]) -> int:
        """Cells a new sequence with this prompt can copy: the common prefix, leaving at least the
        prompt's last token to compute (its logits give the first sample)."""
        limit = min(len(self.tokens), len(prompt) - 1)
        n = 0
        while n < limit and self.tokens[n] == prompt[n]:
            n += 1
        return n if n >= MIN_REUSE else 0

    def copy_to(self, seq_id: int, n: int) -> None:
        self.backend.seq_copy(self.seq_id, seq_id, n)
        self.users += 1
        self.hits += 1
        self.tokens_reused += n

    def store(self, seq_id: int, prompt: list[int]) -> int:
        """Keep this sequence's prompt (all but its last token) if that covers more than the cache
        does and nobody shares the current cells. Returns the cells now shared with ``seq_id``."""
        n = len(prompt) - 1
        if self.users or n < MIN_REUSE or self.match(prompt) >= n:
            return 0
        self.drop()
        self.backend.seq_copy(seq_id, self.seq_id, n)
        self.tokens = list(prompt[:n])
        self.users = 1
        return n

    def release(self) -> None:
        self.users -= 1

    def drop(self) -> bool:
        """Free the cached cells (to make room). Only possible while no sequence shares them."""
        if self.users or not self.tokens:
            return False
        self.backend.seq_remove(self.seq_id)
        self.tokens = []
        return True

    def forget(self) -> None:
        """The KV cache was rebuilt: the cells are gone."""
        self.tokens, self.users = [], 0
