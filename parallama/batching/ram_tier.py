"""The prefix cache's host-RAM tier: KV of evicted entries, saved with ``llama_state_seq_get_data``.

A conversation that went quiet loses its cells to busier ones; when it comes back, restoring its saved
KV is a memory copy where recomputing it is a prefill. Bounded by ``--cache-ram``; least recently used
out first; emptied first when memory runs short (``clear``), before anything running is touched.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from parallama.batching.token_prefix import common_prefix
from parallama.sequences import Backend
from parallama.sequences.backend import BackendError

MIN_SAVED_TAIL = 64  # tokens a saved copy must hold beyond what stays in the cells, to be worth its RAM


@dataclass(eq=False, slots=True)
class RamEntry:
    tokens: list[int]  # what the saved cells hold, from position 0
    data: bytearray  # what Backend.seq_save returned
    last_used: int = 0


@dataclass(slots=True)
class RamTier:
    budget_bytes: int
    entries: list[RamEntry] = field(default_factory=list)
    num_bytes: int = 0
    _clock: itertools.count = field(default_factory=lambda: itertools.count(1))

    def put(self, tokens: list[int], data: bytearray) -> bool:
        """Keep a copy if it fits the budget (evicting older copies); a shorter copy of the same
        conversation (a prefix of this one) is dropped: this one serves it too."""
        if len(data) > self.budget_bytes:
            return False
        for old in [e for e in self.entries if tokens[:len(e.tokens)] == e.tokens]:
            self._remove(old)
        while self.num_bytes + len(data) > self.budget_bytes:
            self._remove(min(self.entries, key=lambda e: e.last_used))
        self.entries.append(RamEntry(tokens, data, next(self._clock)))
        self.num_bytes += len(data)
        return True

    def match(self, prompt: list[int], limit: int) -> tuple[RamEntry | None, int]:
        """The entry sharing the longest prefix with ``prompt[:limit]``."""
        best, best_len = None, 0
        for entry in self.entries:
            k = common_prefix(entry.tokens, prompt, 0, limit)
            if k > best_len:
                best, best_len = entry, k
        return best, best_len

    def restore(self, backend: Backend, seq_id: int, entry: RamEntry, tokens: int) -> None:
        """Copy ``entry`` into ``seq_id``'s cells, keeping its first ``tokens`` (the match). The entry leaves the
        tier when the match takes (nearly) all of it, as its sequence carries it on; matched in part, it
        stays, since the rest is still some conversation's. Raises BackendError, with ``seq_id`` left empty,
        when the cells have no room for it."""
        if len(entry.tokens) - tokens < MIN_SAVED_TAIL:
            self._remove(entry)
        else:
            entry.last_used = next(self._clock)
        try:
            backend.seq_restore(seq_id, entry.data)
        except BackendError:
            backend.seq_remove(seq_id)
            raise
        backend.seq_remove(seq_id, tokens)

    def clear(self) -> int:
        """Give all the memory back; returns the bytes freed."""
        freed = self.num_bytes
        self.entries.clear()
        self.num_bytes = 0
        return freed

    def stats(self) -> tuple[int, int, int]:
        return len(self.entries), self.num_bytes, self.budget_bytes

    def _remove(self, entry: RamEntry) -> None:
        self.entries.remove(entry)
        self.num_bytes -= len(entry.data)
