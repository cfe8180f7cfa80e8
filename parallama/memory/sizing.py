"""Start-up sizing: how many sequences run at once and how many KV cells they share, from free memory.

Pure functions of a ``SizingInput`` and a ``MemoryReading``; nothing here reads the machine.

Memory comes in pools: host RAM (the cgroup-aware ``host_free``) and, when layers are offloaded, the
GPUs (their free memory added up, as llama.cpp spreads layers over all of them). A pool holds its share
of the weights and of every token's KV: with ``n_gpu_layers`` of ``n_layer`` layers offloaded, the GPUs
hold that fraction and RAM the rest. In each pool, what is left for the KV cache is

    free - reserve - weights share - compute buffers

(the weights are not loaded yet when sizing runs), and the pool that runs out first sets the cells.

Overcommit rule (as in vLLM, whose KV pool is smaller than max_num_seqs x max_model_len): most
sequences never fill their context, so the shared cache may hold fewer cells than parallel x ctx_size.
It must hold at least one whole sequence (ctx_size cells) and at least half of every sequence's
context on average (``OVERCOMMIT`` = 2). When sequences do outgrow the cache the scheduler preempts one.
That holds for the unified cache only (``kv_unified``); with a KV stream per sequence (the default) every
stream is a whole ctx_size, so parallel x ctx_size cells it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from parallama.memory.probes import GiB, KiB, MemoryReading, MiB, format_size

OVERCOMMIT = 2  # parallel x ctx_size may be up to twice the KV cells
CELL_ALIGN = 256  # llama.cpp pads n_ctx to a multiple of 256; sizing picks multiples itself
DEFAULT_RESERVE = GiB  # left free in every pool; llama.cpp's --fit-target margin is 1024 MiB too
LLAMA_MAX_SEQ = 256  # llama.cpp's limit on n_seq_max
CACHE_IDS_PER_SLOT = 3  # prefix-cache entries kept per running sequence: room for more conversations than slots

# Compute buffers, measured on SmolLM2-135M (n_vocab 49152, n_embd 576, flash attention auto):
# CPU compute buffer 24.56 / 98.25 / 393.01 MiB at n_ubatch 128 / 512 / 2048, the same for 4,096 and
# 32,768 cells. That is the f32 logits of a full micro-batch (n_ubatch x n_vocab x 4) plus ~4.5 KiB of
# activations per batch token. The output buffer holds one logits row per sequence (3 MiB for 16).
# The estimate keeps 32 KiB of activations per token (n_embd up to ~4096) and a fixed 32 MiB for graph
# metadata and staging. Without flash attention the KQ matrix is materialised too: f32, n_batch x heads x
# the cells a token attends to (its stream, or the whole unified pool); llama.cpp may overlap it with the
# logits (99.4 MiB at 8 streams of 4,096 cells), but not always (646 MiB for a unified pool of 32,768).
COMPUTE_PER_BATCH_TOKEN = 32 * KiB
COMPUTE_FIXED = 32 * MiB


class SizingError(ValueError):
    """The requested (or minimal) configuration does not fit; the message says what would."""


@dataclass(frozen=True, slots=True)
class SeqLayout:
    """What the context's seq_ids are for, decided once at start-up.

    ``0 .. slots-1`` are the sequences requests run on (the most that decode in one step; each needs a
    token in every batch, so slots <= n_batch). ``slots .. n_seq_max-1`` hold the prefix cache's
    entries: KV kept after a request ends, which no request ever decodes on. The context is opened with
    ``n_seq_max``, the scheduler hands out the slots, the cache takes the rest, the edge reads ``slots``.
    """

    slots: int
    cache_ids: int = 0
    slot_cache: bool = False  # with a KV stream per seq_id: the prefix cache keeps KV in the slots' own streams

    @property
    def n_seq_max(self) -> int:
        return self.slots + self.cache_ids

    @property
    def cache_seq_ids(self) -> range:
        return range(self.slots, self.n_seq_max)


def seq_layout(slots: int, prefix_cache: bool, n_batch: int = 512, kv_unified: bool = True) -> SeqLayout:
    """Unified: the prefix cache's entries get seq_ids of their own. Streams: they stay in the slots'."""
    if not kv_unified:
        return SeqLayout(slots, slot_cache=prefix_cache)
    cache_ids = min(CACHE_IDS_PER_SLOT * slots, seq_limit(n_batch) - slots) if prefix_cache else 0
    return SeqLayout(slots, max(0, cache_ids))


def seq_limit(n_batch: int) -> int:
    """The most seq_ids one context may have: llama.cpp's limit, and no more than n_batch (llama.cpp
    reserves one output row per seq_id within the batch's outputs)."""
    return min(LLAMA_MAX_SEQ, n_batch)


@dataclass(frozen=True, slots=True)
class SizingInput:
    weights_bytes: int
    kv_bytes_per_token: int  # K and V of one token over all layers (ModelFacts.kv_bytes_per_token)
    ctx_size: int  # most tokens one sequence holds: prompt + answer
    n_vocab: int  # sets the logits part of the compute buffers
    n_layer: int = 1
    n_gpu_layers: int = 0  # -1 (or n_layer and more): every layer
    parallel: int | None = None  # None: auto
    kv_size: int | None = None  # None: auto
    max_parallel: int = 16  # bound for auto parallel only; an explicit --parallel may exceed it
    reserve_bytes: int = DEFAULT_RESERVE
    n_batch: int = 512
    cache_types: str = "f16"  # shown by describe(), e.g. "q8_0/f16"
    prefix_cache: bool = False  # keep finished sequences' KV for later prompts
    kv_unified: bool = True  # one pool of cells (overcommit allowed, cache ids beyond the slots); else streams
    cache_ram_bytes: int | None = 0  # the prefix cache's host-RAM tier; None: auto (see cache_ram)
    flash_attn: bool = True  # False: the compute buffers hold the KQ matrix (see COMPUTE_PER_BATCH_TOKEN)
    n_head: int = 1  # attention heads: the KQ matrix's size without flash attention

    @property
    def overcommit(self) -> int:
        """How far parallel x ctx_size may exceed the cells: streams are a whole ctx_size each."""
        return OVERCOMMIT if self.kv_unified else 1

    @property
    def cache_ids(self) -> int:
        """seq_ids the prefix cache needs beyond the slots, at least."""
        return 1 if self.prefix_cache and self.kv_unified else 0

    def __post_init__(self) -> None:
        for name in ("kv_bytes_per_token", "ctx_size", "n_vocab", "n_layer", "max_parallel", "n_batch", "n_head"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("weights_bytes", "reserve_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")


@dataclass(frozen=True, slots=True)
class SizingPlan:
    layout: SeqLayout
    kv_cells: int  # n_ctx: cells of the unified KV cache
    ctx_size: int
    kv_bytes_per_token: int
    weights_bytes: int
    compute_bytes: int
    host_free: int  # RAM considered (cgroup-aware)
    gpu_free: int  # GPU memory considered; 0 when nothing is offloaded
    gpu_fraction: Fraction  # share of layers (weights and KV) on the GPUs
    reserve_bytes: int
    budget_cells: int  # the most cells the memory would have allowed
    cache_types: str = "f16"
    cache_ram_bytes: int = 0  # host RAM set aside for the prefix cache's second tier
    overcommit: int = OVERCOMMIT  # the rule the plan was made under (SizingInput.overcommit)
    flash_attn: bool = True  # as SizingInput.flash_attn: the compute buffers were sized for it

    @property
    def parallel(self) -> int:
        """Sequences that run at once: the layout's slots."""
        return self.layout.slots

    @property
    def kv_bytes(self) -> int:
        return self.kv_cells * self.kv_bytes_per_token

    @property
    def free_bytes(self) -> int:
        """Free memory in the pools this plan uses."""
        host = self.host_free if self.gpu_fraction < 1 else 0
        return host + (self.gpu_free if self.gpu_fraction > 0 else 0)

    def describe(self) -> str:
        """One line for the start-up log, e.g. "8 sequences x 2048 tokens over 12,288 KV cells =
        270 MiB (f16) + 92.1 MiB weights; 21.3 GiB free; reserve 1 GiB"."""
        seqs = "1 sequence" if self.parallel == 1 else f"{self.parallel} sequences"
        return (
            f"{seqs} x {self.ctx_size} tokens over {self.kv_cells:,} KV cells = "
            f"{format_size(self.kv_bytes)} ({self.cache_types}) + {format_size(self.weights_bytes)} weights; "
            f"{self._free_text()}; reserve {format_size(self.reserve_bytes)}"
            + (f"; prefix cache RAM {format_size(self.cache_ram_bytes)}" if self.cache_ram_bytes else "")
            + ("" if self.flash_attn else "; flash attention off")
        )

    def _free_text(self) -> str:
        if self.gpu_fraction == 0:
            return f"{format_size(self.host_free)} free"
        if self.gpu_fraction == 1:
            return f"{format_size(self.gpu_free)} GPU free"
        return f"{format_size(self.gpu_free)} GPU + {format_size(self.host_free)} RAM free"


# --- arithmetic ----------------------------------------------------------------------------------


def align_down(cells: int) -> int:
    return cells // CELL_ALIGN * CELL_ALIGN


def align_up(cells: int) -> int:
    return -(-cells // CELL_ALIGN) * CELL_ALIGN


def compute_bytes(n_batch: int, n_vocab: int, n_seq_max: int) -> int:
    """Estimated compute + output buffers of one context (see COMPUTE_PER_BATCH_TOKEN above)."""
    logits = 4 * n_vocab * (n_batch + n_seq_max)  # f32: a full micro-batch, and one row per sequence
    return logits + COMPUTE_PER_BATCH_TOKEN * n_batch + COMPUTE_FIXED


def kq_bytes(inp: SizingInput, cells: int) -> int:
    """The KQ matrix attention materialises without flash attention, for a KV cache of ``cells``: f32,
    n_batch tokens x heads x the cells each token sees (its stream, ctx_size; or every cell of a unified pool)."""
    attended = cells if inp.kv_unified else inp.ctx_size
    return 0 if inp.flash_attn else 4 * inp.n_batch * inp.n_head * attended


def gpu_fraction(inp: SizingInput, reading: MemoryReading) -> Fraction:
    """Share of layers on the GPUs. No visible GPU means llama.cpp keeps everything on the host."""
    if not reading.gpus or inp.n_gpu_layers == 0:
        return Fraction(0)
    if inp.n_gpu_layers < 0 or inp.n_gpu_layers >= inp.n_layer:
        return Fraction(1)
    return Fraction(inp.n_gpu_layers, inp.n_layer)


@dataclass(frozen=True, slots=True)
class _Pool:
    """One kind of memory and what start-up puts in it before the KV cache."""

    name: str  # "RAM" or "GPU"
    free: int
    share: Fraction  # of weights and of each token's KV
    weights: int
    compute: int
    reserve: int
    cache_ram: int = 0  # the prefix cache's RAM tier (host pool only)
    per_cell: int = 0  # compute bytes each KV cell adds (a unified pool's KQ matrix without flash attention)

    @property
    def budget(self) -> int:
        return self.free - self.reserve - self.weights - self.compute - self.cache_ram

    def cells(self, kv_bytes_per_token: int) -> int:
        return max(0, int(self.budget // (self.share * kv_bytes_per_token + self.per_cell)))

    def room_text(self) -> str:
        return (
            f"{format_size(max(0, self.budget))} is left for it in {self.name} ({format_size(self.free)} free"
            f" - {format_size(self.reserve)} reserve - {format_size(self.weights)} weights"
            f" - {format_size(self.compute)} compute buffers"
            + (f" - {format_size(self.cache_ram)} prefix cache RAM)" if self.cache_ram else ")")
        )


def _pools(inp: SizingInput, reading: MemoryReading, n_seq_max: int) -> list[_Pool]:
    """The pools that hold part of the KV cache. The GPUs get the compute buffers when they run layers;
    the host then keeps only its staging share (COMPUTE_FIXED)."""
    frac = gpu_fraction(inp, reading)
    # Without flash attention a stream's KQ matrix is a fixed size; a unified pool's grows with its cells.
    kq_fixed = kq_bytes(inp, 0)
    per_cell = kq_bytes(inp, 1) - kq_fixed
    compute = compute_bytes(inp.n_batch, inp.n_vocab, n_seq_max) + kq_fixed
    pools = []
    if frac > 0:
        weights = int(inp.weights_bytes * frac)
        pools.append(_Pool("GPU", reading.gpu_free, frac, weights, compute, inp.reserve_bytes, per_cell=per_cell))
    if frac < 1:
        weights = inp.weights_bytes - int(inp.weights_bytes * frac)
        host_compute, host_per_cell = (compute, per_cell) if frac == 0 else (COMPUTE_FIXED, 0)
        pools.append(_Pool("RAM", reading.host_free, 1 - frac, weights, host_compute, inp.reserve_bytes,
                           cache_ram(inp, reading), host_per_cell))
    return pools


def _binding(pools: list[_Pool], kv_bytes_per_token: int) -> _Pool:
    return min(pools, key=lambda pool: pool.cells(kv_bytes_per_token))


# --- start-up ------------------------------------------------------------------------------------


def plan_sizing(inp: SizingInput, reading: MemoryReading) -> SizingPlan:
    """Choose the seq_id layout (slots + cache ids = n_seq_max) and KV cells (n_ctx). Raises SizingError when the request cannot fit."""
    _check_request(inp)
    # The output buffer grows with the sequences; size it for the most there may be.
    n_seq_max = seq_layout(inp.parallel or _most_slots(inp), inp.prefix_cache, inp.n_batch, inp.kv_unified).n_seq_max
    pools = _pools(inp, reading, n_seq_max)
    budget = min(pool.cells(inp.kv_bytes_per_token) for pool in pools)
    if align_down(budget) < align_up(inp.ctx_size):
        raise SizingError(_nothing_fits(inp, pools))
    if inp.kv_size is not None:
        parallel, cells = _with_kv_size(inp, pools, budget)
    elif inp.parallel is not None:
        parallel, cells = _with_parallel(inp, pools, budget)
    else:
        parallel, cells = _auto(inp, budget)
    frac = gpu_fraction(inp, reading)
    layout = seq_layout(parallel, inp.prefix_cache, inp.n_batch, inp.kv_unified)
    return SizingPlan(
        layout=layout,
        kv_cells=cells,
        ctx_size=inp.ctx_size,
        kv_bytes_per_token=inp.kv_bytes_per_token,
        weights_bytes=inp.weights_bytes,
        compute_bytes=compute_bytes(inp.n_batch, inp.n_vocab, layout.n_seq_max) + kq_bytes(inp, cells),
        host_free=reading.host_free,
        gpu_free=reading.gpu_free if frac > 0 else 0,
        gpu_fraction=frac,
        reserve_bytes=inp.reserve_bytes,
        budget_cells=budget,
        cache_types=inp.cache_types,
        cache_ram_bytes=cache_ram(inp, reading),
        overcommit=inp.overcommit,
        flash_attn=inp.flash_attn,
    )


def cache_ram(inp: SizingInput, reading: MemoryReading) -> int:
    """Host RAM for the prefix cache's second tier: as asked, or auto: the smaller of 1 GiB and a tenth
    of free RAM (so a small container keeps most of its memory for the model and KV)."""
    if not inp.prefix_cache:
        return 0
    if inp.cache_ram_bytes is None:
        return min(GiB, reading.host_free // 10)
    return inp.cache_ram_bytes


def _check_request(inp: SizingInput) -> None:
    """Settings that are wrong whatever the memory."""
    if inp.kv_size is not None and inp.kv_size < inp.ctx_size:
        raise SizingError(
            f"--kv-size {inp.kv_size:,} is smaller than --ctx-size {inp.ctx_size}: one whole sequence must "
            f"fit in the KV cache; use --kv-size {inp.ctx_size:,} or more, or a smaller --ctx-size"
        )
    if inp.parallel is not None and inp.parallel > inp.n_batch:
        raise SizingError(
            f"--parallel {inp.parallel} exceeds --batch-size {inp.n_batch}: every running sequence needs "
            f"a token in each batch; raise --batch-size or lower --parallel"
        )
    limit = seq_limit(inp.n_batch)
    if inp.parallel is not None and inp.parallel > limit - inp.cache_ids:
        why = f"--batch-size {inp.n_batch}" if limit == inp.n_batch else f"llama.cpp's {LLAMA_MAX_SEQ}"
        raise SizingError(
            f"--parallel {inp.parallel} leaves no sequence id for --prefix-cache within {why} (a context holds at "
            f"most that many sequences, cached ones included); use --parallel {limit - 1} or less, a larger "
            f"--batch-size, or --prefix-cache false"
        )


def _most_slots(inp: SizingInput) -> int:
    """Auto parallel's ceiling: max_parallel, one token per sequence in a batch, and llama.cpp's
    seq_id limit with at least one id left for the prefix cache."""
    return min(inp.max_parallel, seq_limit(inp.n_batch) - inp.cache_ids)


def _auto_parallel(inp: SizingInput, cells: int) -> int:
    """The most sequences ``cells`` serve under the overcommit rule, within ``_most_slots``."""
    return max(1, min(_most_slots(inp), inp.overcommit * cells // inp.ctx_size))


def _auto(inp: SizingInput, budget: int) -> tuple[int, int]:
    parallel = _auto_parallel(inp, align_down(budget))
    cells = max(align_up(inp.ctx_size), align_down(min(budget, parallel * inp.ctx_size)))
    return parallel, cells


def _with_parallel(inp: SizingInput, pools: list[_Pool], budget: int) -> tuple[int, int]:
    """Explicit --parallel: its full context when that fits, else overcommit down to the rule's floor."""
    assert inp.parallel is not None
    want = inp.parallel * inp.ctx_size
    cells = min(align_up(want), align_down(budget))
    if cells * inp.overcommit < want:
        raise SizingError(_parallel_too_big(inp, pools, budget))
    return inp.parallel, max(cells, align_up(inp.ctx_size))


def _with_kv_size(inp: SizingInput, pools: list[_Pool], budget: int) -> tuple[int, int]:
    assert inp.kv_size is not None
    if inp.kv_size > budget:
        binding = _binding(pools, inp.kv_bytes_per_token)
        fits = align_down(budget)
        raise SizingError(
            f"--kv-size {inp.kv_size:,} needs {format_size(inp.kv_size * inp.kv_bytes_per_token)} of KV cache; "
            f"{binding.room_text()}: at most --kv-size {fits:,} "
            f"({_auto_parallel(inp, fits)} sequences x {inp.ctx_size})"
        )
    parallel = inp.parallel or _auto_parallel(inp, inp.kv_size)
    if not inp.kv_unified and parallel * inp.ctx_size > inp.kv_size:  # a pool may be overcommitted at will
        raise SizingError(
            f"--kv-size {inp.kv_size:,} holds {inp.kv_size // inp.ctx_size} sequences x {inp.ctx_size} with a KV "
            f"stream per sequence, not --parallel {parallel}: use --kv-size {parallel * inp.ctx_size:,}, a smaller "
            f"--parallel, or --kv-unified (one shared pool, {OVERCOMMIT}x overcommit)")
    return parallel, inp.kv_size


def _nothing_fits(inp: SizingInput, pools: list[_Pool]) -> str:
    binding = _binding(pools, inp.kv_bytes_per_token)
    need = format_size(inp.ctx_size * inp.kv_bytes_per_token)
    fits = align_down(binding.cells(inp.kv_bytes_per_token))
    hint = (
        f"at most --ctx-size {fits}" if fits > 0 else "free some memory, offload fewer layers, or use a smaller model"
    )
    return f"--ctx-size {inp.ctx_size} needs {need} of KV cache for one sequence; {binding.room_text()}: {hint}"


def _parallel_too_big(inp: SizingInput, pools: list[_Pool], budget: int) -> str:
    assert inp.parallel is not None
    binding = _binding(pools, inp.kv_bytes_per_token)
    want = inp.parallel * inp.ctx_size
    full = format_size(want * inp.kv_bytes_per_token)
    least = format_size(want * inp.kv_bytes_per_token // inp.overcommit)
    fits = align_down(budget)
    most = max(1, min(inp.n_batch, inp.overcommit * fits // inp.ctx_size))
    overcommit = f" ({least} with {inp.overcommit}x overcommit)" if inp.overcommit > 1 else ""
    return (
        f"--parallel {inp.parallel} --ctx-size {inp.ctx_size} needs {full} of KV cache{overcommit}; "
        f"{binding.room_text()}: at most {most} sequences x {inp.ctx_size}, or --kv-size {fits:,}"
    )
