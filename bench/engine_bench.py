"""Engine throughput against the raw llama.cpp decode loop, at 1 to 16 concurrent sequences.

Run from the repository root:

    .venv/bin/python bench/engine_bench.py [--concurrency 1,2,4,8,16] [--max-tokens 32] [--repeats 4]

For each concurrency N, N sequences (each with its own chat prompt, greedy sampling) are generated
twice over the same model and the same context parameters: once through the parallama Engine
(scheduler, worker thread, asyncio streams) and once by a plain loop on the llama_cpp bindings
(llama_batch, llama_decode, a greedy llama_sampler chain) with no scheduler. Both measure wall time
from the first submit (raw: the first prefill decode) to the last sequence finished, prefill
included, and count the tokens actually generated. End-of-generation tokens are banned with a logit
bias in both by default (--allow-eos turns that off) so every sequence runs to --max-tokens.
Every run gets a context of its own (the engine run a fresh LlamaBackend and Engine), a warm-up
and then the timed generation, decoding on a thread that exits when the run ends: the raw loop on a
fresh thread, the engine on its worker thread, which engine.shutdown() joins; the main thread never
decodes. llama.cpp's OpenMP CPU backend gives every thread that calls llama_decode its own thread
team, and once two such threads are alive in one process every decode there slows down ~3.5x on
2 cores, so at most one is alive at any time. Only the model stays loaded throughout.
Each repeat visits every concurrency in turn and runs raw and engine back to back (raw first, then
engine first, ...). Each throughput is the best of --repeats runs, since other load only slows a
run down; engine/raw is also given as the median of the back-to-back pairs' ratios. Progress goes
to stderr, the JSON report to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import llama_cpp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout, installed or not

from parallama.batching import Engine, EngineConfig  # noqa: E402
from parallama.sequences import SamplingParams  # noqa: E402
from parallama.sequences.config import ContextConfig, ModelConfig, use_flash_attn  # noqa: E402
from parallama.sequences.llama_backend import LlamaBackend, context_params  # noqa: E402
from parallama.sequences.model import LlamaModel  # noqa: E402
from parallama.sequences.model_file import resolve_model_path  # noqa: E402

TOPICS = [
    "a lighthouse keeper", "a lost robot", "a dragon who hates fire", "a city under the sea",
    "a clockmaker", "the last tree on Mars", "a talking cat", "a haunted library",
    "a chess prodigy", "a time-travelling baker", "a river that flows uphill", "a shy giant",
    "a pirate astronomer", "a forgotten toy", "a snowman in summer", "a detective owl",
]
TIMING = ("tok_s: generated tokens / wall time from first submit (raw: first prefill decode) to last finish, "
          "prefill included; decode_tok_s: tokens after every sequence had its first token / that window")
THREADS = ("every run decodes on its own short-lived thread (raw: a fresh thread; engine: a fresh engine's worker), "
           "so at most one thread that has called llama_decode is alive at a time: llama.cpp's OpenMP CPU backend "
           "gives each such thread its own thread team, and two teams on the same cores slow every decode ~3.5x")


@dataclass
class Run:
    outputs: list[list[int]]  # generated token ids of each sequence
    stamps: list[list[float]]  # when each of those tokens was sampled (raw) or received (engine), from start
    finish: list[float]  # when each sequence finished, from start

    @property
    def tokens(self) -> int:
        return sum(map(len, self.outputs))

    @property
    def tok_s(self) -> float:
        """Tokens generated / wall time from start to the last finish (prefill included)."""
        return self.tokens / max(self.finish)

    @property
    def per_seq_tok_s(self) -> float:
        return statistics.mean(len(o) / f for o, f in zip(self.outputs, self.finish))

    @property
    def decode_tok_s(self) -> float:
        """Steady state: tokens generated after every sequence had its first one, over that window."""
        start = max(s[0] for s in self.stamps if s)
        n = sum(t > start for s in self.stamps for t in s)
        end = max(self.finish)
        return n / (end - start) if end > start else float("nan")


# --- setup ------------------------------------------------------------------------------------
def make_prompts(model: LlamaModel, n: int) -> list[list[int]]:
    texts = [f"<|im_start|>user\nTell me a story about {TOPICS[i % len(TOPICS)]}"
             f"{'' if i < len(TOPICS) else f' (part {i // len(TOPICS) + 1})'}.<|im_end|>\n"
             "<|im_start|>assistant\n" for i in range(n)]
    return [model.tokenize(t, add_special=True, parse_special=True) for t in texts]


def eog_tokens(model: LlamaModel) -> list[int]:
    return [t for t in range(model.n_vocab) if model.is_eog(t)]


def context_config(args: argparse.Namespace, prompts: list[list[int]]) -> tuple[ContextConfig, int]:
    """The same context for engine and raw: n_seq_max = N, cells = N x (prompt + max_tokens + margin)."""
    per_seq = max(map(len, prompts)) + args.max_tokens + args.margin
    n = len(prompts)
    # flash attention as `parallama serve` picks it for this model on the CPU (streams, f16 cache)
    return ContextConfig(n_ctx=n * per_seq, n_seq_max=n, n_batch=args.n_batch, n_threads=args.threads,
                         flash_attn=use_flash_attn("auto", True, False, "f16")), per_seq


# --- the raw loop -----------------------------------------------------------------------------
def open_raw_context(model: LlamaModel, config: ContextConfig):
    """Exactly the context LlamaBackend._open builds."""
    ctx = llama_cpp.llama_init_from_model(model.ptr, context_params(config))
    if not ctx:
        raise RuntimeError("could not create the raw context")
    return ctx


def greedy_chain(n_vocab: int, banned: list[int]):
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    if banned:
        biases = (llama_cpp.llama_logit_bias * len(banned))(*[(t, float("-inf")) for t in banned])
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(banned), biases))
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
    return chain


def fill_batch(batch, items: list[tuple[int, int, list[int]]]) -> list[int]:
    """items: (seq_id, start_pos, tokens); logits on each item's last token. Returns those rows."""
    i, rows = 0, []
    for seq_id, pos, tokens in items:
        for t in tokens:
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, pos, 1, 0
            batch.seq_id[i][0] = seq_id
            i, pos = i + 1, pos + 1
        batch.logits[i - 1] = 1
        rows.append(i - 1)
    batch.n_tokens = i
    return rows


def pack(prompts: list[list[int]], n_batch: int) -> list[list[int]]:
    """Group whole prompts (by index) into decodes of at most n_batch tokens."""
    groups, size = [[]], 0
    for i, p in enumerate(prompts):
        if size + len(p) > n_batch and groups[-1]:
            groups, size = groups + [[]], 0
        groups[-1].append(i)
        size += len(p)
    return groups


def raw_run(model: LlamaModel, ctx, batch, prompts: list[list[int]], max_tokens: int, banned: list[int],
            n_batch: int) -> Run:
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
    n = len(prompts)
    t0 = time.perf_counter()
    chains = [greedy_chain(model.n_vocab, banned) for _ in prompts]
    outputs: list[list[int]] = [[] for _ in prompts]
    stamps: list[list[float]] = [[] for _ in prompts]
    finish = [0.0] * n

    def step(items: list[tuple[int, int, list[int]]]) -> None:
        rows = fill_batch(batch, items)
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise RuntimeError("raw llama_decode failed")
        for (i, _, _), row in zip(items, rows):
            token = llama_cpp.llama_sampler_sample(chains[i], ctx, row)
            now = time.perf_counter() - t0
            if not model.is_eog(token):
                outputs[i].append(token)
                stamps[i].append(now)
            if model.is_eog(token) or len(outputs[i]) >= max_tokens:
                finish[i] = now

    for group in pack(prompts, n_batch):
        step([(i, 0, prompts[i]) for i in group])
    while live := [i for i in range(n) if not finish[i]]:
        step([(i, len(prompts[i]) + len(outputs[i]) - 1, outputs[i][-1:]) for i in live])
    for chain in chains:
        llama_cpp.llama_sampler_free(chain)
    return Run(outputs, stamps, finish)


# --- the engine -------------------------------------------------------------------------------
async def engine_run(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> Run:
    t0 = time.perf_counter()

    async def one(prompt: list[int]) -> tuple[list[int], list[float], float]:
        tokens: list[int] = []
        stamps: list[float] = []
        async with engine.submit(prompt, params) as stream:
            async for event in stream:
                now = time.perf_counter() - t0
                tokens += event.token_ids
                stamps += [now] * len(event.token_ids)
                if event.usage is not None:  # the final event may carry the EOG token: not counted
                    n = event.usage.completion_tokens
                    return tokens[:n], stamps[:n], now
        raise RuntimeError("stream ended without usage")

    results = await asyncio.gather(*(one(p) for p in prompts))
    return Run(*(list(x) for x in zip(*results)))


# --- one measurement: fresh context, fresh decoding thread ----------------------------------
def on_fresh_thread(fn: Callable[[], Run]) -> Run:
    """Run fn on a new thread and wait until that thread has exited (taking its OpenMP team along)."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-raw") as pool:
        return pool.submit(fn).result()


def raw_measure(model: LlamaModel, config: ContextConfig, prompts: list[list[int]], max_tokens: int,
                banned: list[int]) -> Run:
    """A raw context for this run only; a warm-up then the timed run, both on one fresh thread."""
    ctx = open_raw_context(model, config)
    batch = llama_cpp.llama_batch_init(config.n_batch, 0, 1)

    def warm_up_then_time() -> Run:
        raw_run(model, ctx, batch, prompts[:1], 2, banned, config.n_batch)
        return raw_run(model, ctx, batch, prompts, max_tokens, banned, config.n_batch)

    try:
        return on_fresh_thread(warm_up_then_time)
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)


def engine_measure(model: LlamaModel, config: ContextConfig, per_seq_cells: int, prompts: list[list[int]],
                   params: SamplingParams) -> Run:
    """An engine (and backend) for this run only; a warm-up then the timed run; its worker exits after."""
    backend = LlamaBackend(model, config)
    engine = Engine(backend, EngineConfig(ctx_size=per_seq_cells))
    engine.start()
    try:
        asyncio.run(engine_run(engine, prompts[:1], replace(params, max_tokens=2)))
        return asyncio.run(engine_run(engine, prompts, params))
    finally:
        engine.shutdown()
        backend.close()


class Setup:
    """The prompts and context parameters for N sequences, shared by every raw and engine run at N."""

    def __init__(self, model: LlamaModel, args: argparse.Namespace, n: int, banned: list[int]) -> None:
        self.model, self.args, self.n, self.banned = model, args, n, banned
        self.prompts = make_prompts(model, n)
        self.config, self.per_seq_cells = context_config(args, self.prompts)
        self.params = SamplingParams(temperature=0, max_tokens=args.max_tokens,
                                     logit_bias=tuple((t, float("-inf")) for t in banned))
        self.pairs: list[tuple[Run, Run]] = []

    def pair(self, engine_first: bool) -> tuple[Run, Run]:
        """One raw run and one engine run, back to back, each with its own context and decoding thread."""
        run_engine = lambda: engine_measure(self.model, self.config, self.per_seq_cells,  # noqa: E731
                                            self.prompts, self.params)
        run_raw = lambda: raw_measure(self.model, self.config, self.prompts,  # noqa: E731
                                      self.args.max_tokens, self.banned)
        if engine_first:
            eng = run_engine()
            return run_raw(), eng
        raw = run_raw()
        return raw, run_engine()

    def repeat(self, k: int) -> None:
        self.pairs.append(self.pair(engine_first=k % 2 == 1))


def measure_all(model: LlamaModel, args: argparse.Namespace, banned: list[int]) -> list[dict]:
    """Round-robin over the concurrencies in each repeat, so that a noisy spell hits all of them."""
    setups = [Setup(model, args, int(n), banned) for n in args.concurrency.split(",")]
    started = time.perf_counter()
    for k in range(args.repeats):
        for setup in setups:
            setup.repeat(k)
            raw, eng = setup.pairs[-1]
            print(f"repeat {k + 1} n_seq={setup.n}: engine {eng.tok_s:.1f} tok/s, raw {raw.tok_s:.1f} tok/s, "
                  f"{time.perf_counter() - started:.0f}s", file=sys.stderr)
    return [summarize(s.n, s.config, s.prompts, s.pairs) for s in setups]


def stats(runs: list[Run]) -> dict:
    """Best of the repeats: other load on the machine only ever slows a run down."""
    best = lambda key: round(max(getattr(r, key) for r in runs), 1)  # noqa: E731
    return {
        "tok_s": best("tok_s"),
        "per_seq_tok_s": best("per_seq_tok_s"),
        "decode_tok_s": best("decode_tok_s"),
        "tokens": runs[0].tokens,
        "tok_s_each": [round(r.tok_s, 1) for r in runs],
    }


def summarize(n: int, config: ContextConfig, prompts: list[list[int]], pairs: list[tuple[Run, Run]]) -> dict:
    raw, engine = stats([p[0] for p in pairs]), stats([p[1] for p in pairs])
    last_raw, last_engine = pairs[-1]
    same = sum(a == b for a, b in zip(last_raw.outputs, last_engine.outputs))
    return {
        "n_seq": n,
        "n_ctx": config.n_ctx,
        "prompt_tokens": sum(map(len, prompts)),
        "raw": raw,
        "engine": engine,
        "engine_over_raw": round(engine["tok_s"] / raw["tok_s"], 3),
        "engine_over_raw_paired_median": round(statistics.median(e.tok_s / r.tok_s for r, e in pairs), 3),
        "decode_engine_over_raw": round(engine["decode_tok_s"] / raw["decode_tok_s"], 3),
        "identical_outputs": f"{same}/{n}",
    }


# --- report -----------------------------------------------------------------------------------
def add_scaling(rows: list[dict]) -> None:
    """engine(N)/engine(1) and raw(N)/raw(1), end to end and steady-state decode."""
    base = next((r for r in rows if r["n_seq"] == 1), None)
    for row in rows:
        for kind in ("engine", "raw"):
            for key, label in (("tok_s", ""), ("decode_tok_s", "decode_")):
                ratio = row[kind][key] / base[kind][key] if base else None
                row[f"{label}{kind}_over_{kind}1"] = round(ratio, 3) if ratio else None


def targets(rows: list[dict]) -> dict:
    row = next((r for r in rows if r["n_seq"] == 8), None)
    if row is None or row["engine_over_engine1"] is None:
        return {"note": "needs n_seq 1 and 8 in --concurrency"}
    return {
        "n_seq": 8,
        "engine_over_raw": row["engine_over_raw"],
        "engine_over_raw_ok (>= 0.90)": row["engine_over_raw"] >= 0.90,
        "engine_over_raw_paired_median": row["engine_over_raw_paired_median"],
        "engine8_over_engine1": row["engine_over_engine1"],
        "engine8_over_engine1_ok (>= 1.3)": row["engine_over_engine1"] >= 1.3,
        "decode_engine_over_raw": row["decode_engine_over_raw"],
        "decode_engine8_over_engine1": row["decode_engine_over_engine1"],
    }


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", default="1,2,4,8,16", help="comma-separated sequence counts")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens generated per sequence")
    ap.add_argument("--repeats", type=int, default=4, help="measured runs per concurrency (best is kept)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-batch", type=int, default=512)
    ap.add_argument("--margin", type=int, default=16, help="spare KV cells per sequence")
    ap.add_argument("--allow-eos", action="store_true", help="let sequences stop at end-of-generation")
    ap.add_argument("--model", default=None, help="GGUF path (default: the embedded SmolLM2-135M; prompts are ChatML)")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    model = LlamaModel(ModelConfig(str(resolve_model_path(args.model))))
    banned = [] if args.allow_eos else eog_tokens(model)
    rows = measure_all(model, args, banned)
    add_scaling(rows)
    report = {
        "model": model.facts().name, "n_threads": args.threads, "max_tokens": args.max_tokens,
        "repeats": args.repeats, "eog_banned": not args.allow_eos, "timing": TIMING, "threads": THREADS,
        "stat": "best of repeats; *_paired_median: median over repeats of engine/raw in back-to-back runs",
        "results": rows, "targets": targets(rows),
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
