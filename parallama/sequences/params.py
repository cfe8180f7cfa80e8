"""Sampling parameters of one sequence."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from parallama.sequences.constraint import Constraint

MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """What a request asks of the sampler; the backend turns it into a sampler chain.

    temperature 0 means greedy. top_k 0, top_p 1 and min_p 0 switch those filters off.
    Penalties apply to the tokens this sequence generated (as OpenAI defines them), not to its prompt.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_last_n: int = 64
    logit_bias: tuple[tuple[int, float], ...] = ()
    stop: tuple[str, ...] = ()
    max_tokens: int = 256
    constraint: Constraint | None = None  # a compiled grammar the output must follow
    logprobs: int | None = None  # None: none; k: the sampled token's logprob and the k most likely
    @property
    def is_greedy(self) -> bool:
        return self.temperature <= 0.0

    @property
    def has_penalties(self) -> bool:
        return self.repeat_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
