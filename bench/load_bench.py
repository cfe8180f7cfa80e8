"""Load benchmark of the HTTP server: streaming chat clients at 1 to 16 in flight, against the engine.

Run from the repository root (about 45 s on an idle 2-core machine):

    .venv/bin/python bench/load_bench.py [--concurrency 1,4,8,16] [--rounds 2] [--min-requests 8]
                                         [--max-tokens 64] [--port 0] [--threads N] [--no-engine-baseline]

``parallama serve --parallel 16 --ctx-size 512 --kv-size 8192 --threads N`` is started as a
subprocess (on a free port unless --port), and for each concurrency C, max(--min-requests, --rounds x C)
streaming requests go to /v1/chat/completions through httpx, exactly C in flight at a time (closed
loop: a client sends its next request when its previous one ends). The server gets SIGTERM at the end.

With --engine-baseline (the default) the parallama Engine also runs in this process, with the
server's context (same sequences, KV cells, n_batch and threads) and the same chat prompts rendered
with the model's template, --baseline-concurrency (8) in flight: --engine-runs times (default 2),
half before the server starts and half after it stops, so the two never compete for the cores; the
fastest run is the baseline, and the spread of tok_s_each shows how noisy the machine was.

Every request asks for --max-tokens tokens at temperature 0, each with its own prompt. End-of-generation
tokens get a logit_bias of -100 (a plain OpenAI field, in both the engine and the HTTP runs) so every
answer runs to --max-tokens; --allow-eos turns that off. Completion tokens are counted from the
server's usage (stream_options.include_usage) and the engine's usage event, never from chunks.

Per level: tok_s = completion tokens of the level / wall time from its first send to its last answer;
TTFT = send to the first content delta; latency = send to the end of the stream; server_cpu_util =
CPU seconds of the server process / wall time (close to --threads when nothing else competes).

With equal-length answers the clients of a level start and finish together, so each wave of C prompts
arrives at once and is prefilled in one step: TTFT then includes the prefill of all C prompts.
--stagger S spreads the clients' first sends S seconds apart, which keeps the waves spread out.
Progress goes to stderr, the JSON report to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout, installed or not

from _client import percentile  # noqa: E402  (bench/ is on sys.path: this runs as a script)
from _client import rnd as _r  # noqa: E402
from parallama.batching import Engine, EngineConfig  # noqa: E402
from parallama.memory.sizing import SeqLayout, seq_layout  # noqa: E402
from parallama.sequences import SamplingParams  # noqa: E402
from parallama.sequences.config import ContextConfig, ModelConfig, use_flash_attn  # noqa: E402
from parallama.sequences.llama_backend import LlamaBackend  # noqa: E402
from parallama.sequences.model import LlamaModel  # noqa: E402
from parallama.sequences.model_file import default_model_path  # noqa: E402
from parallama.server.chat_template import ChatTemplate  # noqa: E402
from parallama.server.runtime import default_threads  # noqa: E402

TOPICS = [
    "a lighthouse keeper", "a lost robot", "a dragon who hates fire", "a city under the sea",
    "a clockmaker", "the last tree on Mars", "a talking cat", "a haunted library",
    "a chess prodigy", "a time-travelling baker", "a river that flows uphill", "a shy giant",
    "a pirate astronomer", "a forgotten toy", "a snowman in summer", "a detective owl",
]
ASKS = [
    "Write a long, detailed story about {}.",
    "Describe {} in great detail: what they see, hear and feel over one whole day.",
    "Tell me everything you can imagine about {}, in several paragraphs.",
]
HEALTH_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 60.0


# --- prompts ----------------------------------------------------------------------------------
def conversation(i: int) -> list[dict[str, str]]:
    """Request i's messages: every topic with the first ask, then every topic with the next, ..."""
    ask = ASKS[(i // len(TOPICS)) % len(ASKS)]
    return [{"role": "user", "content": ask.format(TOPICS[i % len(TOPICS)])}]


def requests_for(concurrency: int, args: argparse.Namespace) -> int:
    return max(args.min_requests, args.rounds * concurrency)


def eog_bias(model: LlamaModel) -> dict[int, float]:
    """logit_bias that keeps greedy decoding off every end-of-generation token."""
    return {t: -100.0 for t in range(model.n_vocab) if model.is_eog(t)}


# --- one level: exactly C requests in flight ----------------------------------------------------
@dataclass
class Result:
    ttft: float | None  # seconds from send to the first content delta
    latency: float  # seconds from send to the end of the stream
    tokens: int  # completion tokens, from usage
    text: str = ""
    error: str | None = None


async def closed_loop(one: Callable[[int], Awaitable[Result]], n: int, concurrency: int,
                      stagger: float = 0.0) -> tuple[list[Result], float]:
    """n requests (index 0..n-1), ``concurrency`` workers each sending its next one when the last ends.
    Worker k waits k x ``stagger`` seconds before its first send."""
    pending = iter(range(n))
    results: list[Result | None] = [None] * n

    async def worker(k: int) -> None:
        await asyncio.sleep(k * stagger)
        for i in pending:  # one shared iterator: next() runs between awaits, so no index is taken twice
            results[i] = await one(i)

    started = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return [r for r in results if r is not None], time.perf_counter() - started


def summarize(concurrency: int, results: list[Result], wall: float) -> dict:
    ok = [r for r in results if r.error is None]
    tokens = sum(r.tokens for r in ok)
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    latencies = [r.latency for r in ok]
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "errors": len(results) - len(ok),
        "error_samples": sorted({r.error for r in results if r.error})[:3],
        "completion_tokens": tokens,
        "mean_completion_tokens": _r(tokens / len(ok), 1) if ok else None,
        "distinct_outputs": len({r.text for r in ok}),
        "wall_s": _r(wall),
        "tok_s": _r(tokens / wall, 1),
        "ttft_p50_s": _r(percentile(ttfts, 0.5)),
        "ttft_p99_s": _r(percentile(ttfts, 0.99)),
        "latency_p50_s": _r(percentile(latencies, 0.5)),
        "latency_p99_s": _r(percentile(latencies, 0.99)),
        "per_request_tok_s_p50": _r(percentile([r.tokens / r.latency for r in ok if r.latency > 0], 0.5), 1),
    }


# --- the in-process engine --------------------------------------------------------------------
def context_config(args: argparse.Namespace) -> ContextConfig:
    """What ``parallama serve --parallel P --ctx-size N --kv-size P*N --threads T`` builds."""
    # The server's context: the prefix cache's seq_ids beside the slots (on by default, as in the server).
    return ContextConfig(n_ctx=args.parallel * args.ctx_size, n_seq_max=server_layout(args).n_seq_max,
                         n_batch=args.batch_size, n_ubatch=args.batch_size, n_threads=args.threads,
                         flash_attn=use_flash_attn(args.flash_attn, True, False, "f16"))  # as the server picks it


def server_layout(args: argparse.Namespace) -> SeqLayout:
    return seq_layout(args.parallel, prefix_cache=True, n_batch=args.batch_size, kv_unified=False)  # the default


async def engine_level(engine: Engine, prompts: list[list[int]], params: SamplingParams,
                       concurrency: int, stagger: float) -> tuple[list[Result], float]:
    async def one(i: int) -> Result:
        started, ttft, text = time.perf_counter(), None, []
        async with engine.submit(prompts[i], params) as stream:
            async for event in stream:
                if event.text and ttft is None:
                    ttft = time.perf_counter() - started
                text.append(event.text)
                if event.error:
                    return Result(ttft, time.perf_counter() - started, 0, error=f"engine: {event.error}")
                if event.usage is not None:
                    return Result(ttft, time.perf_counter() - started, event.usage.completion_tokens, "".join(text))
        return Result(ttft, time.perf_counter() - started, 0, error="stream ended without usage")

    await one(0)  # warm-up: the first decodes of a fresh context are slower
    return await closed_loop(one, len(prompts), concurrency, stagger)


def engine_baseline(args: argparse.Namespace, bias: dict[int, float]) -> dict:
    """One baseline run on a model and context of its own, all closed before it returns."""
    model = LlamaModel(ModelConfig(str(default_model_path())))
    backend = LlamaBackend(model, context_config(args))
    engine = Engine(backend, EngineConfig(ctx_size=args.ctx_size, layout=server_layout(args)))
    engine.start()
    try:
        facts = backend.facts
        template = ChatTemplate(facts.chat_template, facts.bos_token, facts.eos_token)
        n = requests_for(args.baseline_concurrency, args)
        prompts = [engine.tokenize(template.render(conversation(i)), True, True) for i in range(n)]
        params = SamplingParams(temperature=0, max_tokens=args.max_tokens, logit_bias=tuple(bias.items()))
        results, wall = asyncio.run(engine_level(engine, prompts, params, args.baseline_concurrency,
                                                 args.stagger))
    finally:
        engine.shutdown()
        backend.close()
        model.close()
    row = summarize(args.baseline_concurrency, results, wall)
    progress(f"engine C={row['concurrency']}: {row['tok_s']} tok/s, TTFT p50 {row['ttft_p50_s']} s")
    return row


def best_engine(runs: list[dict]) -> dict | None:
    """The fastest baseline run (other load only slows a run down), with every run's tok/s."""
    if not runs:
        return None
    return {**max(runs, key=lambda r: r["tok_s"]), "tok_s_each": [r["tok_s"] for r in runs]}


# --- the server subprocess --------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(args: argparse.Namespace, port: int) -> list[str]:
    if args.server == "llama-server":  # its -c is the total context, split evenly among the -np slots
        return [args.llama_server, "-m", str(default_model_path()), "--host", "127.0.0.1", "--port", str(port),
                "-np", str(args.parallel), "-c", str(args.parallel * args.ctx_size), "-b", str(args.batch_size),
                "-ub", str(args.batch_size), "--threads", str(args.threads), "-fa", args.flash_attn]
    return [sys.executable, "-m", "parallama.server.cli", "serve", "--port", str(port),
            "--parallel", str(args.parallel), "--ctx-size", str(args.ctx_size),
            "--kv-size", str(args.parallel * args.ctx_size), "--batch-size", str(args.batch_size),
            "--ubatch-size", str(args.batch_size), "--threads", str(args.threads),
            "--memory-reserve", args.memory_reserve, "--log-level", "warning", "--flash-attn", args.flash_attn]


def start_server(args: argparse.Namespace, port: int, log) -> subprocess.Popen:
    proc = subprocess.Popen(server_command(args, port), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + HEALTH_TIMEOUT_S
    with httpx.Client(trust_env=False, timeout=5.0) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with code {proc.returncode} before it was healthy; "
                                   f"its log ({log.name}): {log_problems(log.name)}")
            try:
                if client.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    return proc
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
    stop_server(proc)
    raise RuntimeError(f"the server was not healthy after {HEALTH_TIMEOUT_S:.0f} s; its log: {log.name}")


def stop_server(proc: subprocess.Popen) -> dict:
    """SIGTERM (graceful drain), then SIGKILL if it does not exit in time."""
    started = time.perf_counter()
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return {"exit_code": proc.returncode, "stop_s": _r(time.perf_counter() - started, 2)}


def log_problems(path: str, limit: int = 10) -> list[str]:
    """The server runs at --log-level warning: every line it wrote is worth a look."""
    lines = Path(path).read_text(errors="replace").splitlines()
    return [line[:300] for line in lines if line.strip()][:limit]


# --- HTTP clients -----------------------------------------------------------------------------
def request_body(i: int, args: argparse.Namespace, bias: dict[int, float]) -> dict:
    body = {"messages": conversation(i), "max_tokens": args.max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    if bias:
        body["logit_bias"] = {str(t): b for t, b in bias.items()}
    return body


def read_chunk(data: str, state: dict) -> str | None:
    """Fold one SSE data payload into state (text, ttft, tokens); returns an error message, if any."""
    payload = json.loads(data)
    if "error" in payload:
        return f"stream error: {payload['error'].get('message')}"
    for choice in payload.get("choices") or []:
        content = (choice.get("delta") or {}).get("content")
        if content:
            state.setdefault("ttft", time.perf_counter() - state["started"])
            state["text"].append(content)
    if payload.get("usage"):
        state["tokens"] = payload["usage"]["completion_tokens"]
    return None


async def http_request(client: httpx.AsyncClient, body: dict) -> Result:
    state: dict = {"started": time.perf_counter(), "text": []}
    error, done = None, False
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                error = f"HTTP {response.status_code}: {response.text[:200]}"
            else:
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        done = True
                        break
                    error = error or read_chunk(line[6:], state)
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    if error is None and (not done or "tokens" not in state):
        error = "stream ended without [DONE]" if not done else "no usage chunk"
    latency = time.perf_counter() - state["started"]
    return Result(state.get("ttft"), latency, state.get("tokens", 0), "".join(state["text"]), error)


def cpu_seconds(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system


async def http_levels(args: argparse.Namespace, port: int, pid: int, bias: dict[int, float]) -> list[dict]:
    limits = httpx.Limits(max_connections=max(args.concurrency) + 4, max_keepalive_connections=max(args.concurrency))
    server, me = psutil.Process(pid), psutil.Process()
    rows = []
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits, trust_env=False,
                                 timeout=httpx.Timeout(args.request_timeout)) as client:
        warm = await http_request(client, {**request_body(0, args, bias), "max_tokens": 8})
        if warm.error:
            raise RuntimeError(f"warm-up request failed: {warm.error}")
        for c in args.concurrency:
            cpu_server, cpu_me = cpu_seconds(server), cpu_seconds(me)
            results, wall = await closed_loop(lambda i: http_request(client, request_body(i, args, bias)),
                                              requests_for(c, args), c, args.stagger)
            row = summarize(c, results, wall)
            row["server_cpu_util"] = _r((cpu_seconds(server) - cpu_server) / wall, 2)  # cores busy, of --threads
            row["client_cpu_util"] = _r((cpu_seconds(me) - cpu_me) / wall, 2)
            rows.append(row)
            progress(f"HTTP C={c}: {row['tok_s']} tok/s, TTFT p50 {row['ttft_p50_s']} s, {row['errors']} errors")
        status = await client.get("/status")  # llama-server has none
        rows.append({"status": status.json() if status.status_code == 200 else {}})
    return rows


def run_server_levels(args: argparse.Namespace, bias: dict[int, float]) -> tuple[list[dict], dict]:
    port = args.port or free_port()
    with tempfile.NamedTemporaryFile("w+", prefix="load_bench_server_", suffix=".log", delete=False) as log:
        proc = start_server(args, port, log)
        progress(f"server up on port {port} (pid {proc.pid})")
        try:
            rows = asyncio.run(http_levels(args, port, proc.pid, bias))
        finally:
            stopped = stop_server(proc)
        status = rows.pop()["status"]
        server = {"command": " ".join(server_command(args, port)[1:]), "plan": status.get("plan"),
                  "engine": status.get("engine"), **stopped, "log": log_problems(log.name)}
    os.unlink(log.name)
    return rows, server


# --- report -----------------------------------------------------------------------------------
def targets(http: list[dict], engine: dict | None, at: int) -> dict:
    by_c = {row["concurrency"]: row for row in http}
    row, one = by_c.get(at), by_c.get(1)
    if row is None:
        return {"note": f"needs C={at} in --concurrency"}
    out: dict = {"concurrency": at}
    if one:
        out["http_over_http1"] = _r(row["tok_s"] / one["tok_s"])
        out["http_over_http1_ok (>= 1.3)"] = out["http_over_http1"] >= 1.3
    if engine:
        out["http_over_engine"] = _r(row["tok_s"] / engine["tok_s"])
        out["http_over_engine_ok (>= 0.85)"] = out["http_over_engine"] >= 0.85
    if row["ttft_p50_s"] is not None:
        out["ttft_p50_ok (< 0.5 s)"] = row["ttft_p50_s"] < 0.5
    out["no_errors"] = all(r["errors"] == 0 for r in http)
    return out


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def concurrency_list(text: str) -> list[int]:
    values = [int(x) for x in text.split(",") if x.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("a comma-separated list of positive integers")
    return values


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=concurrency_list, default=[1, 4, 8, 16],
                    help="clients in flight, e.g. 1,4,8,16")
    ap.add_argument("--rounds", type=int, default=2, help="requests per level = max(--min-requests, rounds x C)")
    ap.add_argument("--min-requests", type=int, default=8, help="fewest requests per level")
    ap.add_argument("--max-tokens", type=int, default=64, help="completion tokens each request asks for")
    ap.add_argument("--allow-eos", action="store_true", help="no logit_bias on end-of-generation tokens")
    ap.add_argument("--port", type=int, default=0, help="server port (0: a free one)")
    ap.add_argument("--threads", type=int, default=default_threads(),
                    help="server and engine threads (default: physical cores)")
    ap.add_argument("--parallel", type=int, default=16, help="server --parallel (n_seq_max)")
    ap.add_argument("--ctx-size", type=int, default=512, help="server --ctx-size; KV cells = parallel x ctx-size")
    ap.add_argument("--batch-size", type=int, default=512, help="n_batch (and n_ubatch)")
    ap.add_argument("--flash-attn", choices=("auto", "on", "off"), default="auto",
                    help="given to both servers (llama-server -fa); auto: each server's own choice")
    ap.add_argument("--memory-reserve", default="256MiB", help="server --memory-reserve (sizing only)")
    ap.add_argument("--server", choices=("parallama", "llama-server"), default="parallama",
                    help="which server the HTTP levels run against")
    ap.add_argument("--llama-server", default="/work/anchor/llama-server",
                    help="llama-server binary (bench/build_llama_server.sh builds it from the vendored llama.cpp)")
    ap.add_argument("--stagger", type=float, default=0.0,
                    help="seconds between the clients' first sends (0: all at once, so equal-length requests "
                         "then arrive in waves and each wave's prompts are prefilled together)")
    ap.add_argument("--request-timeout", type=float, default=300.0, help="client timeout per request, seconds")
    ap.add_argument("--engine-baseline", action=argparse.BooleanOptionalAction, default=True,
                    help="also measure the in-process engine (before the server starts)")
    ap.add_argument("--engine-runs", type=int, default=2,
                    help="baseline runs, the first half before the server and the rest after it; the best counts")
    ap.add_argument("--baseline-concurrency", type=int, default=8, help="sequences in flight for the engine baseline")
    return ap.parse_args()


def model_facts() -> tuple[str, dict[int, float]]:
    """The model's name and its end-of-generation logit_bias (from a short load)."""
    model = LlamaModel(ModelConfig(str(default_model_path())))
    try:
        return model.facts().name, eog_bias(model)
    finally:
        model.close()


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    model_name, eog = model_facts()
    bias = {} if args.allow_eos else eog
    runs = args.engine_runs if args.engine_baseline else 0
    before = [engine_baseline(args, bias) for _ in range((runs + 1) // 2)]
    http, server = run_server_levels(args, bias)
    after = [engine_baseline(args, bias) for _ in range(runs // 2)]
    engine = best_engine(before + after)
    report = {
        "model": model_name, "threads": args.threads, "parallel": args.parallel, "ctx_size": args.ctx_size,
        "max_tokens": args.max_tokens, "eog_banned": bool(bias), "stagger_s": args.stagger,
        "http": http, "engine_baseline": engine,
        "http8_over_http1": targets(http, engine, 8).get("http_over_http1"),
        "targets": targets(http, engine, args.baseline_concurrency), "server": server,
        "elapsed_s": _r(time.perf_counter() - started, 1),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
