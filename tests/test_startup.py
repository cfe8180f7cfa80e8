"""Settings that work together start; those that cannot are refused at start in the user's terms."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest
from serving import live_server

from parallama.sequences.config import ContextConfig, use_flash_attn


def test_a_batch_size_below_the_minimum_is_refused_naming_the_flag():
    run = subprocess.run([sys.executable, "-m", "parallama.server.cli", "serve", "--parallel", "8", "--batch-size", "8"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "--batch-size (PARALLAMA_BATCH_SIZE)" in run.stderr and "16" in run.stderr
    assert "Traceback" not in run.stderr


@pytest.mark.model
def test_batch_size_16_starts_with_its_slots_and_a_prefix_cache_beside_them():
    with live_server(parallel=None, max_parallel=16, batch_size=16, ubatch_size=16, kv_size=4096,
                     kv_unified=True) as server:
        status = httpx.get(f"{server.base_url}/status", timeout=30).json()
        assert status["sequences"]["max"] == 15  # 16 seq_ids at most: one is left for the prefix cache
        body = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4, "temperature": 0}
        reply = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=120)
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] >= 1
        assert server.served.engine.scheduler.layout.cache_ids > 0
        assert server.served.engine.backend.config.flash_attn is True  # auto: a unified pool keeps it


def test_parallel_equal_to_batch_size_is_refused_in_flag_terms_with_a_unified_pool():
    run = subprocess.run([sys.executable, "-m", "parallama.server.cli", "serve", "--parallel", "16", "--batch-size",
                          "16", "--kv-unified", "true", "--port", "0"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert "--parallel 16 leaves no sequence id for --prefix-cache within --batch-size 16" in run.stdout + run.stderr


@pytest.mark.model
def test_parallel_equal_to_batch_size_starts_without_the_prefix_cache():
    with live_server(parallel=16, batch_size=16, ubatch_size=16, ctx_size=256, prefix_cache=False) as server:
        assert httpx.get(f"{server.base_url}/status", timeout=30).json()["sequences"]["max"] == 16


@pytest.mark.model
def test_with_a_stream_per_sequence_every_seq_id_is_a_slot_and_the_cache_lives_in_them():
    with live_server(parallel=16, batch_size=16, ubatch_size=16, ctx_size=256) as server:
        assert httpx.get(f"{server.base_url}/status", timeout=30).json()["sequences"]["max"] == 16
        layout = server.served.engine.scheduler.layout
        assert (layout.n_seq_max, layout.slot_cache) == (16, True)
        assert server.served.engine.backend.config.flash_attn is False  # auto on the CPU with streams
        body = {"prompt": "Tell me about rivers. " * 6, "max_tokens": 4, "temperature": 0}
        first = httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=120).json()
        again = httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=120).json()
        assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == again["usage"]["prompt_tokens"] - 1


@pytest.mark.parametrize(("choice", "cpu_only", "kv_unified", "cache_type_v", "expected"), [
    ("auto", True, False, "f16", False),  # the CPU's flash-attention kernel slows decoding at depth
    ("auto", True, False, "bf16", False),
    ("auto", True, False, "q8_0", True),  # a quantized V cache needs it
    ("auto", True, True, "f16", True),  # a unified pool would materialise KQ over every cell
    ("auto", False, False, "f16", True),  # GPUs
    ("on", True, False, "f16", True),
    ("off", False, True, "f16", False),
])
def test_flash_attention_auto_is_off_only_on_the_cpu_with_streams(choice, cpu_only, kv_unified, cache_type_v, expected):
    assert use_flash_attn(choice, cpu_only, kv_unified, cache_type_v) is expected


def test_flash_attention_off_with_a_quantized_v_cache_is_refused_naming_both_flags():
    run = subprocess.run([sys.executable, "-m", "parallama.server.cli", "serve", "--flash-attn", "off",
                          "--cache-type-v", "q8_0", "--port", "0"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "--cache-type-v q8_0 needs flash attention: use --flash-attn on or auto" in run.stderr
    assert "Traceback" not in run.stderr
    with pytest.raises(ValueError, match="a q8_0 V cache needs flash attention"):
        ContextConfig(n_ctx=256, n_seq_max=1, cache_type_v="q8_0", flash_attn=False)
