"""A pure-Python backend with the same interface as ``LlamaBackend``, for scheduler tests.

Tokens are deterministic: each sampled token is the previous token of that sequence plus one, so a
test can predict every output. KV cells are tracked as llama.cpp does (a cell copied with
``seq_copy`` is shared until every sequence holding it lets go), and ``decode`` answers
``NO_KV_SLOT`` when the cells run out, or on the decode calls a test lists in ``fail_decodes``.
A ``FakeConstraint`` in the sampling params stands in for a compiled grammar: the sampler keeps its
choice when the grammar allows it and otherwise takes the next allowed letter, as a mask would.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from parallama.sequences.backend import BackendError, BatchPlan, DecodeOutcome, ModelFacts
from parallama.sequences.params import SamplingParams

EOS = 1
FIRST_TEXT_TOKEN = 2
VOCAB = 28  # EOS, a spare, and the letters a-z


def letter_token(char: str) -> int:
    return FIRST_TEXT_TOKEN + (ord(char) - ord("a")) % 26


@dataclass(frozen=True)
class FakeConstraint:
    """A grammar over the fake vocabulary: exactly ``length`` letters, each one of ``letters``, then EOS."""

    letters: str
    length: int

    def matcher(self) -> FakeConstraintState:
        return FakeConstraintState(self)


@dataclass
class FakeConstraintState:
    """One sequence's position in its FakeConstraint, like an llguidance matcher's."""

    grammar: FakeConstraint
    written: int = 0

    def allowed(self) -> list[int]:
        if self.written >= self.grammar.length:
            return [EOS]
        return sorted({letter_token(c) for c in self.grammar.letters})

    def accept(self, token: int) -> None:
        if token not in self.allowed():
            raise AssertionError(f"token {token} breaks the grammar at position {self.written}")
        self.written += 1


def next_allowed(preferred: int, allowed: list[int]) -> int:
    """What masking does to a greedy choice: keep it if allowed, else the next allowed letter after it."""
    if preferred in allowed:
        return preferred
    letters = [t for t in allowed if t >= FIRST_TEXT_TOKEN]
    if not letters:
        return allowed[0]
    later = [t for t in letters if t > preferred]
    return later[0] if later else letters[0]


@dataclass
class FakeSampler:
    backend: FakeBackend
    params: SamplingParams
    num_sampled: int = 0
    last_logprob: None = None
    constraint: FakeConstraintState | None = None

    def __post_init__(self) -> None:
        if self.params.constraint is not None:  # each sequence its own matcher, as with llguidance
            self.constraint = self.params.constraint.matcher()

    def sample(self, logits_index: int) -> int:
        seq_id = self.backend.logits_seq[logits_index]
        self.num_sampled += 1
        if self.backend.eos_after is not None and self.num_sampled > self.backend.eos_after:
            token = EOS
        else:
            last = self.backend.kv_tokens(seq_id)[-1]
            token = FIRST_TEXT_TOKEN + (last - FIRST_TEXT_TOKEN + 1) % 26
        if self.constraint is not None:
            token = next_allowed(token, self.constraint.allowed())
            self.constraint.accept(token)
        return token

    def close(self) -> None:
        self.backend.closed_samplers += 1


@dataclass
class FakeBackend:
    n_ctx: int = 256
    n_seq_max: int = 4
    n_batch: int = 32
    kv_unified: bool = True  # False: each seq_id has n_ctx // n_seq_max cells of its own, and copies copy
    eos_after: int | None = None  # sample EOS after this many tokens of a sequence
    fail_decodes: set[int] = field(default_factory=set)  # decode call numbers (1-based) that fail
    decode_calls: int = 0
    copies: int = 0  # seq_copy calls (with streams, each one moves data)
    closed_samplers: int = 0
    constraints: None = None  # nothing compiles grammars here: tests put a FakeConstraint in the params
    plans: list[BatchPlan] = field(default_factory=list)
    logits_seq: dict[int, int] = field(default_factory=dict)
    # Cells: each seq holds a list of cell ids; a cell is free when no seq holds it.
    _seq_cells: dict[int, list[int]] = field(default_factory=dict)
    _cell_tokens: dict[int, int] = field(default_factory=dict)
    _cell_refs: dict[int, int] = field(default_factory=dict)
    _next_cell: itertools.count = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        self._max_streams = self.n_seq_max
        self.facts = ModelFacts(
            name="fake", path="fake.gguf", n_vocab=VOCAB, n_ctx_train=4096, n_layer=1, n_head=1,
            weights_bytes=1 << 20, kv_bytes_per_token=1024, chat_template=None, bos_token="", eos_token="",
        )

    # --- tokens -------------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        return [letter_token(c) for c in text.lower() if c.isalpha()]

    def token_bytes(self, token: int) -> bytes:
        if token < FIRST_TEXT_TOKEN:
            return b""
        return chr(ord("a") + token - FIRST_TEXT_TOKEN).encode()

    def is_eog(self, token: int) -> bool:
        return token == EOS

    # --- decoding -----------------------------------------------------------------------------
    def decode(self, plan: BatchPlan) -> DecodeOutcome:
        self.decode_calls += 1
        self.plans.append(plan)
        if plan.num_tokens > self.n_batch:
            raise BackendError(f"batch of {plan.num_tokens} tokens exceeds n_batch={self.n_batch}")
        if self.decode_calls in self.fail_decodes or self._no_room(plan):
            return DecodeOutcome.NO_KV_SLOT
        self.logits_seq = {}
        for item, row in zip(plan.items, plan.logits_index):
            cells = self._seq_cells.setdefault(item.seq_id, [])
            if item.start_pos != len(cells):
                raise BackendError(f"seq {item.seq_id}: decode at {item.start_pos}, KV holds {len(cells)}")
            for token in item.token_ids:
                cells.append(self._new_cell(token))
            if item.wants_logits:
                self.logits_seq[row] = item.seq_id
        return DecodeOutcome.OK

    def new_sampler(self, params: SamplingParams) -> FakeSampler:
        return FakeSampler(self, params)

    def _no_room(self, plan: BatchPlan) -> bool:
        if self.kv_unified:
            return self.cells_used + plan.num_tokens > self.n_ctx
        return any(self._seq_len(i.seq_id) + len(i.token_ids) > self.n_ctx_seq for i in plan.items)

    # --- KV -----------------------------------------------------------------------------------
    @property
    def n_ctx_seq(self) -> int:
        return self.n_ctx if self.kv_unified else self.n_ctx // self.n_seq_max

    def _seq_len(self, seq_id: int) -> int:
        if not 0 <= seq_id < self.n_seq_max:
            raise BackendError(f"seq_id {seq_id} outside the context's {self.n_seq_max}")
        return len(self._seq_cells.get(seq_id, []))

    @property
    def cells_used(self) -> int:
        return len(self._cell_refs)

    def kv_tokens(self, seq_id: int) -> list[int]:
        return [self._cell_tokens[c] for c in self._seq_cells.get(seq_id, [])]

    def seq_remove(self, seq_id: int, from_pos: int = 0) -> None:
        cells = self._seq_cells.get(seq_id, [])
        for cell in cells[from_pos:]:
            self._release(cell)
        del cells[from_pos:]

    def seq_copy(self, src: int, dst: int, n_tokens: int) -> None:
        self.copies += 1
        copied = self._seq_cells[src][:n_tokens]
        if not self.kv_unified:  # another stream: new cells with the same contents
            self.seq_remove(dst)
            self._seq_cells[dst] = [self._new_cell(self._cell_tokens[c]) for c in copied]
            return
        for cell in copied:
            self._cell_refs[cell] += 1
        self._seq_cells[dst] = list(copied)

    def seq_save(self, seq_id: int) -> bytearray:
        return bytearray(self.kv_tokens(seq_id))

    def seq_restore(self, seq_id: int, data: bytearray) -> None:
        self.seq_remove(seq_id)
        room = self.n_ctx - self.cells_used if self.kv_unified else self.n_ctx_seq
        if len(data) > room:
            raise BackendError(f"seq {seq_id}: no room to restore {len(data)} cells")
        self._seq_cells[seq_id] = [self._new_cell(t) for t in data]

    def resize(self, n_ctx: int) -> None:
        if not self.kv_unified:  # streams keep their size; their number follows
            stream = self.n_ctx_seq
            self.n_seq_max = max(1, min(self._max_streams, n_ctx // stream))
            n_ctx = self.n_seq_max * stream
        self.n_ctx = n_ctx
        self._seq_cells.clear()
        self._cell_tokens.clear()
        self._cell_refs.clear()

    def close(self) -> None:
        pass

    def _new_cell(self, token: int) -> int:
        cell = next(self._next_cell)
        self._cell_tokens[cell] = token
        self._cell_refs[cell] = 1
        return cell

    def _release(self, cell: int) -> None:
        self._cell_refs[cell] -= 1
        if self._cell_refs[cell] == 0:
            del self._cell_refs[cell], self._cell_tokens[cell]
