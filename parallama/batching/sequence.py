"""The scheduler's view of one sequence: its tokens, where its KV stands, and its text output."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from typing import TYPE_CHECKING

from parallama.batching.events import Event, Usage
from parallama.sequences import Sampler, SamplingParams
from parallama.sequences.backend import TokenLogprob
from parallama.batching.detokenizer import IncrementalDetokenizer
from parallama.batching.stops import StopMatcher

if TYPE_CHECKING:
    from parallama.batching.prefix_cache import Node


class SeqStatus(enum.IntEnum):
    WAITING = enum.auto()  # queued, holds no seq_id (new, or preempted and waiting to resume)
    RUNNING = enum.auto()  # holds a seq_id; computes its prompt in chunks, then one token a step
    FINISHED = enum.auto()


class FinishReason(str, enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"
    ERROR = "error"


@dataclass(eq=False, slots=True)
class SharedPrefix:
    """First cells of a sequence that it shares: decoded once by a group's leader and copied
    (``seq_cp``) to the others, or copied from (or into) the prefix cache, which counts them."""

    length: int
    node: Node | None = None  # the prefix cache's node when the cells are shared with the cache


@dataclass(eq=False, slots=True)
class Request:
    """One client request: n sequences over the same prompt. Its events leave the scheduler keyed by
    ``request_id``; where they go is the engine's business."""

    request_id: str
    prompt: list[int]
    params: SamplingParams
    n: int
    sequences: list[Sequence] = field(default_factory=list)
    num_unfinished: int = 0
    error: str | None = None
    deadline: float | None = None  # time.monotonic() after which it ends with what it has
    cached_tokens: int = 0  # prompt tokens that came from the prefix cache instead of being computed
    # time.monotonic() stamps for the latency metrics (batching/latency.py)
    arrival: float = field(default_factory=time.monotonic)
    admitted_at: float | None = None  # took its first sequence
    first_token_at: float | None = None  # its first sequence sampled its first token

    def usage(self) -> Usage:
        completion = sum(len(s.output) for s in self.sequences)
        return Usage(prompt_tokens=len(self.prompt), completion_tokens=completion, cached_tokens=self.cached_tokens)


@dataclass(eq=False, slots=True)
class Sequence:
    request: Request
    index: int
    sampler: Sampler | None = None
    detokenizer: IncrementalDetokenizer | None = None
    stops: StopMatcher | None = None
    output: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    seq_id: int | None = None
    num_computed: int = 0  # tokens of prompt + output already in this sequence's KV cells
    prefix: SharedPrefix | None = None  # set while its first cells are shared with its group
    copy_from: Sequence | None = None  # a group member waiting for the leader's prompt cells
    followers: list[Sequence] = field(default_factory=list)  # members waiting on this leader
    admitted: int = -1  # admission order; the newest is preempted first
    last_logprob: TokenLogprob | None = None  # of the last token in ``output``, when asked for
    parked: bytearray | None = None  # KV state saved in host memory while preempted (llama_state_seq_*)
    parked_tokens: int = 0
    finish_reason: FinishReason | None = None
    first_token_at: float | None = None  # time.monotonic() of its first sample (latency metrics)
    ended_by_eog: bool = False  # its last sample was end-of-generation, which ``output`` leaves out

    @property
    def prompt(self) -> list[int]:
        return self.request.prompt

    @property
    def num_tokens(self) -> int:
        return len(self.request.prompt) + len(self.output)

    @property
    def num_pending(self) -> int:
        """Tokens not yet in KV: a prompt still to prefill, or the one token sampled last step."""
        return self.num_tokens - self.num_computed

    @property
    def is_generating(self) -> bool:
        return bool(self.output) and self.num_pending == 1

    def tokens(self, start: int, stop: int) -> list[int]:
        n_prompt = len(self.request.prompt)
        if stop <= n_prompt:
            return self.request.prompt[start:stop]
        return (self.request.prompt + self.output)[start:stop]

    def own_cells(self) -> int:
        return self.num_computed - (self.prefix.length if self.prefix else 0)

    def text_event(self, token: int, delta: str) -> Event:
        return Event(index=self.index, text=delta, token_ids=[token], logprobs=self._logprobs())

    def final_event(self, text: str, token_ids: list[int]) -> Event:
        reason = self.finish_reason.value if self.finish_reason else None
        logprobs = self._logprobs() if token_ids and token_ids[-1:] == self.output[-1:] else None
        return Event(index=self.index, text=text, token_ids=token_ids, finish_reason=reason, logprobs=logprobs)

    def _logprobs(self) -> list[TokenLogprob] | None:
        return [self.last_logprob] if self.last_logprob is not None else None
