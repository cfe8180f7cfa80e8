"""The engine over the real model (SmolLM2-135M through LlamaBackend): batching, fairness, freeing,
UTF-8 and determinism.

About "alone == batched at temperature 0" on this CPU build of llama.cpp: a sequence's logits are
bit-identical whatever else shares its batch *as long as* (a) every decode carries fewer than 64
tokens: at 64 query rows and more, ggml's CPU flash attention switches to its tiled kernel
(GGML_FA_TILE_Q = 64), which keeps Q in f32 where the one-chunk kernel rounds it to f16, so the same
row comes out different; and (b) the sequence's KV cells stay in position order: the one-chunk
kernel accumulates V in f16 in cell order, and once a finished sequence frees cells llama.cpp's
find_slot reuses those holes, so a running sequence's later tokens can land in cells before its
earlier ones. Either changes logits by ~0.7 and greedy output diverges within a few tokens.
``test_temperature_zero_output_is_the_same_alone_and_batched`` therefore batches short prompts
(< 64 tokens in all) that all run to the same length; ``test_batch_rows_are_independent`` checks
the batch building itself bit for bit. For the same reason a preemption (which frees cells) may
change the later tokens of the *other* sequences; the parked one is restored bit for bit
(``test_parked_kv_is_restored_bit_for_bit_under_another_seq_id``).
"""

from __future__ import annotations

import asyncio
import math

import llama_cpp
import numpy as np
import pytest
from conftest import collect, collect_all, record_plans, run

from parallama.sequences import BatchItem, BatchPlan, DecodeOutcome, SamplingParams
from parallama.batching.detokenizer import IncrementalDetokenizer

pytestmark = pytest.mark.model


def chat(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


def chat_tokens(backend, text: str) -> list[int]:
    return backend.tokenize(chat(text), add_special=True, parse_special=True)


@pytest.fixture(scope="module")
def no_eog(llama_model) -> tuple[tuple[int, float], ...]:
    """A logit_bias that bans every end-of-generation token: the request runs to max_tokens."""
    eog = [t for t in range(llama_model.n_vocab) if llama_model.is_eog(t)]
    assert eog
    return tuple((t, float("-inf")) for t in eog)


def kv_is_empty(backend) -> bool:
    """Ask llama.cpp itself: no seq_id holds a cell."""
    return all(llama_cpp.llama_memory_seq_pos_max(backend.memory, s) == -1 for s in range(backend.n_seq_max))


def output_tokens(backend, collected, index: int = 0) -> list[int]:
    return [t for t in collected.token_ids[index] if not backend.is_eog(t)]


def _logits(backend, row: int) -> np.ndarray:
    ptr = llama_cpp.llama_get_logits_ith(backend.ctx, row)
    return np.ctypeslib.as_array(ptr, shape=(backend.facts.n_vocab,)).copy()


def _decode_one(backend, seq_id: int, start: int, tokens: list[int]) -> np.ndarray:
    plan = BatchPlan()
    plan.add(BatchItem(seq_id, start, tokens, True))
    assert backend.decode(plan) is DecodeOutcome.OK
    return _logits(backend, plan.logits_index[0])


def _is_whole_utf8(piece: bytes) -> bool:
    try:
        piece.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


# --- batching -------------------------------------------------------------------------------------------
def test_eight_requests_at_once_all_finish_with_usage(make_backend, make_engine):
    backend = make_backend(n_ctx=2048, n_seq_max=8, n_batch=256)
    plans = record_plans(backend)
    engine = make_engine(backend, 512, start=False)
    prompts = [chat_tokens(backend, f"Tell me about number {i}.") for i in range(8)]

    async def main():
        streams = [engine.submit(p, SamplingParams(temperature=0.0, max_tokens=16)) for p in prompts]
        engine.start()  # every request is queued before the first step: all 8 are admitted together
        results = await asyncio.gather(*(collect_all(s) for s in streams))
        return results, await engine.status()

    results, status = run(main())
    for prompt, result in zip(prompts, results):
        assert result.error is None
        assert result.finish_reasons[0] in ("stop", "length")
        out = output_tokens(backend, result)
        assert result.usage.prompt_tokens == len(prompt)
        assert result.usage.completion_tokens == len(out)
        assert 1 <= len(out) <= 16
        if result.finish_reasons[0] == "length":
            assert len(out) == 16
        assert result.texts[0].strip()
    assert [len(p.items) for p in plans[:1]] == [8]  # all eight prompts went into the first decode
    assert (status.scheduler.running, status.queued, status.scheduler.cells_used) == (0, 0, 0)
    assert kv_is_empty(backend)


def test_exactly_one_llama_decode_per_step(make_backend, make_engine):
    backend = make_backend(n_ctx=2048, n_seq_max=4, n_batch=64)
    plans = record_plans(backend)
    engine = make_engine(backend, 512, start=False)
    prompts = [chat_tokens(backend, q) for q in ("Name a color.", "Count to five.", "What is rain?",
                                                 "Say hi.", "Name a fruit.", "What is snow?")]

    async def main():
        streams = [engine.submit(p, SamplingParams(temperature=0.0, max_tokens=6 + 3 * i))
                   for i, p in enumerate(prompts)]
        engine.start()
        return await asyncio.gather(*(collect_all(s) for s in streams))

    results = run(main())
    assert backend.decode_calls == engine.scheduler.num_steps == len(plans)
    assert max(len(p.items) for p in plans) >= 3  # several sequences really shared decodes
    assert all(p.num_tokens <= 64 for p in plans)
    assert all(p.outcome is DecodeOutcome.OK for p in plans)
    # every sampled token came from exactly one logits row of one decode
    sampled_rows = sum(item[3] for p in plans for item in p.items)
    assert sampled_rows == sum(len(r.token_ids[0]) for r in results)


def test_batch_rows_are_independent(make_backend):
    """A prompt's logits, and a decode token's, are bit-identical alone and among other sequences
    (fewer than 64 tokens per decode; see the module docstring). This checks the batch LlamaBackend
    fills: each row's seq_id, position and logits flag."""
    alone_backend = make_backend(n_ctx=256, n_seq_max=4, n_batch=64)
    batch_backend = make_backend(n_ctx=256, n_seq_max=4, n_batch=64)
    a, b, c = (chat_tokens(alone_backend, q) for q in ("Write a haiku.", "What is 2+2?", "Describe a cat."))
    assert len(a) + len(b) + len(c) < 64

    def decode(backend, *items: BatchItem) -> list[np.ndarray | None]:
        plan = BatchPlan()
        for item in items:
            plan.add(item)
        assert backend.decode(plan) is DecodeOutcome.OK
        return [_logits(backend, row) if item.wants_logits else None
                for item, row in zip(plan.items, plan.logits_index)]

    alone = decode(alone_backend, BatchItem(0, 0, b, True))[0]
    next_token = int(alone.argmax())
    alone_next = decode(alone_backend, BatchItem(0, len(b), [next_token], True))[0]

    batched = decode(batch_backend, BatchItem(1, 0, a, True), BatchItem(2, 0, b, True), BatchItem(3, 0, c, False))
    assert batched[2] is None
    assert np.array_equal(batched[1], alone)
    assert not np.array_equal(batched[0], batched[1])  # the rows really are different sequences
    batched_next = decode(batch_backend, BatchItem(1, len(a), [7], True), BatchItem(2, len(b), [next_token], True),
                          BatchItem(3, len(c), [9], True))
    assert np.array_equal(batched_next[1], alone_next)


def test_temperature_zero_output_is_the_same_alone_and_batched(make_backend, make_engine, no_eog):
    backend = make_backend(n_ctx=1024, n_seq_max=8, n_batch=256)
    plans = record_plans(backend)
    engine = make_engine(backend, 512, start=False)
    texts = ["The capital of France is", "My favourite fruit is", "Once upon a time",
             "The sky is blue because", "def fibonacci(n):", "Water boils at"]
    prompts = [backend.tokenize(t) for t in texts]
    assert sum(map(len, prompts)) < 64  # one first decode, on the kernel single decodes use
    params = SamplingParams(temperature=0.0, max_tokens=24, logit_bias=no_eog)  # all finish together

    async def together():
        streams = [engine.submit(p, params) for p in prompts]
        engine.start()
        return await asyncio.gather(*(collect_all(s) for s in streams))

    async def alone():
        return [await collect_all(engine.submit(p, params)) for p in prompts]

    batched = run(together())
    assert len(plans[0].items) == len(prompts) and len(plans[1].items) == len(prompts)
    single = run(alone())
    for text, b, s in zip(texts, batched, single):
        assert b.token_ids[0] == s.token_ids[0], text
        assert len(b.token_ids[0]) == 24


# --- fairness: a long prompt does not stall generating sequences -------------------------------------------
def test_long_prompt_does_not_stall_generating_sequences(make_backend, make_engine, no_eog):
    n_batch = 256
    backend = make_backend(n_ctx=2048, n_seq_max=8, n_batch=n_batch)
    plans = record_plans(backend)
    engine = make_engine(backend, 2048, start=False)
    long_prompt = backend.tokenize("The quick brown fox jumps over the lazy dog near the river bank. " * 110)
    long_prompt = long_prompt[:1500]
    assert len(long_prompt) == 1500
    gen_params = SamplingParams(temperature=0.0, max_tokens=40, logit_bias=no_eog)
    log: list[str] = []  # stream names, in the order their events arrived

    async def consume(name, stream):
        return await collect_all(stream, on_event=lambda event: log.append(name))

    async def main():
        gens = [engine.submit(chat_tokens(backend, f"Tell me a story about {w}."), gen_params)
                for w in ("cats", "ships", "trees", "stars")]
        engine.start()
        tasks = [asyncio.create_task(consume(f"g{i}", s)) for i, s in enumerate(gens)]
        for _ in range(10_000):  # until every generating stream has its first token
            if all(f"g{i}" in log for i in range(4)):
                break
            await asyncio.sleep(0.001)
        mark = len(log)
        long = engine.submit(long_prompt, SamplingParams(temperature=0.0, max_tokens=4))
        long_result = await consume("long", long)
        return mark, long_result, await asyncio.gather(*tasks)

    mark, long_result, gen_results = run(main())
    assert long_result.usage.prompt_tokens == 1500
    assert all(r.usage.completion_tokens == 40 for r in gen_results)

    gen_ids = {item[0] for item in plans[0].items}
    assert len(gen_ids) == 4
    long_steps = [p for p in plans if any(item[0] not in gen_ids and item[1] < len(long_prompt) for item in p.items)]
    # the long prompt went in n_batch-sized chunks, each sharing its decode with all 4 generating tokens
    assert len(long_steps) == math.ceil(1500 / (n_batch - 4))
    for plan in long_steps:
        assert plan.num_tokens <= n_batch
        decodes = plan.items[:4]
        assert {item[0] for item in decodes} == gen_ids, "every generating sequence is in every step"
        assert all(item[2] == 1 and item[3] for item in decodes), "and comes first, one token each"
    # seen from the streams: each generating stream received tokens while the long prompt prefilled
    first_long = log.index("long")
    between = log[mark:first_long]
    for i in range(4):
        assert between.count(f"g{i}") >= 2


# --- UTF-8 ---------------------------------------------------------------------------------------------------
def test_tokenized_emoji_and_cjk_detokenize_exactly(make_backend):
    backend = make_backend(n_ctx=256, n_seq_max=1)
    text = "héllo 👋 世界 🌍 日本語"
    tokens = backend.tokenize(text, add_special=False)
    assert not all(_is_whole_utf8(backend.token_bytes(t)) for t in tokens)  # characters really are split
    detok = IncrementalDetokenizer(backend.token_bytes)
    deltas = [detok.add(t) for t in tokens]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + detok.flush() == text


def test_generated_multibyte_text_streams_without_replacement_characters(make_backend, make_engine):
    backend = make_backend(n_ctx=512, n_seq_max=1)
    engine = make_engine(backend, 512)
    prompt = chat_tokens(backend, "Repeat exactly: 世界你好 👋🌍")

    async def main():
        return await collect_all(engine.submit(prompt, SamplingParams(temperature=0.0, max_tokens=64)))

    result = run(main())
    assert result.finish_reasons[0] == "stop"  # ended on its own, not cut inside a character
    out = output_tokens(backend, result)
    pieces = [backend.token_bytes(t) for t in out]
    split = [p for p in pieces if p and not _is_whole_utf8(p)]
    assert split, "the reply should contain characters split across tokens"
    assert all("\ufffd" not in e.text for e in result.events)
    assert result.texts[0] == b"".join(pieces).decode("utf-8")
    assert any(ord(ch) > 0x2E80 for ch in result.texts[0])


# --- cancelling ------------------------------------------------------------------------------------------------
def test_leaving_the_stream_early_cancels_and_frees_the_sequence(make_backend, make_engine, no_eog):
    backend = make_backend(n_ctx=1024, n_seq_max=2)
    engine = make_engine(backend, 1024)
    prompt = chat_tokens(backend, "Tell me a very long story.")

    async def main():
        stream = engine.submit(prompt, SamplingParams(temperature=0.0, max_tokens=500, logit_bias=no_eog))
        received = 0
        async with stream:
            async for _event in stream:
                received += 1
                if received == 3:
                    break
        status = await engine.status()  # queued behind the cancel
        final = None
        if status.scheduler.running:
            return status, final  # not cancelled: fail now rather than read 500 tokens
        for _ in range(1000):
            event = await asyncio.wait_for(stream.queue.get(), 60)
            if event.usage is not None:
                final = event
                break
        return status, final

    status, final = run(main())
    assert (status.scheduler.running, status.scheduler.cells_used, status.queued) == (0, 0, 0)
    assert kv_is_empty(backend)
    assert final is not None and final.finish_reason == "cancelled"
    assert 3 <= final.usage.completion_tokens < 500
    assert not engine.scheduler.requests


def test_cancelling_a_queued_request(make_backend, make_engine, no_eog):
    backend = make_backend(n_ctx=1024, n_seq_max=1)
    engine = make_engine(backend, 1024)

    async def main():
        running = engine.submit(chat_tokens(backend, "Count to ten."),
                                SamplingParams(temperature=0.0, max_tokens=12, logit_bias=no_eog))
        queued = engine.submit(chat_tokens(backend, "Count to five."), SamplingParams(max_tokens=12))
        queued.cancel()
        collected = await collect_all(running)
        return collected, await engine.status(), await queued.queue.get()

    collected, status, final = run(main())
    assert collected.usage.completion_tokens == 12
    assert final.finish_reason == "cancelled" and final.usage.completion_tokens == 0
    assert (status.scheduler.running, status.queued, status.scheduler.cells_used) == (0, 0, 0)
    assert engine.num_queued == 0


# --- KV pressure on the real cache --------------------------------------------------------------------------
def test_kv_pressure_preempts_and_every_request_finishes(make_backend, make_engine, no_eog):
    backend = make_backend(n_ctx=256, n_seq_max=4, n_batch=256)
    plans = record_plans(backend)
    engine = make_engine(backend, 256, start=False)
    prompts = [chat_tokens(backend, f"Tell me a story about number {i}.") for i in range(4)]
    assert 4 * (len(prompts[0]) + 60) > backend.n_ctx  # they cannot all finish side by side

    async def main():
        streams = [engine.submit(p, SamplingParams(temperature=0.0, max_tokens=60, logit_bias=no_eog))
                   for p in prompts]
        engine.start()
        return await asyncio.gather(*(collect_all(s) for s in streams)), await engine.status()

    results, status = run(main())
    assert any(p.outcome is DecodeOutcome.NO_KV_SLOT for p in plans)  # llama_decode really returned 1
    assert status.scheduler.preemptions > 0
    assert all(r.usage.completion_tokens == 60 and r.finish_reasons == ["length"] for r in results)
    assert status.scheduler.cells_used == 0 and kv_is_empty(backend)


def test_sequence_larger_than_the_cache_ends_with_length(make_backend, make_engine, no_eog):
    backend = make_backend(n_ctx=256, n_seq_max=1, n_batch=256)
    engine = make_engine(backend, 4096)
    prompt = backend.tokenize("Tell me a long story about the sea and the ships on it. " * 20)[:200]
    assert backend.n_ctx == 256 and len(prompt) == 200

    async def main():
        return await collect_all(engine.submit(prompt, SamplingParams(temperature=0.0, max_tokens=1000,
                                                                      logit_bias=no_eog)))

    result = run(main())
    assert result.finish_reasons == ["length"]
    # every cell filled (prompt + decoded tokens), plus the last sampled token that found no cell
    assert result.usage.completion_tokens == backend.n_ctx - len(prompt) + 1
    assert kv_is_empty(backend)


def test_parked_kv_is_restored_bit_for_bit_under_another_seq_id(make_backend):
    """What preemption relies on: seq_save, seq_remove, then seq_restore into the seq_id the
    sequence gets when it resumes, and the next token's logits are exactly those it would have had."""
    reference, parked = make_backend(n_ctx=256, n_seq_max=3), make_backend(n_ctx=256, n_seq_max=3)
    prompt = chat_tokens(reference, "Write a haiku about the sea.")
    first = _decode_one(reference, 0, 0, prompt)
    token = int(first.argmax())
    expected = _decode_one(reference, 0, len(prompt), [token])

    assert np.array_equal(_decode_one(parked, 0, 0, prompt), first)
    data = parked.seq_save(0)
    parked.seq_remove(0)
    assert kv_is_empty(parked)
    parked.seq_restore(2, data)
    assert llama_cpp.llama_memory_seq_pos_max(parked.memory, 2) == len(prompt) - 1
    assert llama_cpp.llama_memory_seq_pos_max(parked.memory, 0) == -1
    assert np.array_equal(_decode_one(parked, 2, len(prompt), [token]), expected)


def test_restoring_more_kv_than_is_free_raises_and_changes_nothing(make_backend):
    from parallama.sequences.backend import BackendError

    backend = make_backend(n_ctx=256, n_seq_max=2)
    tokens = backend.tokenize("The sea is wide and the ships are small. " * 30)[:200]
    _decode_one(backend, 0, 0, tokens)
    data = backend.seq_save(0)  # 200 cells' worth; 56 are free
    with pytest.raises(BackendError):
        backend.seq_restore(1, data)
    assert llama_cpp.llama_memory_seq_pos_max(backend.memory, 1) == -1
    assert llama_cpp.llama_memory_seq_pos_max(backend.memory, 0) == 199


# --- sampling seeds --------------------------------------------------------------------------------------------
def test_same_seed_same_text_other_seeds_differ(make_backend, make_engine):
    backend = make_backend(n_ctx=1024, n_seq_max=2)
    engine = make_engine(backend, 1024)
    prompt = chat_tokens(backend, "Write a short poem about the sea.")

    def params(seed: int) -> SamplingParams:
        return SamplingParams(temperature=0.8, seed=seed, max_tokens=24)

    async def main():
        return [(await collect(engine.submit(prompt, params(seed))))[0] for seed in (42, 42, 43, 44, 45)]

    first, again, *others = run(main())
    assert first == again
    assert any(text != first for text in others)


@pytest.mark.model
def test_every_sampler_option_builds_and_samples(make_backend):
    """Each link of the sampler chain reaches llama.cpp with the arguments its binding expects."""
    from parallama.sequences import BatchItem, BatchPlan, SamplingParams

    backend = make_backend(n_ctx=256, n_seq_max=1, n_batch=64)
    prompt = backend.tokenize("Once upon a time", True, True)
    plan = BatchPlan()
    plan.add(BatchItem(0, 0, prompt, True))
    backend.decode(plan)
    params = SamplingParams(temperature=0.7, top_k=40, top_p=0.9, min_p=0.05, seed=3, repeat_penalty=1.1,
                            presence_penalty=0.5, frequency_penalty=0.5, logit_bias=((42, 5.0),))
    for p in (params, SamplingParams(temperature=0, presence_penalty=1.0, logit_bias=((13, -100.0),))):
        sampler = backend.new_sampler(p)
        token = sampler.sample(plan.logits_index[0])
        assert 0 <= token < backend.facts.n_vocab
        sampler.close()
