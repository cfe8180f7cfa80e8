"""Streaming load, llama-server against parallama, with the raw llama_decode ceiling, in one run.

Run from the repository root (about 4 minutes per repeat on an idle 2-core machine):

    .venv/bin/python bench/load_side_by_side.py [--repeats 2] [--concurrency 1,8,16] [load_bench flags]

Each repeat runs load_bench's HTTP levels (streaming chat, --max-tokens answers with end-of-generation
banned, closed loop, --concurrency clients in flight) against llama-server (built from the llama.cpp that
llama-cpp-python vendors: bench/build_llama_server.sh) and then parallama, both with --parallel slots,
--ctx-size cells each and --threads threads; then the raw ceiling: one llama_decode per step,
in-process, greedy sampling, short chat prompts like the HTTP ones (engine_bench.py's raw loop), at
each concurrency.
The servers never overlap. Figures are medians over the repeats; the ratios are parallama over
llama-server (tok/s: above 1 is better; TTFT: below 1 is better) and parallama over the raw ceiling.
Progress goes to stderr, a table (or --json) to stdout.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import engine_bench  # noqa: E402
import load_bench  # noqa: E402
from load_bench import default_model_path, model_facts, progress, run_server_levels  # noqa: E402

from parallama.sequences.config import ContextConfig, ModelConfig, use_flash_attn  # noqa: E402
from parallama.sequences.model import LlamaModel  # noqa: E402

SERVERS = ("llama-server", "parallama")


def raw_ceiling(args: argparse.Namespace) -> dict[int, float]:
    """tok/s of the bare decode loop at each concurrency (the best of two runs)."""
    model = LlamaModel(ModelConfig(str(default_model_path())))
    try:
        banned = [] if args.allow_eos else engine_bench.eog_tokens(model)
        out = {}
        for c in args.concurrency:
            prompts = engine_bench.make_prompts(model, c)
            config = ContextConfig(n_ctx=c * args.ctx_size, n_seq_max=c, n_batch=args.batch_size,
                                   n_ubatch=args.batch_size, n_threads=args.threads,
                                   flash_attn=use_flash_attn(args.flash_attn, True, False, "f16"))  # as parallama's
            runs = [engine_bench.raw_measure(model, config, prompts, args.max_tokens, banned) for _ in range(2)]
            out[c] = round(max(r.tok_s for r in runs), 1)
            progress(f"raw C={c}: {out[c]} tok/s")
        return out
    finally:
        model.close()


def one_repeat(args: argparse.Namespace, bias: dict[int, float]) -> dict:
    report = {}
    for kind in SERVERS:
        run_args = copy.copy(args)
        run_args.server = kind
        rows, _ = run_server_levels(run_args, bias)
        report[kind] = {row["concurrency"]: row for row in rows}
    report["raw"] = raw_ceiling(args)
    return report


def median_of(repeats: list[dict], kind: str, c: int, key: str) -> float | None:
    values = [r[kind][c][key] for r in repeats if r[kind][c].get(key) is not None]
    return round(statistics.median(values), 3) if values else None


def table(args: argparse.Namespace, repeats: list[dict]) -> list[dict]:
    rows = []
    for c in args.concurrency:
        ls, pa = (median_of(repeats, k, c, "tok_s") for k in SERVERS)
        raw = round(statistics.median(r["raw"][c] for r in repeats), 1)
        ttft_ls, ttft_pa = (median_of(repeats, k, c, "ttft_p50_s") for k in SERVERS)
        rows.append({
            "clients": c, "llama_server_tok_s": ls, "parallama_tok_s": pa, "raw_tok_s": raw,
            "tok_s_ratio": round(pa / ls, 2) if ls and pa else None,
            "parallama_over_raw": round(pa / raw, 2) if pa and raw else None,
            "llama_server_over_raw": round(ls / raw, 2) if ls and raw else None,
            "ttft_p50_llama_server_s": ttft_ls, "ttft_p50_parallama_s": ttft_pa,
            "errors": sum(r[k][c]["errors"] for r in repeats for k in SERVERS),
            "each_tok_s": {k: [r[k][c]["tok_s"] for r in repeats] for k in SERVERS},
        })
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    own, rest = ap.parse_known_args()
    sys.argv = [sys.argv[0], "--no-engine-baseline", "--concurrency", "1,8,16", *rest]
    args = load_bench.parse_args()
    _, eog = model_facts()
    bias = {} if args.allow_eos else eog
    repeats = []
    for i in range(own.repeats):
        progress(f"repeat {i + 1} of {own.repeats}")
        repeats.append(one_repeat(args, bias))
    rows = table(args, repeats)
    if own.json:
        print(json.dumps({"rows": rows, "repeats": repeats}, indent=2, default=str))
        return
    print(f"{'clients':>7} {'llama-server':>12} {'parallama':>9} {'ratio':>5} {'raw':>6} {'pa/raw':>6} "
          f"{'ls/raw':>6} {'TTFT ls':>7} {'TTFT pa':>7}")
    for r in rows:
        print(f"{r['clients']:>7} {r['llama_server_tok_s']:>12} {r['parallama_tok_s']:>9} {r['tok_s_ratio']:>5} "
              f"{r['raw_tok_s']:>6} {r['parallama_over_raw']:>6} {r['llama_server_over_raw']:>6} "
              f"{r['ttft_p50_llama_server_s']:>7} {r['ttft_p50_parallama_s']:>7}")


if __name__ == "__main__":
    main()
