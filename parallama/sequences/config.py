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
PLAIN_CACHE_TYPES = ("f32", "f16", "bf16")  # V cache types that work without flash attention


def use_flash_attn(choice: str, cpu_only: bool, kv_unified: bool, cache_type_v: str) -> bool:
    """'on' and 'off' as asked; 'auto' is off when every layer runs on the CPU with a KV stream per
    sequence and a plain V cache, on otherwise. llama.cpp's own auto turns it on everywhere, but its CPU
    kernel makes each decoded token slower as the context grows: 8 sequences at 900 tokens decode in
    142 ms a step with it and 76 ms without (SmolLM2, 2 threads; llama.cpp issue 27086 measures the same
    on Arm). Without it the KQ matrix is materialised (sizing counts it); with one unified pool it spans
    every cell of the pool, so auto keeps flash attention there."""
    if choice != "auto":
        return choice == "on"
    return not (cpu_only and not kv_unified and cache_type_v in PLAIN_CACHE_TYPES)


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
    flash_attn: bool | None = None  # None: llama.cpp decides (on where the backend supports it)

    def __post_init__(self) -> None:
        for name in (self.cache_type_k, self.cache_type_v):
            if name not in CACHE_TYPES:
                raise ValueError(f"unknown cache type {name!r}; choose from {', '.join(CACHE_TYPES)}")
        if self.flash_attn is False and self.cache_type_v not in PLAIN_CACHE_TYPES:
            raise ValueError(f"a {self.cache_type_v} V cache needs flash attention: use --flash-attn on (or auto) "
                             f"or --cache-type-v f16")
        if not 1 <= self.n_seq_max <= min(LLAMA_MAX_SEQ, self.n_batch):
            # llama.cpp aborts the process otherwise: it reserves one output row per seq_id within n_batch
            raise ValueError(f"n_seq_max={self.n_seq_max} must be between 1 and min({LLAMA_MAX_SEQ}, "
                             f"n_batch={self.n_batch})")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    path: str
    n_gpu_layers: int = 0  # -1: every layer
    use_extra_bufts: bool = False  # llama.cpp's weight repacking (AMX and others); see model.py
