"""Multi-turn chat benchmark: N users, each with a long document of its own, T turns each.

Run from the repository root:

    .venv/bin/python bench/chat_bench.py [--users 8] [--turns 5] [--max-tokens 32] [--doc-tokens 600]
                                         [--base-url http://127.0.0.1:PORT | --server parallama|llama-server]

Without --base-url the server is started on a free port (``parallama serve --parallel 8 --ctx-size 4096
--threads 2``, or llama-server with ``-np 8 -c 8x4096``; see --help) and stopped at the end.

Every user's first message is its own ~--doc-tokens document (deterministic prose seeded by the user
id and --seed) followed by a question; each later turn appends the assistant's answer and a new
question and resends the whole history, as a chat client does. All users run at once; each user's turns run one
after the other. Requests stream at temperature 0 with stream_options.include_usage and ask for
--max-tokens tokens (the model may stop earlier).

Measures: wall time from the first send to the last answer; completion tokens / wall time (from the
server's usage); TTFT (send to the first content delta) p50/p99 separately for turn 1 (the whole
document is new) and for turns 2..T (only the last answer and question are new: a server that reuses
the conversation's KV answers these fast); the sums of usage.prompt_tokens and of
usage.prompt_tokens_details.cached_tokens (null when the server does not report it).
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

from _client import (StreamResult, add_request_args, add_server_args, chat_body, client_for,  # noqa: E402
                     exit_on_sigterm, filler_text, model_id, progress, rnd, server_from_args, stream_chat, summarize)

QUESTIONS = (
    "Summarize the document above in two sentences.",
    "Which places does the document mention most often?",
    "Who appears in the document, and what do they do?",
    "Give the document a short title.",
    "What is the most unusual detail in it?",
    "Rewrite its first sentence in simpler words.",
    "How many different people are mentioned, roughly?",
    "Describe the mood of the document in one sentence.",
)


def question(turn: int) -> str:
    """The user's question at turn (0-based); the same for every user, numbered past the list's end."""
    text = QUESTIONS[turn % len(QUESTIONS)]
    return text if turn < len(QUESTIONS) else f"{text} (again, turn {turn + 1})"


def first_message(user: int, args: argparse.Namespace) -> str:
    document = filler_text(f"doc-{args.seed}-{user}", args.doc_tokens)
    return f"Here is a document.\n\n{document}\n\n{question(0)}"


async def one_user(client: httpx.AsyncClient, model: str, user: int, args: argparse.Namespace) -> list[StreamResult]:
    """The user's T turns in order, each resending the whole history."""
    messages = [{"role": "user", "content": first_message(user, args)}]
    results = []
    for turn in range(args.turns):
        if turn:
            messages.append({"role": "user", "content": question(turn)})
        result = await stream_chat(client, chat_body(model, list(messages), args.max_tokens))
        results.append(result)
        if result.error:
            progress(f"user {user} turn {turn + 1}: {result.error}")
            break
        messages.append({"role": "assistant", "content": result.text})
    return results


async def chat_benchmark(base_url: str, args: argparse.Namespace) -> dict:
    """The report for args.users users x args.turns turns against base_url (a running server)."""
    async with client_for(base_url, args.timeout) as client:
        model = await model_id(client)
        progress(f"chat: {args.users} users x {args.turns} turns against {base_url} ({model})")
        started = time.perf_counter()
        per_user = await asyncio.gather(*(one_user(client, model, u, args) for u in range(args.users)))
        wall = time.perf_counter() - started
    every = [r for results in per_user for r in results]
    first = [results[0] for results in per_user if results]
    later = [r for results in per_user for r in results[1:]]
    report = {"model": model, "users": args.users, "turns": args.turns, "max_tokens": args.max_tokens,
              "doc_tokens": args.doc_tokens, **summarize(every, wall),
              "turn1_prompt_tokens_mean": rnd(sum(r.prompt_tokens for r in first) / max(len(first), 1), 1),
              "turn1": summarize(first, wall), "later_turns": summarize(later, wall)}
    for part in ("turn1", "later_turns"):  # wall time and tok/s belong to the whole run only
        for key in ("wall_s", "tok_s"):
            report[part].pop(key)
    progress(f"chat: {report['wall_s']} s, {report['tok_s']} tok/s, TTFT p50 turn 1 "
             f"{report['turn1']['ttft_p50_s']} s, later {report['later_turns']['ttft_p50_s']} s")
    return report


def add_chat_args(ap: argparse.ArgumentParser, users: bool = True) -> None:
    if users:
        ap.add_argument("--users", type=int, default=8, help="concurrent users")
    ap.add_argument("--turns", type=int, default=5, help="turns per user")
    ap.add_argument("--doc-tokens", type=int, default=600, help="approximate tokens of each user's document")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_chat_args(ap)
    add_request_args(ap)
    add_server_args(ap)
    args = ap.parse_args()
    exit_on_sigterm()
    with server_from_args(args) as base_url:
        report = asyncio.run(chat_benchmark(base_url, args))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
