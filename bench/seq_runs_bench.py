"""What a gap between running seq_ids costs: one decode step of the same sequences on 1 to N runs.

Run from the repository root (about 20 s on an idle 2-core machine):

    .venv/bin/python bench/seq_runs_bench.py [--sequences 8] [--slots 16] [--ctx-size 512] [--threads 2]
                                             [--steps 40] [--repeats 4]

With a KV stream per sequence (parallama's default layout, like llama-server's), llama_decode splits a
batch into micro-batches of consecutive seq_ids and computes the graph once per micro-batch. This times
one decode step (one token for each of --sequences sequences, 40 cells deep) with their seq_ids placed
as 1, 2, 4 and --sequences runs, against one sequence alone, and then one prompt token (a 256-token
prompt's prefill divided by 256): the two costs parallama.batching.seq_runs weighs against each other.
Medians over --repeats, in ms; nothing but llama.cpp and the backend runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _client import default_model_path  # noqa: E402

from parallama.sequences import BatchItem, BatchPlan  # noqa: E402
from parallama.sequences.config import ContextConfig, ModelConfig  # noqa: E402
from parallama.sequences.llama_backend import LlamaBackend  # noqa: E402
from parallama.sequences.model import LlamaModel  # noqa: E402

DEPTH = 40  # prompt tokens each sequence holds before the timed steps


def placements(sequences: int, slots: int) -> dict[str, list[int]]:
    """seq_ids for the same number of sequences as 1, 2, 4 and `sequences` runs of consecutive ids."""
    out = {"1 sequence alone": [0]}
    for runs in (1, 2, 4, sequences):
        size = sequences // runs
        if size * runs != sequences or runs * (size + 1) - 1 > slots:
            continue
        out[f"{sequences} sequences, {runs} run{'s' if runs > 1 else ''}"] = [
            r * (size + 1) + k for r in range(runs) for k in range(size)]  # one free id between runs
    return out


def step_ms(backend: LlamaBackend, seq_ids: list[int], steps: int) -> float:
    for seq_id in range(backend.n_seq_max):
        backend.seq_remove(seq_id)
    prompt = BatchPlan()
    for seq_id in seq_ids:
        prompt.add(BatchItem(seq_id, 0, [100 + k for k in range(DEPTH)], True))
    backend.decode(prompt)
    started = time.perf_counter()
    for k in range(steps):
        plan = BatchPlan()
        for seq_id in seq_ids:
            plan.add(BatchItem(seq_id, DEPTH + k, [200 + k], True))
        backend.decode(plan)
    return (time.perf_counter() - started) / steps * 1e3


def prompt_token_ms(backend: LlamaBackend, n: int = 256) -> float:
    backend.seq_remove(0)
    plan = BatchPlan()
    plan.add(BatchItem(0, 0, [100 + k % 50 for k in range(n)], True))
    started = time.perf_counter()
    backend.decode(plan)
    return (time.perf_counter() - started) / n * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sequences", type=int, default=8)
    ap.add_argument("--slots", type=int, default=16, help="seq_ids (streams) in the context")
    ap.add_argument("--ctx-size", type=int, default=512, help="cells per stream")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=40, help="timed decode steps per measurement")
    ap.add_argument("--repeats", type=int, default=4)
    args = ap.parse_args()
    model = LlamaModel(ModelConfig(str(default_model_path())))
    config = ContextConfig(n_ctx=args.slots * args.ctx_size, n_seq_max=args.slots, n_batch=512, n_ubatch=512,
                           n_threads=args.threads, flash_attn=False, kv_unified=False)
    backend = LlamaBackend(model, config)
    try:
        cases = placements(args.sequences, args.slots)
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.repeats):  # interleaved, so a noisy moment hits every case alike
            for name, seq_ids in cases.items():
                times[name].append(step_ms(backend, seq_ids, args.steps))
        for name, seq_ids in cases.items():
            print(f"{name:24s} {statistics.median(times[name]):6.1f} ms a step   seq_ids {seq_ids}")
        print(f"{'one prompt token':24s} {statistics.median(prompt_token_ms(backend) for _ in range(3)):6.2f} ms")
    finally:
        backend.close()
        model.close()


if __name__ == "__main__":
    main()
