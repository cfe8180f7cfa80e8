"""The prefix cache: KV that finished (and finishing) sequences leave behind, found by token prefix.

Every chat client and agent loop resends its whole conversation each turn, and fan-out requests share
a long system prompt. A sequence's KV is kept when its prompt is in and again when it finishes, as an
entry: a reserved seq_id (``SeqLayout.cache_seq_ids``) holding cells ``[0, n)``. A new request takes the
longest cached prefix with ``seq_cp`` (no compute) and prefills only the rest.

Entries form a tree over *physical* cell runs (``Node``): a node is a run of positions whose cells are
shared by everything below it, because everything below was copied from it. That makes the count
exact: the cache holds the sum of its nodes' lengths, each cell once, whoever shares it. Two rules keep
the tree and llama.cpp's cells in step:

- every node has an entry (a seq_id holding ``[0, end)``) at itself or below, so a hit can copy from it;
- a node a running sequence copied (``pins``) is never evicted; evicting a leaf frees exactly its cells.

Least recently used leaves go first, when admission or a full KV cache needs cells, or when a new entry
needs a seq_id. With a host-RAM tier (``RamTier``), an evicted entry's KV is saved there first, and a
request whose prompt matches it much further than the cells do gets it restored.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from parallama.batching.ram_tier import RamEntry, RamTier
from parallama.batching.stats import CacheStats
from parallama.batching.token_prefix import common_prefix
from parallama.sequences import Backend

MIN_REUSE = 16  # shorter matches are not worth a copy
RAM_MIN_GAIN = 64  # restoring from RAM must save at least this many tokens of prefill over the KV match


@dataclass(eq=False, slots=True)
class Node:
    """A run of cells at positions ``[start, end)``, shared by every entry below it."""

    parent: Node | None
    start: int
    tokens: list[int]
    children: list[Node] = field(default_factory=list)
    seq_id: int | None = None  # set when this node is an entry: that seq_id holds [0, end)
    pins: int = 0  # running sequences whose copied prefix ends here
    last_used: int = 0

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)

    def path_tokens(self) -> list[int]:
        parts, node = [], self
        while node is not None:
            parts.append(node.tokens)
            node = node.parent
        return [t for part in reversed(parts) for t in part]


@dataclass(frozen=True, slots=True)
class Hit:
    """Where a new sequence's prefix comes from: ``tokens`` cells of ``node`` (KV), or a RAM entry."""

    tokens: int
    node: Node | None = None
    ram: RamEntry | None = None


class PrefixCache:
    def __init__(self, backend: Backend, seq_ids: range, ram: RamTier | None = None) -> None:
        self.backend = backend
        self.ram = ram
        self.root = Node(None, 0, [])
        self.free_ids = list(reversed(seq_ids))
        self.entries: dict[int, Node] = {}  # seq_id -> the node it holds up to
        self.num_cells = 0
        self.hits = self.misses = self.tokens_reused = self.evictions = 0
        self.tokens_queried = 0  # counted by the scheduler when a sequence starts (lookups may repeat)
        self._clock = itertools.count(1)

    # --- lookup --------------------------------------------------------------------------------
    def lookup(self, prompt: list[int], room: int) -> Hit | None:
        """The best source for ``prompt``'s first tokens, leaving its last token to compute (its logits
        give the first sample). ``room``: free cells, which a RAM restore needs for its whole entry."""
        node, n = self._match(prompt, len(prompt) - 1)
        n = n if n >= MIN_REUSE else 0
        if self.ram is not None:
            entry, m = self.ram.match(prompt, len(prompt) - 1)
            if entry is not None and m >= max(MIN_REUSE, n + RAM_MIN_GAIN) and len(entry.tokens) <= room:
                return Hit(m, ram=entry)
        # A miss is counted by the scheduler when the sequence starts: a request waiting at the head of the
        # queue is looked up again every step, and each of those looks is not a miss.
        return Hit(n, node=node) if n else None

    def attach(self, seq_id: int, hit: Hit) -> Node | None:
        """Put the hit's cells under ``seq_id``. Returns the node the sequence now shares (pinned until
        ``release``), or None when its cells are its own (restored from RAM)."""
        self.hits += 1
        self.tokens_reused += hit.tokens
        if hit.ram is not None:
            self.ram.restore(self.backend, seq_id, hit.ram, hit.tokens)
            return None
        node = hit.node
        if hit.tokens < node.end:
            node = self._split(node, hit.tokens)
        node.pins += 1
        self._touch(node)
        self.backend.seq_copy(self._holder(node), seq_id, hit.tokens)
        return node

    # --- keeping KV ----------------------------------------------------------------------------
    def insert(self, seq_id: int, tokens: list[int], shared: Node | None) -> Node | None:
        """Keep the KV of a sequence (``tokens``, all in its cells) as an entry. ``shared`` is the node it
        copied its first cells from. Returns the node the sequence now shares: the new entry, or
        ``shared`` when nothing was kept (too short, already cached, or no seq_id free)."""
        base = shared.end if shared is not None else 0
        if len(tokens) < MIN_REUSE or len(tokens) <= base or self._match(tokens, len(tokens))[1] == len(tokens):
            return shared
        entry_id = self._free_id()
        if entry_id is None:
            return shared
        self.backend.seq_copy(seq_id, entry_id, len(tokens))
        parent = shared or self.root
        node = Node(parent, base, tokens[base:], seq_id=entry_id, pins=1, last_used=next(self._clock))
        parent.children.append(node)
        self.entries[entry_id] = node
        self.num_cells += len(node.tokens)
        if shared is not None:
            shared.pins -= 1
            self._drop_entry_id(shared)  # its cells are held by the new entry now
        return node

    def release(self, node: Node) -> None:
        """A running sequence no longer shares ``node``'s cells."""
        node.pins -= 1

    # --- giving cells back ---------------------------------------------------------------------
    def evict(self, cells: int, keep: Node | None = None) -> int:
        """Free at least ``cells`` cells if unpinned entries hold that many, least recently used first,
        never ``keep``'s cells (a hit about to be taken); returns the cells freed."""
        freed = 0
        if keep is not None:
            keep.pins += 1
        try:
            while freed < cells:
                got = self._evict_one()
                if got is None:
                    break
                freed += got
        finally:
            if keep is not None:
                keep.pins -= 1
        return freed

    def forget(self) -> None:
        """The context was rebuilt: every cell is gone (the RAM tier keeps its copies)."""
        self.free_ids.extend(self.entries)
        self.free_ids.sort(reverse=True)
        self.entries.clear()
        self.root.children.clear()
        self.num_cells = 0

    def pinned_cells(self) -> int:
        """Cells running sequences share with the cache: their pinned nodes and every node above them
        (none of which can be evicted while they run). A walk of the tree, for snapshots only."""
        stack, pinned, seen, total = [self.root], [], set(), 0
        while stack:
            node = stack.pop()
            stack.extend(node.children)
            if node.pins > 0:
                pinned.append(node)
        for node in pinned:
            while node is not None and id(node) not in seen:
                seen.add(id(node))
                total += len(node.tokens)
                node = node.parent
        return total

    def stats(self) -> CacheStats:
        ram = self.ram.stats() if self.ram is not None else (0, 0, 0)
        return CacheStats(entries=len(self.entries), cells=self.num_cells, hits=self.hits, misses=self.misses,
                          pinned_cells=self.pinned_cells(), tokens_queried=self.tokens_queried,
                          tokens_reused=self.tokens_reused,
                          evictions=self.evictions, ram_entries=ram[0], ram_bytes=ram[1], ram_budget_bytes=ram[2])

    # --- the tree ------------------------------------------------------------------------------
    def _match(self, tokens: list[int], limit: int) -> tuple[Node, int]:
        """The node holding the longest cached prefix of ``tokens[:limit]``, and its length."""
        node, n = self.root, 0
        while n < limit:
            best, best_len = None, 0
            for child in node.children:
                k = common_prefix(child.tokens, tokens, n, limit)
                if k > best_len:
                    best, best_len = child, k
            if best is None:
                break
            n += best_len
            node = best
            if best_len < len(best.tokens):
                break
        return node, n

    def _split(self, node: Node, at: int) -> Node:
        """Cut ``node`` at position ``at``; returns the upper part. Cells do not move; the entry and
        the pins stay with the lower part, whose end is unchanged."""
        cut = at - node.start
        upper = Node(node.parent, node.start, node.tokens[:cut], children=[node], last_used=node.last_used)
        siblings = node.parent.children
        siblings[siblings.index(node)] = upper
        node.parent, node.start, node.tokens = upper, at, node.tokens[cut:]
        return upper

    def _holder(self, node: Node) -> int:
        while node.seq_id is None:  # every node has an entry at or below it
            node = node.children[0]
        return node.seq_id

    def _touch(self, node: Node) -> None:
        tick = next(self._clock)
        while node is not None:
            node.last_used = tick
            node = node.children[0] if node.children and node.seq_id is None else None

    def _free_id(self) -> int | None:
        """A seq_id for a new entry, evicting least recently used entries until one is free."""
        while not self.free_ids:
            if self._evict_one() is None:
                return None
        return self.free_ids.pop()

    def _drop_entry_id(self, node: Node) -> None:
        """``node`` has an entry below it now: its own seq_id is redundant, give it back."""
        if node.seq_id is not None and node.children:
            self.backend.seq_remove(node.seq_id)
            del self.entries[node.seq_id]
            self.free_ids.append(node.seq_id)
            node.seq_id = None

    def _evict_one(self) -> int | None:
        """Evict the least recently used unpinned leaf; returns the cells freed, or None if none can go."""
        leaves = [n for n in self.entries.values() if not n.children and not n.pins]
        if not leaves:
            return None
        leaf = min(leaves, key=lambda n: n.last_used)
        seq_id = leaf.seq_id
        if self.ram is not None:
            self.ram.put(leaf.path_tokens(), self.backend.seq_save(seq_id))
        del self.entries[seq_id]
        self.evictions += 1
        freed, node = 0, leaf
        while True:  # remove the leaf, and the ancestors only it held
            parent = node.parent
            parent.children.remove(node)
            freed += len(node.tokens)
            if parent is self.root or parent.seq_id is not None or parent.children:
                break
            if parent.pins:  # still copied by a running sequence: this seq_id goes on holding it
                self.backend.seq_remove(seq_id, parent.end)
                parent.seq_id = seq_id
                self.entries[seq_id] = parent
                self.num_cells -= freed
                return freed
            node = parent
        self.backend.seq_remove(seq_id)
        self.free_ids.append(seq_id)
        self.num_cells -= freed
        return freed
