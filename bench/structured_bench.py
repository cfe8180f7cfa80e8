"""Structured output benchmark: what constraining the output costs, inside one run.

    .venv/bin/python bench/structured_bench.py [--base-url URL] [--rounds 3] [--max-tokens 96]

Starts ``parallama serve --parallel 8 --ctx-size 4096 --threads 2`` (unless --base-url), then, per round:
8 concurrent streaming requests with a json_schema response_format, and 8 unconstrained ones with the
same prompts; aggregate completion tok/s of each, and their ratio (target >= 0.85). To compare the cost
per token and nothing else, both groups run to exactly --max-tokens: the schema asks for a list of at
least 200 numbers (it cannot close sooner) and the free requests have end-of-generation banned. A group
of 8 "person" schemas that do close checks that every answer parses. Then the time to first token of a
request with a schema the server has never seen (compiled on the spot): alone, and while 7 unconstrained
requests stream. JSON report on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _client import (add_request_args, add_server_args, chat_body, client_for, exit_on_sigterm,  # noqa: E402
                     model_id, progress, rnd, server_from_args, stream_chat, summarize)

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "city", "age", "hobbies"],
          "properties": {"name": {"type": "string", "maxLength": 40}, "city": {"type": "string", "maxLength": 40},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "hobbies": {"type": "array", "maxItems": 4, "items": {"type": "string", "maxLength": 30}}}}
LONG = {"type": "object", "required": ["numbers"], "additionalProperties": False,
        "properties": {"numbers": {"type": "array", "minItems": 200, "items": {"type": "integer", "minimum": 0,
                                                                               "maximum": 999}}}}
NO_END = {"0": -100, "2": -100}  # SmolLM2's <|endoftext|> and <|im_end|>


def body(model: str, i: int, max_tokens: int, schema: dict | None) -> dict:
    out = chat_body(model, [{"role": "user", "content": f"Invent person number {i}: name, city, age, hobbies."}],
                    max_tokens)
    if schema is None:
        return out | {"logit_bias": NO_END}
    return out | {"response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}}


async def group(client, model: str, schema: dict | None, args: argparse.Namespace, offset: int) -> dict:
    started = time.perf_counter()
    results = await asyncio.gather(*(stream_chat(client, body(model, offset + i, args.max_tokens, schema))
                                     for i in range(8)))
    report = summarize(results, time.perf_counter() - started)
    if schema is SCHEMA:  # answers that close: they must all parse
        report["parsed"] = sum(_parses(r.text) for r in results)
    return report


def _parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except json.JSONDecodeError:
        return False


async def new_schema_ttft(client, model: str, args: argparse.Namespace, k: int, with_load: bool) -> float:
    schema = json.loads(json.dumps(SCHEMA))
    schema["properties"][f"field_{k}_{with_load}"] = {"type": "integer"}  # never seen before: compiled now
    load = [asyncio.create_task(stream_chat(client, body(model, 100 + i, args.max_tokens, None))) for i in
            range(7 if with_load else 0)]
    if load:
        await asyncio.sleep(0.5)  # the 7 are streaming
    result = await stream_chat(client, body(model, 200 + k, 16, schema))
    await asyncio.gather(*load)
    return result.ttft


async def run(base_url: str, args: argparse.Namespace) -> dict:
    async with client_for(base_url) as client:
        model = await model_id(client)
        person = await group(client, model, SCHEMA, args, 0)  # also the warm-up: tokenizer bridge, caches
        rounds = []
        for r in range(args.rounds):
            progress(f"round {r + 1}/{args.rounds}")
            constrained = await group(client, model, LONG, args, 10 * r)
            free = await group(client, model, None, args, 10 * r)
            rounds.append({"json_schema": constrained, "free": free,
                           "ratio": rnd(constrained["tok_s"] / free["tok_s"]) if free["tok_s"] else None})
        alone = [await new_schema_ttft(client, model, args, k, False) for k in range(3)]
        loaded = [await new_schema_ttft(client, model, args, k, True) for k in range(3)]
    ratios = [r["ratio"] for r in rounds if r["ratio"]]
    return {"person_schema": person, "rounds": rounds, "tok_s_ratio_median": rnd(statistics.median(ratios)) if ratios else None,
            "new_schema_ttft_alone_s": [rnd(t) for t in alone],
            "new_schema_ttft_beside_7_streams_s": [rnd(t) for t in loaded]}


def main() -> None:
    exit_on_sigterm()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_server_args(ap)
    add_request_args(ap)
    ap.add_argument("--rounds", type=int, default=3)
    ap.set_defaults(max_tokens=96)
    args = ap.parse_args()
    with server_from_args(args) as base_url:
        print(json.dumps(asyncio.run(run(base_url, args)), indent=2))


if __name__ == "__main__":
    main()
