"""How the llama context is built. Field names are llama.cpp's own, so users recognise them."""

from __future__ import annotations

from dataclasses import dataclass

# Bytes per element of the KV cache types a user may choose (ggml block size / elements per block).
CACHE_TYPES: dict[str, tuple[int, float]] = {
    # name: (ggml type id, bytes per element)
    "f32": (0, 4.0),
    "f16": (1, 2.0),
    "bf16": (30, 2.0),
    "q8_0": (8, 34 / 32),
    "q5_1": (7, 24 / 32),
    "q5_0": (6, 22 / 32),
    "q4_1": (3, 20 / 32),
    "q4_0": (2, 18 / 32),
    "iq4_nl": (20, 18 / 32),
}


LLAMA_MAX_SEQ = 256  # llama.cpp refuses a context with more seq_ids


@dataclass(frozen=True, slots=True)
class ContextConfig:
    n_ctx: int  # KV cells of all sequences together
    n_seq_max: int  # llama seq_ids: the running slots and the prefix cache's ids (memory.sizing.SeqLayout)
    # False (llama-server's default): every seq_id has a stream of n_ctx / n_seq_max cells of its own, and a
    # token attends only to its own stream. True: one pool of n_ctx cells for all, which lets the prefix cache
    # share cells between sequences, but every token attends to every used cell of the pool.
    kv_unified: bool = False
    n_batch: int = 512  # most tokens one llama_decode carries
    n_ubatch: int = 512
    n_threads: int = 2
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"

    def __post_init__(self) -> None:
        for name in (self.cache_type_k, self.cache_type_v):
            if name not in CACHE_TYPES:
                raise ValueError(f"unknown cache type {name!r}; choose from {', '.join(CACHE_TYPES)}")
        if not 1 <= self.n_seq_max <= min(LLAMA_MAX_SEQ, self.n_batch):
            # llama.cpp aborts the process otherwise: it reserves one output row per seq_id within n_batch
            raise ValueError(f"n_seq_max={self.n_seq_max} must be between 1 and min({LLAMA_MAX_SEQ}, "
                             f"n_batch={self.n_batch})")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    path: str
    n_gpu_layers: int = 0  # -1: every layer
    use_extra_bufts: bool = False  # llama.cpp's weight repacking (AMX and others); see model.py
