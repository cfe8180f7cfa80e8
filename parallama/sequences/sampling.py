"""A llama.cpp sampler chain per sequence, built from its SamplingParams."""

from __future__ import annotations

import random

import llama_cpp

from parallama.sequences.params import SamplingParams


class LlamaSampler:
    """Owns one ``llama_sampler`` chain. ``llama_sampler_sample`` applies the chain to the logits of
    one batch row and accepts the token, so penalties and the RNG advance with the sequence."""

    __slots__ = ("_chain", "_ctx")

    def __init__(self, ctx_ref: list, n_vocab: int, params: SamplingParams) -> None:
        self._ctx = ctx_ref  # a one-item list holding the current context; it changes on a rebuild
        self._chain = _build_chain(n_vocab, params)

    def sample(self, logits_index: int) -> int:
        return llama_cpp.llama_sampler_sample(self._chain, self._ctx[0], logits_index)

    def close(self) -> None:
        if self._chain:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None


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
