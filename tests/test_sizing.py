"""Start-up sizing and the runtime cells-that-fit rule, on made-up memory readings. No model."""

from __future__ import annotations

import dataclasses
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from parallama.memory.degradation import cells_that_fit
from parallama.memory.probes import GiB, GpuDevice, KiB, MemoryReading, MiB
from parallama.memory.sizing import (
    COMPUTE_FIXED,
    SizingError,
    SizingInput,
    SeqLayout,
    SizingPlan,
    compute_bytes,
    kq_bytes,
    plan_sizing,
)

# A round model: 1 GiB of weights, 64 KiB of KV per token (a 2048-token sequence is 128 MiB), 32 layers.
W = GiB
KV = 64 * KiB
CTX = 2048
VOCAB = 32000
RESERVE = GiB
COMPUTE = compute_bytes(512, VOCAB, 16)  # n_batch 512, sized for up to max_parallel 16 sequences


def model(**changes) -> SizingInput:
    fields = dict(weights_bytes=W, kv_bytes_per_token=KV, ctx_size=CTX, n_vocab=VOCAB, n_layer=32)
    fields["reserve_bytes"] = RESERVE
    return SizingInput(**{**fields, **changes})


def ram(cells: int, compute: int = COMPUTE, **changes) -> MemoryReading:
    """A host whose free RAM holds the reserve, the weights, the compute buffers and exactly ``cells``."""
    return MemoryReading(RESERVE + W + compute + cells * KV, 64 * GiB, **changes)


# --- compute buffer estimate ---------------------------------------------------------------------


@pytest.mark.parametrize(("n_batch", "measured_mib"), [(128, 24.56), (512, 98.25), (2048, 393.01)])
def test_compute_estimate_covers_what_llama_cpp_allocated(n_batch, measured_mib):
    # llama.cpp's CPU compute buffer for SmolLM2-135M (n_vocab 49152) plus its 3 MiB output buffer.
    measured = int((measured_mib + 3) * MiB)
    estimate = compute_bytes(n_batch, 49152, 16)
    assert measured <= estimate <= measured * 5 // 4 + COMPUTE_FIXED  # safe, and not wildly so


# --- auto ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("free_cells", "parallel", "kv_cells"),
    [
        (1_000_000, 16, 16 * CTX),  # lots of RAM: capped at max_parallel, each with its whole context
        (16 * CTX, 16, 16 * CTX),
        (12_000, 11, 11_776),  # 11,776 cells (aligned) x 2 / 2048 = 11 sequences; all 11,776 cells
        (8 * CTX, 16, 8 * CTX),  # overcommit: 16 sequences share 8 contexts' worth of cells
        (4 * CTX, 8, 4 * CTX),
        (6000, 5, 5888),  # 5 x 2048 = 10,240 > 5,888 >= 10,240 / 2: overcommitted
        (2100, 2, 2048),
        (CTX, 2, CTX),  # one full sequence, two sharing it
    ],
)
def test_auto_sizing_from_free_ram(free_cells, parallel, kv_cells):
    plan = plan_sizing(model(), ram(free_cells))
    assert (plan.parallel, plan.kv_cells) == (parallel, kv_cells)
    assert plan.kv_cells % 256 == 0
    assert plan.kv_cells >= CTX
    assert plan.parallel * CTX <= 2 * plan.kv_cells


def test_max_parallel_caps_auto():
    plan = plan_sizing(model(max_parallel=4), ram(1_000_000, compute_bytes(512, VOCAB, 4)))
    assert (plan.parallel, plan.kv_cells) == (4, 4 * CTX)


def test_n_batch_caps_auto_parallel():
    plan = plan_sizing(model(n_batch=4), ram(1_000_000))
    assert (plan.parallel, plan.kv_cells) == (4, 4 * CTX)


def test_less_ram_means_fewer_sequences():
    plans = [plan_sizing(model(), ram(cells)) for cells in (32768, 16384, 8192, 4096, 2048)]
    assert [p.parallel for p in plans] == [16, 16, 8, 4, 2]
    assert [p.kv_cells for p in plans] == [32768, 16384, 8192, 4096, 2048]


def test_unaligned_ctx_size_still_fits_one_whole_sequence():
    plan = plan_sizing(model(ctx_size=1000, max_parallel=1), ram(1100, compute_bytes(512, VOCAB, 1)))
    assert (plan.parallel, plan.kv_cells) == (1, 1024)


def test_cgroup_limit_wins_over_host_ram():
    usage = 2 * GiB
    limit = usage + RESERVE + W + COMPUTE + 4096 * KV
    contained = MemoryReading(100 * GiB, 128 * GiB, cgroup_limit=limit, cgroup_usage=usage)
    assert (plan_sizing(model(), contained).parallel, plan_sizing(model(), contained).kv_cells) == (4, 4096)
    uncontained = MemoryReading(100 * GiB, 128 * GiB)
    assert plan_sizing(model(), uncontained).parallel == 16


def test_no_gpu_means_ram_sizing_even_when_layers_are_requested():
    plan = plan_sizing(model(n_gpu_layers=-1), ram(4096))
    assert (plan.parallel, plan.kv_cells) == (4, 4096)
    assert plan.gpu_fraction == 0
    assert plan.gpu_free == 0
    assert plan.free_bytes == ram(4096).host_free


def gpu(free: int, index: int = 0) -> GpuDevice:
    return GpuDevice(index, "GPU", free, 80 * GiB)


def test_full_offload_sizes_from_gpu_memory_only():
    reading = MemoryReading(GiB, 64 * GiB, gpus=(gpu(RESERVE + W + COMPUTE + 8192 * KV),))
    plan = plan_sizing(model(n_gpu_layers=-1), reading)
    assert (plan.parallel, plan.kv_cells) == (8, 8192)
    assert plan.gpu_fraction == 1
    assert plan.free_bytes == reading.gpu_free


def test_all_layers_by_count_is_full_offload():
    reading = MemoryReading(GiB, 64 * GiB, gpus=(gpu(RESERVE + W + COMPUTE + 8192 * KV),))
    assert plan_sizing(model(n_gpu_layers=99), reading).kv_cells == 8192


def test_gpu_memory_of_several_devices_adds_up():
    half = (RESERVE + W + COMPUTE + 8192 * KV) // 2
    reading = MemoryReading(GiB, 64 * GiB, gpus=(gpu(half, 0), gpu(half + 1, 1)))
    assert plan_sizing(model(n_gpu_layers=-1), reading).kv_cells == 8192


def test_partial_offload_limited_by_gpu():
    # 16 of 32 layers: the GPU holds half the weights and half of every token's KV.
    reading = MemoryReading(64 * GiB, 64 * GiB, gpus=(gpu(RESERVE + W // 2 + COMPUTE + 8192 * KV // 2),))
    plan = plan_sizing(model(n_gpu_layers=16), reading)
    assert plan.gpu_fraction == Fraction(1, 2)
    assert (plan.parallel, plan.kv_cells) == (8, 8192)
    assert plan.free_bytes == reading.gpu_free + reading.host_free


def test_partial_offload_limited_by_ram():
    # The host keeps its half of weights and KV, and only the fixed staging part of the compute buffers.
    reading = MemoryReading(RESERVE + W // 2 + COMPUTE_FIXED + 4096 * KV // 2, 64 * GiB, gpus=(gpu(70 * GiB),))
    plan = plan_sizing(model(n_gpu_layers=16), reading)
    assert (plan.parallel, plan.kv_cells) == (4, 4096)


def test_partial_offload_uses_more_than_either_pool_alone():
    # Each pool holds 4096 cells' worth of full-size KV beyond its share of weights; split in half,
    # the two together hold 8192.
    host = MemoryReading(RESERVE + W + COMPUTE + 4096 * KV, 64 * GiB)
    gpus = (gpu(RESERVE + W // 2 + COMPUTE + 4096 * KV),)
    both = MemoryReading(RESERVE + W // 2 + COMPUTE_FIXED + 4096 * KV, 64 * GiB, gpus=gpus)
    assert plan_sizing(model(n_gpu_layers=16), host).kv_cells == 4096  # no GPU: all on the host
    assert plan_sizing(model(n_gpu_layers=16), both).kv_cells == 8192


# --- explicit settings ---------------------------------------------------------------------------


def test_explicit_parallel_gets_its_full_context_when_it_fits():
    plan = plan_sizing(model(parallel=4), ram(1_000_000))
    assert (plan.parallel, plan.kv_cells) == (4, 4 * CTX)


def test_explicit_parallel_may_exceed_max_parallel():
    plan = plan_sizing(model(parallel=32, max_parallel=16), ram(1_000_000, compute_bytes(512, VOCAB, 32)))
    assert (plan.parallel, plan.kv_cells) == (32, 32 * CTX)


def test_explicit_parallel_overcommits_down_to_half():
    # 5,888 cells (aligned) serve 5 x 2048 = 10,240 tokens of context (>= half), not 6 x 2048 = 12,288.
    plan = plan_sizing(model(parallel=5), ram(6000, compute_bytes(512, VOCAB, 5)))
    assert (plan.parallel, plan.kv_cells) == (5, 5888)
    with pytest.raises(SizingError, match="at most 5 sequences x 2048, or --kv-size 5,888"):
        plan_sizing(model(parallel=6), ram(6000, compute_bytes(512, VOCAB, 6)))


def test_explicit_parallel_that_does_not_fit_says_what_would():
    compute = compute_bytes(512, VOCAB, 64)
    with pytest.raises(SizingError) as info:
        plan_sizing(model(parallel=64, ctx_size=8192), ram(139_264, compute))
    message = str(info.value)
    assert "--parallel 64 --ctx-size 8192 needs 32 GiB of KV cache" in message
    assert "16 GiB with 2x overcommit" in message
    assert "at most 34 sequences x 8192, or --kv-size 139,264" in message
    assert "1 GiB reserve" in message


def test_explicit_kv_size_is_used_and_sets_auto_parallel():
    plan = plan_sizing(model(kv_size=5000), ram(1_000_000))
    assert (plan.parallel, plan.kv_cells) == (4, 5000)


def test_explicit_parallel_and_kv_size_are_both_kept():
    plan = plan_sizing(model(parallel=12, kv_size=4096), ram(1_000_000, compute_bytes(512, VOCAB, 12)))
    assert (plan.parallel, plan.kv_cells) == (12, 4096)


def test_kv_size_that_does_not_fit_says_what_would():
    with pytest.raises(SizingError, match=r"--kv-size 100,000 needs .* at most --kv-size 4,096 \(4 sequences x 2048\)"):
        plan_sizing(model(kv_size=100_000), ram(4100))


def test_kv_size_below_ctx_size_is_an_error_whatever_the_memory():
    with pytest.raises(SizingError, match="--kv-size 1,024 is smaller than --ctx-size 2048"):
        plan_sizing(model(kv_size=1024), ram(1_000_000))


def test_parallel_above_n_batch_is_an_error():
    with pytest.raises(SizingError, match="--parallel 600 exceeds --batch-size 512"):
        plan_sizing(model(parallel=600), ram(10_000_000))


def test_one_sequence_that_does_not_fit_says_which_ctx_size_would():
    with pytest.raises(SizingError, match=r"--ctx-size 65536 needs 4 GiB .* in RAM .*: at most --ctx-size 3840$"):
        plan_sizing(model(ctx_size=65536), ram(3900))


def test_weights_that_do_not_fit_ask_for_memory():
    reading = MemoryReading(RESERVE + W // 2, 64 * GiB)
    with pytest.raises(SizingError, match=r"0 B is left for it in RAM .* free some memory"):
        plan_sizing(model(), reading)


def test_gpu_shortage_names_the_gpu():
    reading = MemoryReading(64 * GiB, 64 * GiB, gpus=(gpu(RESERVE + W + COMPUTE + 1000 * KV),))
    with pytest.raises(SizingError, match="left for it in GPU"):
        plan_sizing(model(n_gpu_layers=-1), reading)


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="ctx_size"):
        model(ctx_size=0)
    with pytest.raises(ValueError, match="reserve_bytes"):
        model(reserve_bytes=-1)


@given(
    free_cells=st.integers(min_value=0, max_value=200_000),
    ctx=st.sampled_from([256, 1000, 2048, 4096]),
    max_parallel=st.integers(min_value=1, max_value=64),
)
def test_auto_plan_invariants(free_cells, ctx, max_parallel):
    inp = model(ctx_size=ctx, max_parallel=max_parallel)
    compute = compute_bytes(512, VOCAB, max_parallel)
    if free_cells < -(-ctx // 256) * 256:  # not one whole sequence (in aligned cells)
        with pytest.raises(SizingError, match=r"at most --ctx-size|free some memory"):
            plan_sizing(inp, ram(free_cells, compute))
        return
    plan = plan_sizing(inp, ram(free_cells, compute))
    assert plan.kv_cells % 256 == 0
    assert ctx <= plan.kv_cells <= free_cells  # one whole sequence, and within the memory
    assert 1 <= plan.parallel <= max_parallel
    assert plan.kv_cells <= -(-plan.parallel * ctx // 256) * 256  # no cells nobody could use
    assert plan.parallel * ctx <= 2 * plan.kv_cells  # the overcommit rule


# --- describe ------------------------------------------------------------------------------------


def plan_of(**changes) -> SizingPlan:
    fields = dict(
        layout=SeqLayout(8),
        kv_cells=12288,
        ctx_size=2048,
        kv_bytes_per_token=4096,
        weights_bytes=98 * MiB,
        compute_bytes=100 * MiB,
        host_free=int(21.3 * GiB),
        gpu_free=0,
        gpu_fraction=Fraction(0),
        reserve_bytes=2 * GiB,
        budget_cells=10**6,
    )
    return SizingPlan(**{**fields, **changes})


def test_describe_is_one_readable_line():
    assert plan_of().describe() == (
        "8 sequences x 2048 tokens over 12,288 KV cells = 48 MiB (f16) + 98 MiB weights; 21.3 GiB free; reserve 2 GiB"
    )


def test_describe_names_gpu_memory_and_cache_types():
    full = plan_of(gpu_free=70 * GiB, gpu_fraction=Fraction(1), cache_types="q8_0/q8_0")
    assert full.describe().endswith("= 48 MiB (q8_0/q8_0) + 98 MiB weights; 70 GiB GPU free; reserve 2 GiB")
    partial = plan_of(gpu_free=70 * GiB, gpu_fraction=Fraction(1, 2))
    assert "; 70 GiB GPU + 21.3 GiB RAM free;" in partial.describe()
    assert plan_of(layout=SeqLayout(1)).describe().startswith("1 sequence x 2048 tokens")


def test_describe_of_a_real_plan():
    plan = plan_sizing(model(), ram(8192))
    assert plan.describe().startswith("8 sequences x 2048 tokens over 8,192 KV cells = 512 MiB (f16) + 1 GiB weights; ")
    assert plan.kv_bytes == 512 * MiB


# --- cells that fit while serving ----------------------------------------------------------------


def host(free: int) -> MemoryReading:
    return MemoryReading(free, 64 * GiB)


def fit(reading: MemoryReading, current: int = 8192, **kwargs) -> int:
    return cells_that_fit(reading, current, KV, RESERVE, floor_cells=CTX, **{"max_cells": 8192, **kwargs})


@pytest.mark.parametrize(
    ("free", "cells"),
    [
        (RESERVE, 8192),  # exactly the reserve free: the cache keeps its size
        (RESERVE + GiB, 8192),  # more free: never above the start-up size
        (RESERVE - 256 * MiB, 4096),  # 256 MiB short = 4096 cells of 64 KiB
        (RESERVE - 1000 * KV, 7168),  # 7192 cells fit: rounded down to 256
        (RESERVE - 400 * MiB, 2048),  # 6400 cells short: floored at one sequence
        (0, 2048),
    ],
)
def test_cells_that_fit(free, cells):
    assert fit(host(free)) == cells


def test_cells_shrink_under_pressure_and_grow_back():
    script = [RESERVE, RESERVE - 128 * MiB, RESERVE - 300 * MiB, RESERVE - 128 * MiB, RESERVE + GiB]
    current = 8192
    seen = []
    for free in script:
        # After a resize the cache holds the new size: free memory moves by the cells given back.
        current = fit(host(free - (current - 8192) * KV), current)
        seen.append(current)
    assert seen == [8192, 6144, 3392 // 256 * 256, 6144, 8192]


def test_cells_that_fit_without_a_ceiling_grows_past_the_current_size():
    assert cells_that_fit(host(RESERVE + 64 * MiB), 4096, KV, RESERVE, floor_cells=CTX) == 5120


def test_unaligned_start_size_is_kept_while_memory_allows():
    assert fit(host(RESERVE), current=5000, max_cells=5000) == 5000
    assert fit(host(RESERVE - 64 * MiB), current=5000, max_cells=5000) == 3840


def test_cells_that_fit_uses_the_cgroup_view():
    usage = 4 * GiB
    reading = MemoryReading(60 * GiB, 64 * GiB, cgroup_limit=usage + RESERVE - 256 * MiB, cgroup_usage=usage)
    assert fit(reading) == 4096


def test_cells_that_fit_with_gpu_offload():
    # Half the KV on the GPU: 256 MiB short there is 8192 cells of 32 KiB.
    reading = MemoryReading(64 * GiB, 64 * GiB, gpus=(gpu(RESERVE - 128 * MiB),))
    assert fit(reading, gpu_fraction=Fraction(1, 2), max_cells=None) == 4096
    assert fit(reading, gpu_fraction=0.5, max_cells=None) == 4096


def test_gpu_reading_missing_does_not_shrink_the_cache():
    reading = MemoryReading(64 * GiB, 64 * GiB)  # NVML failed this time: no devices in the reading
    assert fit(reading, gpu_fraction=1) == 8192
    assert fit(reading, gpu_fraction=Fraction(1, 2)) == 8192


# --- the seq_id layout ---------------------------------------------------------------------------


def test_layout_gives_the_prefix_cache_its_own_ids_beyond_the_slots():
    plan = plan_sizing(model(parallel=8, prefix_cache=True), ram(1_000_000))
    assert (plan.layout.slots, plan.parallel) == (8, 8)
    assert plan.layout.cache_seq_ids == range(8, 8 + 3 * 8)
    assert plan.layout.n_seq_max == 32
    assert plan_sizing(model(parallel=8), ram(1_000_000)).layout.n_seq_max == 8  # no cache, no extra ids


def test_a_small_batch_size_bounds_slots_and_cache_ids_together():
    # llama.cpp aborts when n_seq_max exceeds n_batch: the slots and the cache share those ids.
    plan = plan_sizing(model(n_batch=16, prefix_cache=True), ram(1_000_000))
    assert (plan.layout.slots, plan.layout.cache_ids) == (15, 1)
    plan = plan_sizing(model(parallel=8, n_batch=16, prefix_cache=True), ram(1_000_000))
    assert (plan.layout.slots, plan.layout.cache_ids) == (8, 8)
    assert plan_sizing(model(parallel=16, n_batch=16), ram(1_000_000)).layout.n_seq_max == 16


def test_layout_stays_within_llamas_seq_limit():
    plan = plan_sizing(model(parallel=200, max_parallel=256, prefix_cache=True), ram(1_000_000))
    assert plan.layout.n_seq_max == 256 and plan.layout.cache_ids == 56
    auto = plan_sizing(model(max_parallel=256, n_batch=512, prefix_cache=True, ctx_size=64), ram(1_000_000))
    assert auto.layout.slots == 255 and auto.layout.cache_ids == 1
    assert plan.compute_bytes == compute_bytes(512, VOCAB, 256)  # an output row for every seq_id


def test_the_plan_counts_the_prefix_caches_ram_tier():
    plain = plan_sizing(model(), ram(4096))
    with_ram = plan_sizing(model(prefix_cache=True, cache_ram_bytes=64 * MiB, max_parallel=4), ram(4096))
    assert with_ram.cache_ram_bytes == 64 * MiB
    # 64 MiB is 1024 cells of 64 KiB (give or take the compute estimate, which follows the seq_ids)
    assert abs(with_ram.budget_cells - (plain.budget_cells - 64 * MiB // KV)) <= 8
    assert "; prefix cache RAM 64 MiB" in with_ram.describe()
    auto = plan_sizing(model(prefix_cache=True, cache_ram_bytes=None), MemoryReading(4 * GiB, 8 * GiB))
    assert auto.cache_ram_bytes == 4 * GiB // 10  # a small machine: a tenth of free RAM
    assert plan_sizing(model(prefix_cache=True, cache_ram_bytes=None), ram(1_000_000)).cache_ram_bytes == GiB
    assert plan_sizing(model(cache_ram_bytes=None), ram(4096)).cache_ram_bytes == 0  # no cache, no tier


def test_parallel_that_leaves_no_id_for_the_cache_is_refused_in_flag_terms():
    with pytest.raises(SizingError, match=r"--parallel 256 leaves no sequence id for --prefix-cache.*--prefix-cache false"):
        plan_sizing(model(parallel=256, max_parallel=256, prefix_cache=True, ctx_size=64), ram(1_000_000))
    with pytest.raises(SizingError, match=r"--parallel 16 leaves no sequence id for --prefix-cache within "
                                          r"--batch-size 16.*--parallel 15 or less"):
        plan_sizing(model(parallel=16, n_batch=16, prefix_cache=True), ram(1_000_000))
    with pytest.raises(SizingError, match=r"--parallel 32 exceeds --batch-size 16"):
        plan_sizing(model(parallel=32, n_batch=16, prefix_cache=True), ram(1_000_000))


# --- flash attention ------------------------------------------------------------------------------


@pytest.mark.parametrize(("kv_unified", "cells", "measured_mib"), [(False, 8 * 4096, 99.38), (True, 32768, 646.38)])
def test_without_flash_attention_the_estimate_covers_the_kq_matrix(kv_unified, cells, measured_mib):
    # llama.cpp's CPU compute buffer for SmolLM2-135M (9 heads, n_vocab 49152) with flash attention off, n_batch 512:
    # 8 streams of 4,096 cells, and one unified pool of 32,768 cells for 16 sequences; plus the output buffer.
    inp = SizingInput(weights_bytes=0, kv_bytes_per_token=KV, ctx_size=4096 if not kv_unified else 2048,
                      n_vocab=49152, kv_size=cells, kv_unified=kv_unified, flash_attn=False, n_head=9)
    estimate = compute_bytes(512, 49152, 16) + kq_bytes(inp, cells)  # a stream's 4,096 cells, or the pool's
    assert int((measured_mib + 3) * MiB) <= estimate
    assert kq_bytes(dataclasses.replace(inp, flash_attn=True), cells) == 0


def test_a_unified_pool_without_flash_attention_leaves_room_for_its_kq_matrix():
    with_fa = plan_sizing(model(kv_unified=True, n_head=32), ram(8192))
    without = plan_sizing(model(kv_unified=True, n_head=32, flash_attn=False), ram(8192))
    # KQ: 512 tokens x 32 heads x 4 bytes per cell of the pool = 64 KiB, as much as a cell of KV here: half the cells
    assert (with_fa.kv_cells, without.kv_cells) == (8192, 4096)
    assert without.compute_bytes == compute_bytes(512, VOCAB, without.layout.n_seq_max) + 4 * 512 * 32 * 4096
    assert "; flash attention off" in without.describe() and "flash" not in with_fa.describe()


def test_streams_without_flash_attention_count_one_streams_kq_matrix():
    with_fa = plan_sizing(model(kv_unified=False, n_head=32, parallel=2), ram(8192))
    without = plan_sizing(model(kv_unified=False, n_head=32, parallel=2, flash_attn=False), ram(8192))
    assert without.compute_bytes - with_fa.compute_bytes == 4 * 512 * 32 * CTX  # a token sees its stream only
