"""A llama.cpp sampler chain per sequence, built from its SamplingParams, with its constraint and logprobs."""

from __future__ import annotations

import ctypes
import random

import llama_cpp
import numpy as np

from parallama.sequences.backend import TokenLogprob
from parallama.sequences.constraint import ConstraintState
from parallama.sequences.params import SamplingParams


class LlamaSampler:
    """Owns one ``llama_sampler`` chain. ``llama_sampler_sample`` applies the chain to the logits of
    one batch row and accepts the token, so penalties and the RNG advance with the sequence.

    A constrained sequence first has its row masked in place (tokens its grammar does not allow get
    -inf), so every sampler in the chain sees only allowed tokens; the grammar then advances with the
    token the chain picked. Logprobs are read from the row before the mask and the chain: the model's
    own distribution (as vLLM reports them by default)."""

    __slots__ = ("_chain", "_ctx", "_n_vocab", "_constraint", "_logprobs", "last_logprob")

    def __init__(self, ctx_ref: list, n_vocab: int, params: SamplingParams) -> None:
        self._ctx = ctx_ref  # a one-item list holding the current context; it changes on a rebuild
        self._n_vocab = n_vocab
        self._chain = _build_chain(n_vocab, params)
        self._constraint: ConstraintState | None = params.constraint.matcher() if params.constraint else None
        self._logprobs = params.logprobs
        self.last_logprob: TokenLogprob | None = None

    def sample(self, logits_index: int) -> int:
        row = self._row(logits_index) if self._constraint is not None or self._logprobs is not None else None
        logprobs = _log_softmax(row) if self._logprobs is not None else None
        if self._constraint is not None:
            self._constraint.mask_logits(row)
        token = llama_cpp.llama_sampler_sample(self._chain, self._ctx[0], logits_index)
        if self._constraint is not None:
            self._constraint.accept(token)
        if logprobs is not None:
            self.last_logprob = _describe(logprobs, token, self._logprobs)
        return token

    def _row(self, logits_index: int) -> np.ndarray:
        pointer = llama_cpp.llama_get_logits_ith(self._ctx[0], logits_index)
        return np.ctypeslib.as_array(ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), shape=(self._n_vocab,))

    def close(self) -> None:
        if self._chain:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None


def _log_softmax(row: np.ndarray) -> np.ndarray:
    shifted = row - row.max()
    return shifted - np.log(np.exp(shifted).sum())


def _describe(logprobs: np.ndarray, token: int, k: int) -> TokenLogprob:
    top: tuple[tuple[int, float], ...] = ()
    if k > 0:
        best = np.argpartition(logprobs, -k)[-k:]
        best = best[np.argsort(logprobs[best])[::-1]]
        top = tuple((int(t), float(logprobs[t])) for t in best)
    return TokenLogprob(token, float(logprobs[token]), top)


def _build_chain(n_vocab: int, p: SamplingParams):
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    add = lambda s: llama_cpp.llama_sampler_chain_add(chain, s)  # noqa: E731 - the chain owns each sampler
    if p.logit_bias:
        biases = (llama_cpp.llama_logit_bias * len(p.logit_bias))(*p.logit_bias)
        add(llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(p.logit_bias), biases))
    if p.has_penalties:
        add(llama_cpp.llama_sampler_init_penalties(  # this binding takes n_vocab first
            n_vocab, p.penalty_last_n, p.repeat_penalty, p.frequency_penalty, p.presence_penalty))
    if p.is_greedy:
        add(llama_cpp.llama_sampler_init_greedy())
        return chain
    if p.top_k > 0:
        add(llama_cpp.llama_sampler_init_top_k(p.top_k))
    if p.top_p < 1.0:
        add(llama_cpp.llama_sampler_init_top_p(p.top_p, 1))
    if p.min_p > 0.0:
        add(llama_cpp.llama_sampler_init_min_p(p.min_p, 1))
    add(llama_cpp.llama_sampler_init_temp(p.temperature))
    seed = p.seed if p.seed is not None else random.getrandbits(32)
    add(llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))
    return chain
