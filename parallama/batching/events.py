"""What the engine sends back to the edge, one list of events per scheduler step."""

from __future__ import annotations

from dataclasses import dataclass, field

from parallama.sequences.backend import TokenLogprob


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # of the prompt tokens, those copied from the prefix cache

    def __add__(self, other: Usage) -> Usage:
        """Usage of several requests together (a completions call with a list of prompts)."""
        return Usage(self.prompt_tokens + other.prompt_tokens, self.completion_tokens + other.completion_tokens,
                     self.cached_tokens + other.cached_tokens)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(slots=True)
class Event:
    """A text delta of choice ``index``. The last event of a choice has its finish_reason; the last
    event of a request also carries ``usage`` (and ``error`` when the engine failed it)."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage | None = None
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None  # one per token in token_ids, when the request asked
