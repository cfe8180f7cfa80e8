"""The prefix cache on the real model: conversations that resend their history reuse their KV."""

from __future__ import annotations

import asyncio
import ctypes
import functools

import httpx
import llama_cpp
import pytest
from conftest import collect_all
from serving import live_server

from parallama.memory.probes import GiB, MemoryReading, MiB
from parallama.memory.sizing import SeqLayout
from parallama.sequences import SamplingParams
from parallama.sequences.backend import BatchItem, BatchPlan

pytestmark = pytest.mark.model

GREEDY = SamplingParams(temperature=0, max_tokens=24)
FIRST = "<|im_start|>user\nName three rivers of Europe.<|im_end|>\n<|im_start|>assistant\n"


def decode_logits(backend, seq_id: int, start: int, tokens: list[int]) -> list[float]:
    """Decode ``tokens`` into ``seq_id`` from ``start``; the logits of the last one."""
    plan = BatchPlan()
    plan.add(BatchItem(seq_id, start, tokens, True))
    backend.decode(plan)
    row = llama_cpp.llama_get_logits_ith(backend.ctx, plan.logits_index[0])
    return list(ctypes.cast(row, ctypes.POINTER(ctypes.c_float * backend.facts.n_vocab)).contents)


def turn(backend, text: str) -> list[int]:
    return backend.tokenize(text, False, True)


async def two_turns(engine, backend) -> tuple[list[int], int, list[int], int]:
    """Turn 1, then turn 2 resending turn 1 with its answer: (answer 1, cached 1, answer 2, cached 2)."""
    first = backend.tokenize(FIRST, True, True)
    one = await collect_all(engine.submit(first, GREEDY))
    answer = one.token_ids[0]
    second = first + answer + turn(backend, "<|im_end|>\n<|im_start|>user\nAnd of Africa?<|im_end|>\n"
                                            "<|im_start|>assistant\n")
    two = await collect_all(engine.submit(second, GREEDY))
    return answer, one.usage.cached_tokens, two.token_ids[0], two.usage.cached_tokens


@pytest.mark.parametrize("kv_unified", [False, True], ids=["streams", "unified"])
def test_a_second_turn_reuses_the_first_and_gives_the_same_output_as_without_the_cache(make_backend, make_engine,
                                                                                       kv_unified):
    # Prompts go in 32-token chunks in both runs: llama.cpp's CPU kernels give the same rows for
    # micro-batches under 64 tokens whatever else is in them, so only the cache differs.
    results = {}
    cached_layout = SeqLayout(1, 3) if kv_unified else SeqLayout(1, slot_cache=True)
    for name, layout in (("cache", cached_layout), ("none", SeqLayout(1))):
        backend = make_backend(n_ctx=1024, n_seq_max=layout.n_seq_max, n_batch=32, kv_unified=kv_unified)
        engine = make_engine(backend, 512, layout=layout)
        results[name] = asyncio.run(two_turns(engine, backend))
    answer1, cached1, answer2, cached2 = results["cache"]
    assert cached1 == 0 and cached2 > 0
    n_first = len(make_backend(n_ctx=256, n_seq_max=1).tokenize(FIRST, True, True))
    assert cached2 == n_first + len(answer1) - 1  # the whole first turn: prompt, and answer but its last token
    assert results["none"][3] == 0
    assert (answer1, answer2) == (results["none"][0], results["none"][2])


@pytest.mark.parametrize("kv_unified", [False, True], ids=["streams", "unified"])
def test_kv_restored_from_ram_gives_the_same_logits_as_before_it_left(make_backend, kv_unified):
    backend = make_backend(n_ctx=512, n_seq_max=2, n_batch=64, kv_unified=kv_unified)
    prompt = backend.tokenize("<|im_start|>user\nWhat is a lighthouse?<|im_end|>\n<|im_start|>assistant\n", True, True)
    *head, last = prompt
    decode = functools.partial(decode_logits, backend)

    decode(0, 0, head)
    saved = backend.seq_save(0)  # what the RAM tier keeps for an evicted entry
    before = decode(0, len(head), [last])
    backend.seq_remove(0)
    backend.seq_restore(1, saved)  # back into other cells, under another seq_id
    after = decode(1, len(head), [last])
    assert after == before


def test_a_stream_copied_from_another_gives_the_same_logits_as_computing_it(make_backend):
    # With a stream per sequence, a fan-out's shared prompt and n > 1 are whole-stream copies (then trimmed):
    # the copy must hold exactly the source's cells, and nothing past the trim.
    backend = make_backend(n_ctx=1024, n_seq_max=2, n_batch=64, kv_unified=False)
    prompt = backend.tokenize("<|im_start|>user\nWhat is a lighthouse?<|im_end|>\n<|im_start|>assistant\n", True, True)
    *head, last = prompt
    decode = functools.partial(decode_logits, backend)

    decode(0, 0, prompt + prompt[:8])  # the source holds more than what is copied
    backend.seq_remove(0, len(head))
    before = decode(0, len(head), [last])
    backend.seq_copy(0, 1, len(head))
    assert llama_cpp.llama_memory_seq_pos_max(backend.memory, 1) == len(head) - 1  # trimmed to the copy
    after = decode(1, len(head), [last])
    assert after == before


def test_eight_conversations_of_five_turns_reuse_more_every_turn():
    async def conversation(client: httpx.AsyncClient, i: int) -> list[int]:
        messages = [{"role": "user", "content": f"I am user {i}. Here is my note: " + f"item {i} " * 40}]
        cached = []
        for t in range(5):
            body = {"messages": messages, "max_tokens": 16, "temperature": 0}
            response = await client.post("/v1/chat/completions", json=body)
            assert response.status_code == 200, response.text
            out = response.json()
            cached.append(out["usage"]["prompt_tokens_details"]["cached_tokens"])
            messages += [{"role": "assistant", "content": out["choices"][0]["message"]["content"]},
                         {"role": "user", "content": f"Question {t + 2}: say more."}]
        return cached

    async def main(base_url: str) -> list[list[int]]:
        async with httpx.AsyncClient(base_url=base_url, timeout=300) as client:
            return await asyncio.gather(*(conversation(client, i) for i in range(8)))

    with live_server(parallel=4, ctx_size=1024) as server:
        per_user = asyncio.run(main(server.base_url))
        status = httpx.get(f"{server.base_url}/status", timeout=30).json()
    for cached in per_user:
        assert all(later > earlier for earlier, later in zip(cached, cached[1:])), cached
    assert status["prefix_cache"]["hits"] >= 8 * 4
    assert status["kv"]["cells_used"] == 0 and status["sequences"]["active"] == 0


class SqueezableMemory:
    """Scripted free memory that also counts the prefix cache's RAM tier as used, as real RAM is."""

    def __init__(self) -> None:
        self.squeeze = 0
        self.engine = None

    def ram_tier(self) -> int:
        return self.engine.scheduler.cache_ram_bytes() if self.engine is not None else 0

    def read(self) -> MemoryReading:
        return MemoryReading(host_available=8 * GiB - self.squeeze - self.ram_tier(), host_total=16 * GiB)


def test_a_memory_squeeze_empties_the_cache_ram_before_touching_running_sequences():
    memory = SqueezableMemory()
    with live_server(probe=memory, parallel=2, ctx_size=512, kv_size=1024, cache_ram="256MiB",
                     memory_reserve="1GiB", memory_check_interval=0.05) as server:
        memory.engine = server.served.engine
        base = server.base_url
        for i in range(10):  # more conversations than the 2 slots' streams hold: the oldest go to RAM
            body = {"prompt": f"Conversation {i}: " + "tell me more " * 30, "max_tokens": 4, "temperature": 0}
            assert httpx.post(f"{base}/v1/completions", json=body, timeout=120).status_code == 200
        before = httpx.get(f"{base}/status", timeout=30).json()
        assert before["prefix_cache"]["ram"]["bytes"] > 0

        async def squeeze_while_streaming() -> list[str]:
            async with httpx.AsyncClient(base_url=base, timeout=300) as client:
                body = {"prompt": "Once upon a time", "max_tokens": 200, "temperature": 0, "stream": True,
                        "logit_bias": {"0": -100, "2": -100}}
                async with client.stream("POST", "/v1/completions", json=body) as response:
                    lines = response.aiter_lines()
                    assert (await anext(lines)).startswith("data: {")  # it is generating
                    # Below the reserve by less than the RAM tier holds: giving that back is enough.
                    memory.squeeze = 7 * GiB - before["prefix_cache"]["ram"]["bytes"] // 2
                    return [line async for line in lines if line]

        streamed = asyncio.run(squeeze_while_streaming())
        assert streamed[-1] == "data: [DONE]" and '"finish_reason":"length"' in streamed[-2]
        after = httpx.get(f"{base}/status", timeout=30).json()
    assert after["prefix_cache"]["ram"]["bytes"] == 0
    assert after["degradation"]["cache_ram_releases"] >= 1
    assert after["degradation"]["preemptions"] == 0 and after["degradation"]["resizes"] == 0
    assert after["kv"]["cells_total"] == before["kv"]["cells_total"]
