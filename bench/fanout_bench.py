"""Agent fan-out benchmark: waves of 16 requests at once that share a ~1,000-token system prompt.

Run from the repository root:

    .venv/bin/python bench/fanout_bench.py [--fanout 16] [--waves 3] [--system-tokens 1000] [--max-tokens 32]
                                           [--no-warmup] [--base-url URL | --server parallama|llama-server]

Without --base-url the server is started on a free port (as in chat_bench.py; see --help) and
stopped at the end.

Each wave sends --fanout streaming requests at once, as an agent that fans a job out to sub-agents:
the same system prompt (deterministic prose seeded by --seed), then a short user task of its own
(distinct within the wave and from wave to wave). Temperature 0, --max-tokens tokens each. Waves run
one after the other: wave 1 is cold (the server has never seen the system prompt's notes: only the
chat template's header and the prompt's first sentence, ~30 tokens, match earlier prompts), later
waves are warm (a server that keeps the shared prefix's KV prefills only the short tasks).
--warmup (the default) first sends one unreported wave with ANOTHER system prompt, so wave 1 measures
a cold prefix on a warm process rather than the process's first decodes.

Per wave: wall time from the first send to the last answer, completion tokens / wall time (from
usage), TTFT (send to the first content delta) p50/p99, the sums of usage.prompt_tokens and
usage.prompt_tokens_details.cached_tokens (null when not reported).
Progress goes to stderr, the JSON report to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _client import (add_request_args, add_server_args, chat_body, client_for, exit_on_sigterm,  # noqa: E402
                     filler_text, model_id, progress, server_from_args, stream_chat, summarize)

TASKS = (
    "List three risks in the notes.", "Name the places in the notes.", "Write a one-line summary.",
    "Suggest a title for the notes.", "Find a date in the notes.", "Who is mentioned first?",
    "Count the bridges mentioned.", "Pick the strangest sentence.", "Write a haiku about the notes.",
    "What should be repaired first?", "Draft a question for the mayor.", "Name two jobs in the notes.",
    "Describe the weather in the notes.", "What would a child notice?", "Give one follow-up task.",
    "Say which place is busiest.",
)


def system_prompt(seed: str, tokens: int) -> str:
    return ("You are one of several sub-agents working on the same job. Answer briefly and only from the "
            f"shared notes below.\n\nShared notes:\n{filler_text(seed, tokens)}")


def task(wave: int, index: int) -> str:
    return f"Sub-task {wave}.{index + 1}: {TASKS[index % len(TASKS)]}"


async def one_wave(client: httpx.AsyncClient, model: str, system: str, wave: int, args: argparse.Namespace) -> dict:
    bodies = [chat_body(model, [{"role": "system", "content": system}, {"role": "user", "content": task(wave, i)}],
                        args.max_tokens) for i in range(args.fanout)]
    started = time.perf_counter()
    results = await asyncio.gather(*(stream_chat(client, body) for body in bodies))
    return {"wave": wave, **summarize(list(results), time.perf_counter() - started)}


async def fanout_benchmark(base_url: str, args: argparse.Namespace) -> dict:
    """The report of args.waves waves of args.fanout requests against base_url (a running server)."""
    async with client_for(base_url, args.timeout) as client:
        model = await model_id(client)
        progress(f"fan-out: {args.waves} waves of {args.fanout} against {base_url} ({model})")
        if args.warmup:
            await one_wave(client, model, system_prompt(f"warmup-{args.seed}", args.system_tokens), 0, args)
        system = system_prompt(f"system-{args.seed}", args.system_tokens)
        waves = []
        for wave in range(1, args.waves + 1):
            waves.append(await one_wave(client, model, system, wave, args))
            progress(f"fan-out wave {wave}: {waves[-1]['wall_s']} s, TTFT p50 {waves[-1]['ttft_p50_s']} s")
    return {"model": model, "fanout": args.fanout, "max_tokens": args.max_tokens, "warmup": args.warmup,
            "system_tokens": args.system_tokens, "waves": waves}


def add_fanout_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--fanout", type=int, default=16, help="requests at once in each wave")
    ap.add_argument("--waves", type=int, default=3, help="reported waves (the first cold, the rest warm)")
    ap.add_argument("--system-tokens", type=int, default=1000, help="approximate tokens of the shared system prompt")
    ap.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                    help="first an unreported wave with another system prompt")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_fanout_args(ap)
    add_request_args(ap)
    add_server_args(ap)
    args = ap.parse_args()
    exit_on_sigterm()
    with server_from_args(args) as base_url:
        report = asyncio.run(fanout_benchmark(base_url, args))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
