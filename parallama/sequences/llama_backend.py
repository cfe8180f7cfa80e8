"""The Backend on llama.cpp: one context, one KV cache (a stream per seq_id, or one unified pool), many seq_ids."""

from __future__ import annotations

import ctypes
import dataclasses
import logging

import llama_cpp

from parallama.sequences.backend import BackendError, BatchPlan, DecodeOutcome, ModelFacts
from parallama.sequences.config import CACHE_TYPES, ContextConfig
from parallama.sequences.model import LlamaModel, ModelLoadError
from parallama.sequences.params import SamplingParams
from parallama.sequences.sampling import LlamaSampler

log = logging.getLogger(__name__)
FLASH_ATTN_TYPE = {None: -1, False: 0, True: 1}  # llama_flash_attn_type: auto, disabled, enabled


def context_params(config: ContextConfig) -> llama_cpp.llama_context_params:
    """llama.cpp's context parameters for a ContextConfig (the benchmark's raw loop uses them too)."""
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = config.n_ctx
    params.n_seq_max = config.n_seq_max
    params.n_batch = config.n_batch
    params.n_ubatch = min(config.n_ubatch, config.n_batch)
    params.n_threads = params.n_threads_batch = config.n_threads
    params.type_k = CACHE_TYPES[config.cache_type_k][0]
    params.type_v = CACHE_TYPES[config.cache_type_v][0]
    params.kv_unified = config.kv_unified
    params.flash_attn_type = FLASH_ATTN_TYPE[config.flash_attn]
    params.no_perf = True
    return params


class LlamaBackend:
    def __init__(self, model: LlamaModel, config: ContextConfig) -> None:
        self.model = model
        self.config = config
        self.facts: ModelFacts = model.facts(config.cache_type_k, config.cache_type_v)
        self.constraints = model.constraints
        self.decode_calls = 0
        self._ctx_ref: list = [None]  # shared with samplers, so a rebuilt context reaches them
        self._max_streams = config.n_seq_max
        self._open(config)

    # --- context lifecycle --------------------------------------------------------------------
    def _open(self, config: ContextConfig) -> None:
        ctx = llama_cpp.llama_init_from_model(self.model.ptr, context_params(config))
        if not ctx:
            raise ModelLoadError(f"llama.cpp could not create a context of {config.n_ctx} cells")
        self.config = config
        self.ctx = self._ctx_ref[0] = ctx
        self.memory = llama_cpp.llama_get_memory(ctx)
        self.n_ctx = llama_cpp.llama_n_ctx(ctx)
        self.n_seq_max = config.n_seq_max
        self.kv_unified = config.kv_unified
        self.n_ctx_seq = llama_cpp.llama_n_ctx_seq(ctx)  # cells one sequence may hold
        self.n_batch = config.n_batch
        self._batch = llama_cpp.llama_batch_init(config.n_batch, 0, 1)

    def resize(self, n_ctx: int) -> None:
        """Replace the context (and its KV cache) with one of ``n_ctx`` cells; the model stays loaded.
        Every sequence's cells are lost: the caller parks what it wants to keep first. With a stream per
        sequence, each stream keeps its size and the number of streams (n_seq_max) follows ``n_ctx``, never
        above the start-up count: a sequence is never cut shorter than it was promised."""
        config = dataclasses.replace(self.config, n_ctx=n_ctx)
        if not self.config.kv_unified:
            streams = max(1, min(self._max_streams, n_ctx // self.n_ctx_seq))
            config = dataclasses.replace(config, n_ctx=streams * self.n_ctx_seq, n_seq_max=streams)
        self._close_context()
        self._open(config)

    def _close_context(self) -> None:
        if self.ctx:
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self.ctx)
            self.ctx = self._ctx_ref[0] = None

    def close(self) -> None:
        self._close_context()

    # --- tokens -------------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        return self.model.tokenize(text, add_special, parse_special)

    def token_bytes(self, token: int) -> bytes:
        return self.model.token_bytes(token)

    def is_eog(self, token: int) -> bool:
        return self.model.is_eog(token)

    # --- decoding -----------------------------------------------------------------------------
    def decode(self, plan: BatchPlan) -> DecodeOutcome:
        self.decode_calls += 1
        self._fill(plan)
        rc = llama_cpp.llama_decode(self.ctx, self._batch)
        if rc == 0:
            return DecodeOutcome.OK
        if rc == 1:
            return DecodeOutcome.NO_KV_SLOT
        raise BackendError(f"llama_decode returned {rc}")

    def _fill(self, plan: BatchPlan) -> None:
        batch = self._batch
        token, pos, n_seq, seq, logits = batch.token, batch.pos, batch.n_seq_id, batch.seq_id, batch.logits
        i = 0
        for item in plan.items:
            p = item.start_pos
            for t in item.token_ids:
                token[i], pos[i], n_seq[i], logits[i] = t, p, 1, 0
                seq[i][0] = item.seq_id
                i += 1
                p += 1
            if item.wants_logits:
                logits[i - 1] = 1
        batch.n_tokens = i

    def new_sampler(self, params: SamplingParams) -> LlamaSampler:
        return LlamaSampler(self._ctx_ref, self.model.n_vocab, params)

    # --- KV cells -----------------------------------------------------------------------------
    def seq_remove(self, seq_id: int, from_pos: int = 0) -> None:
        llama_cpp.llama_memory_seq_rm(self.memory, seq_id, from_pos, -1)

    def seq_copy(self, src: int, dst: int, n_tokens: int) -> None:
        if self.kv_unified:  # the cells get a second owner: no data moves
            llama_cpp.llama_memory_seq_cp(self.memory, src, dst, 0, n_tokens)
            return
        # Across streams llama.cpp copies whole streams only (at the next decode, before the batch's own
        # writes); the tail past n_tokens is dropped at once.
        llama_cpp.llama_memory_seq_cp(self.memory, src, dst, -1, -1)
        llama_cpp.llama_memory_seq_rm(self.memory, dst, n_tokens, -1)

    def seq_save(self, seq_id: int) -> bytearray:
        # llama.cpp writes straight into the bytearray: one allocation and no copy. (A ctypes array plus
        # string_at paid for two fresh allocations and a copy: 180 ms for 2,000 cells here, now 27 ms.)
        size = llama_cpp.llama_state_seq_get_size(self.ctx, seq_id)
        data = bytearray(size)
        n = llama_cpp.llama_state_seq_get_data(self.ctx, (ctypes.c_uint8 * size).from_buffer(data), size, seq_id)
        del data[n:]
        return data

    def seq_restore(self, seq_id: int, data: bytearray) -> None:
        buf = (ctypes.c_uint8 * len(data)).from_buffer(data)  # read in place (a copy cost 160 ms at 2,000 cells)
        if llama_cpp.llama_state_seq_set_data(self.ctx, buf, len(data), seq_id) == 0:
            raise BackendError(f"seq {seq_id}: no room to restore {len(data)} bytes of state")
