"""Load benchmark for `dsrun serve` (or any OpenAI-compatible server): N streaming requests from C concurrent
clients, arriving all at once (`--arrival burst`) or as a Poisson process (`--arrival poisson --rate R`, requests/s).

Per request it records TTFT (request sent → first chunk that carries text), the gaps between text-bearing chunks
(inter-token latency; a chunk may hold more than one token when the detokenizer holds text back), the server's
`usage` (prompt and completion tokens, asked for with `stream_options.include_usage`) and the outcome: 200, 503
(queue full), another HTTP status, or a transport failure (connect error, reset, timeout, stream cut before
`[DONE]`). It prints one JSON object on stdout (and to --json PATH) and a short table on stderr. Failed requests are
counted, not fatal: the exit status is non-zero only for bad arguments or a server that cannot be reached.

Prompts: the server takes a string, so each prompt is common English words (about one token each in BPE
vocabularies), rotated per request so no two prompts share a prefix (no prefix-cache hits). One request with
max_tokens=1 first asks the server how many tokens a probe prompt makes, and the word count is scaled to hit
--prompt-tokens; `prompt_tokens_mean` in the output is what the server actually counted. Generation runs at
temperature 0 until max_tokens (random-init models rarely emit the stop token); `completion_tokens_mean` says
how many were generated.

    python bench/serve_load.py --url http://127.0.0.1:8000 --requests 256 --concurrency 256 --arrival burst
    python bench/serve_load.py --serve "model=r1_distill_qwen_7b hardware=auto precision=bf16 serve.max_batch=32" \\
        --requests 64 --concurrency 32 --prompt-tokens 512 --max-tokens 256
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

# httpx.AsyncClient, not the openai client: openai wraps this same httpx client and adds a pydantic model per chunk
# and its retry layer — per-chunk work on the one event loop that also times 256 streams. A hand-written asyncio
# socket client would shave a little more but would reimplement chunked transfer decoding; httpx's aiter_lines
# plus json.loads is the least per-chunk work that still speaks HTTP/1.1 correctly to any server.
import httpx

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 600.0  # loading a large model from a cold disk takes minutes
SERVING = re.compile(r"dsrun: serving (\S+) at (http://\S+?)/v1")
WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but have an they "
         "you were her she there one all we their been has when who will more no if out so said what up its about "
         "into than them can only other new some could time these two may then do first any my now such like our "
         "over man me even most made after also did many before must through back years where much your way well"
         ).split()


@dataclass
class Result:
    outcome: str = "ok"  # ok | rejected_503 | http_<status> | connect_error | reset | timeout | incomplete_stream
    sent: float = 0.0
    chunk_times: list[float] = field(default_factory=list)  # arrival of each text-bearing chunk
    finished: float = 0.0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


def prompt_text(words: int, index: int) -> str:
    return " ".join(WORDS[(index + i) % len(WORDS)] for i in range(words))


def request_body(args: argparse.Namespace, model: str, prompt: str, max_tokens: int, stream: bool) -> dict:
    body: dict = {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": stream,
                  **({"stream_options": {"include_usage": True}} if stream else {})}
    return {**body, **({"messages": [{"role": "user", "content": prompt}]} if args.endpoint == "chat"
                       else {"prompt": prompt})}


def chunk_text(chunk: dict) -> str:
    choices = chunk.get("choices") or [{}]
    delta = choices[0].get("delta") or {}
    return choices[0].get("text") or delta.get("content") or delta.get("reasoning_content") or ""


async def one_request(client: httpx.AsyncClient, path: str, body: dict) -> Result:
    result = Result(sent=time.perf_counter())
    try:
        async with client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                await response.aread()
                result.outcome = "rejected_503" if response.status_code == 503 else f"http_{response.status_code}"
                return result
            done = False
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                if chunk_text(chunk):
                    result.chunk_times.append(time.perf_counter())
                if usage := chunk.get("usage"):
                    result.prompt_tokens, result.completion_tokens = usage["prompt_tokens"], usage["completion_tokens"]
            if not done:
                result.outcome = "incomplete_stream"
    except httpx.ConnectError:
        result.outcome = "connect_error"
    except httpx.TimeoutException:
        result.outcome = "timeout"
    except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
        result.outcome = "reset"  # the server closed or reset the connection mid-request
    except (httpx.HTTPError, ValueError) as exc:  # anything else, a chunk that is not JSON included
        result.outcome = type(exc).__name__
    finally:
        result.finished = time.perf_counter()
    return result


async def prepare(client: httpx.AsyncClient, args: argparse.Namespace) -> tuple[str, int]:
    """The served model's id and the word count that makes about --prompt-tokens tokens; SystemExit if the server
    cannot be reached or refuses the key."""
    try:
        response = await client.get("/v1/models")
    except httpx.HTTPError as exc:
        raise SystemExit(f"serve_load: cannot reach {args.url} ({type(exc).__name__}: {exc})") from None
    if response.status_code != 200:
        raise SystemExit(f"serve_load: GET /v1/models answered {response.status_code}: {response.text[:200]}")
    model = response.json()["data"][0]["id"]
    words = args.prompt_tokens
    for _ in range(2):  # the second probe corrects a count that the first one's template or BOS skewed
        probe = await client.post(args.path, json=request_body(args, model, prompt_text(words, 0), 1, stream=False))
        if probe.status_code != 200:
            raise SystemExit(f"serve_load: the calibration request answered {probe.status_code}: {probe.text[:300]}")
        measured = probe.json()["usage"]["prompt_tokens"]
        words = max(1, round(words * args.prompt_tokens / measured))
    return model, words


async def run_load(args: argparse.Namespace, headers: dict) -> dict:
    timeout = httpx.Timeout(args.timeout, connect=30.0, pool=None)
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=args.url, headers=headers, timeout=timeout, limits=limits) as client:
        model, words = await prepare(client, args)
        gate, rng = asyncio.Semaphore(args.concurrency), random.Random(args.seed)

        async def gated(index: int) -> Result:
            async with gate:
                body = request_body(args, model, prompt_text(words, index), args.max_tokens, stream=True)
                return await one_request(client, args.path, body)

        tasks = []
        for index in range(args.requests):
            if args.arrival == "poisson" and index:
                await asyncio.sleep(rng.expovariate(args.rate))
            tasks.append(asyncio.create_task(gated(index)))
        results = await asyncio.gather(*tasks)
    return summarize(args, model, results)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def rnd(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def summarize(args: argparse.Namespace, model: str, results: list[Result]) -> dict:
    ok = [r for r in results if r.outcome == "ok"]
    outcomes = Counter(r.outcome for r in results)
    errors = {kind: n for kind, n in outcomes.items() if kind not in ("ok", "rejected_503")}
    ttft = [(r.chunk_times[0] - r.sent) * 1e3 for r in ok if r.chunk_times]
    itl = [(b - a) * 1e3 for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    completion = [r.completion_tokens for r in ok if r.completion_tokens is not None]
    decode = [(r.completion_tokens - 1) / (r.chunk_times[-1] - r.chunk_times[0]) for r in ok
              if r.completion_tokens and r.completion_tokens > 1 and r.chunk_times[-1] > r.chunk_times[0]]
    wall_s = max(r.finished for r in results) - min(r.sent for r in results)
    return {
        "url": args.url, "model": model, "endpoint": args.endpoint, "arrival": args.arrival,
        "rate": args.rate if args.arrival == "poisson" else None, "concurrency": args.concurrency,
        "prompt_tokens_target": args.prompt_tokens, "max_tokens": args.max_tokens,
        "requests": len(results), "ok": len(ok), "rejected_503": outcomes["rejected_503"],
        "errors": sum(errors.values()), "error_kinds": errors,
        "ttft_ms": {"p50": rnd(percentile(ttft, 0.5)), "p99": rnd(percentile(ttft, 0.99)), "mean": rnd(mean(ttft))},
        "itl_ms": {"p50": rnd(percentile(itl, 0.5)), "p99": rnd(percentile(itl, 0.99))},
        "tokens_per_s": rnd(sum(completion) / wall_s if wall_s > 0 else None, 1),
        "decode_tokens_per_s_mean": rnd(mean(decode), 1),
        "prompt_tokens_mean": rnd(mean([r.prompt_tokens for r in ok if r.prompt_tokens is not None]), 1),
        "completion_tokens_mean": rnd(mean(completion), 1),
        "wall_s": rnd(wall_s, 3),
    }


def start_server(serve_args: str) -> tuple[subprocess.Popen, str, list[str]]:
    """`python -m dsrun serve ARGS serve.port=0`, waited for until it prints its address; its stderr keeps being
    read (into the returned list) so a chatty server never blocks on a full pipe."""
    command = [sys.executable, "-m", "dsrun", "serve", *shlex.split(serve_args), "serve.port=0"]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: list[str] = []
    found: list[str] = []
    ready = threading.Event()

    def drain() -> None:
        for line in proc.stderr:
            lines.append(line)
            if not found and SERVING.search(line):
                found.append(line.strip())
                ready.set()
        ready.set()  # the server exited before serving

    threading.Thread(target=drain, daemon=True).start()
    if not ready.wait(START_TIMEOUT_S):
        proc.kill()
    if not found:
        proc.wait()
        raise SystemExit(f"serve_load: the server exited {proc.returncode} before serving (or was killed after "
                         f"{START_TIMEOUT_S:.0f} s):\n{''.join(lines[-30:])}")
    print(f"serve_load: {found[0]}", file=sys.stderr)
    return proc, SERVING.search(found[0]).group(2), lines


def stop_server(proc: subprocess.Popen, lines: list[str]) -> int:
    """SIGTERM, then its exit code; the tail of its stderr when that is not 0, so a failing server explains itself."""
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait()
    if code != 0:
        print(f"serve_load: the server exited {code}:\n{''.join(lines[-20:])}", file=sys.stderr)
    return code


def table(row: dict) -> str:
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(row["error_kinds"].items())) or "none"
    return "\n".join([
        f"serve_load: {row['requests']} requests ({row['arrival']}, {row['concurrency']} in flight) → "
        f"{row['ok']} ok, {row['rejected_503']} rejected (503), {row['errors']} errors ({kinds})",
        f"  TTFT ms      p50 {row['ttft_ms']['p50']}  p99 {row['ttft_ms']['p99']}  mean {row['ttft_ms']['mean']}",
        f"  ITL ms       p50 {row['itl_ms']['p50']}  p99 {row['itl_ms']['p99']}",
        f"  tokens/s     {row['tokens_per_s']} aggregate, {row['decode_tokens_per_s_mean']} per request (decode)",
        f"  tokens       prompt {row['prompt_tokens_mean']} (target {row['prompt_tokens_target']}), "
        f"completion {row['completion_tokens_mean']} (max {row['max_tokens']})",
        f"  wall         {row['wall_s']} s"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    where.add_argument("--serve", metavar="ARGS", help='start `python -m dsrun serve ARGS serve.port=0`, e.g. '
                                                       '"model=tiny_qwen2 hardware=cpu"; SIGTERM it at the end')
    parser.add_argument("--api-key-env", metavar="NAME", help="environment variable holding the API key")
    parser.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=32, help="most requests in flight at once")
    parser.add_argument("--arrival", choices=("burst", "poisson"), default="burst")
    parser.add_argument("--rate", type=float, help="requests/s for --arrival poisson")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds a request may wait for its next bytes")
    parser.add_argument("--seed", type=int, default=0, help="for the Poisson arrival times")
    parser.add_argument("--json", metavar="PATH", help="also write the result here")
    args = parser.parse_args(argv)
    if min(args.requests, args.concurrency, args.prompt_tokens, args.max_tokens) < 1:
        parser.error("--requests, --concurrency, --prompt-tokens and --max-tokens must be at least 1")
    if args.arrival == "poisson" and not (args.rate and args.rate > 0):
        parser.error("--arrival poisson needs --rate R (requests/s, > 0)")
    if args.api_key_env and not os.environ.get(args.api_key_env):
        parser.error(f"--api-key-env {args.api_key_env}: that environment variable is not set or empty")
    args.path = "/v1/chat/completions" if args.endpoint == "chat" else "/v1/completions"
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    headers = {"Authorization": f"Bearer {os.environ[args.api_key_env]}"} if args.api_key_env else {}
    proc, lines = None, []
    if args.serve is not None:
        proc, args.url, lines = start_server(args.serve)
    try:
        row = asyncio.run(run_load(args, headers))
    finally:
        exit_code = stop_server(proc, lines) if proc is not None else None
    if proc is not None:
        row["server_exit_code"] = exit_code
    print(table(row), file=sys.stderr)
    print(json.dumps(row))
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=2) + "\n")


if __name__ == "__main__":
    main()
