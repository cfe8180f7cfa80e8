"""The interface between the scheduler and a model: batch plans in, samples and KV operations out.

``LlamaBackend`` implements it on llama.cpp, ``FakeBackend`` in pure Python for scheduler tests.
The plan types live here, below ``batching/``, so a backend never imports the scheduler.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from parallama.sequences.params import SamplingParams

if TYPE_CHECKING:
    from parallama.sequences.constraint import ConstraintCompiler


@dataclass(frozen=True, slots=True)
class BatchItem:
    """Tokens of one sequence in one decode: a prompt chunk, or the single last sampled token."""

    seq_id: int
    start_pos: int
    token_ids: list[int]
    wants_logits: bool


@dataclass(slots=True)
class BatchPlan:
    """What one ``llama_decode`` carries. ``logits_index[i]`` is the batch row of item i's last token."""

    items: list[BatchItem] = field(default_factory=list)
    num_tokens: int = 0
    logits_index: list[int] = field(default_factory=list)

    def add(self, item: BatchItem) -> None:
        self.num_tokens += len(item.token_ids)
        self.items.append(item)
        self.logits_index.append(self.num_tokens - 1)


class DecodeOutcome(enum.Enum):
    OK = "ok"
    NO_KV_SLOT = "no_kv_slot"  # llama_decode returned 1: the KV cache has no room for this batch


class BackendError(RuntimeError):
    """llama_decode failed for a reason other than a full KV cache."""


@dataclass(frozen=True, slots=True)
class ModelFacts:
    """What sizing needs to know about the loaded model."""

    name: str
    path: str
    n_vocab: int
    n_ctx_train: int
    n_layer: int
    n_head: int  # attention heads (the KQ matrix's size without flash attention)
    weights_bytes: int
    kv_bytes_per_token: int  # K and V of one token across all layers, at the chosen cache types
    chat_template: str | None
    bos_token: str
    eos_token: str


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """The sampled token's log-probability under the model, and the most likely tokens at that step."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


class Sampler(Protocol):
    """A per-sequence sampler chain. It keeps its own RNG and penalty history across steps.
    ``last_logprob`` describes the last sample when the params asked for logprobs (else None)."""

    last_logprob: TokenLogprob | None

    def sample(self, logits_index: int) -> int: ...

    def close(self) -> None: ...


class Backend(Protocol):
    facts: ModelFacts
    constraints: ConstraintCompiler | None  # compiles grammars for this model; None: not supported
    n_ctx: int  # KV cells of all sequences together
    n_seq_max: int
    kv_unified: bool  # one pool for all (seq_copy shares cells) or a stream per seq_id (seq_copy copies)
    n_ctx_seq: int  # the most cells one sequence may hold: n_ctx when unified, its stream's size otherwise
    n_batch: int
    decode_calls: int

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]: ...

    def token_bytes(self, token: int) -> bytes: ...

    def is_eog(self, token: int) -> bool: ...

    def decode(self, plan: BatchPlan) -> DecodeOutcome: ...

    def new_sampler(self, params: SamplingParams) -> Sampler: ...

    def seq_remove(self, seq_id: int, from_pos: int = 0) -> None: ...

    def seq_copy(self, src: int, dst: int, n_tokens: int) -> None: ...

    def seq_save(self, seq_id: int) -> bytearray: ...  # written in place by llama.cpp: no copy

    def seq_restore(self, seq_id: int, data: bytearray) -> None: ...

    def resize(self, n_ctx: int) -> None:
        """Rebuild the KV cache with ``n_ctx`` cells. Every sequence's cells are dropped. With a stream per
        seq_id, streams keep their size and ``n_seq_max`` follows (at most its start-up value)."""
        ...

    def close(self) -> None: ...
