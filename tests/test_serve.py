"""`dsrun serve`: real server processes (tiny Qwen2-architecture model, random init, CPU) shared by the tests of this
module, spoken to with the official `openai` client, httpx and raw sockets at 127.0.0.1. `server` is the default
setup with an API key; `small` is a second one for what needs another config (a queue of 4, public metrics,
serve.reasoning=inline)."""

from __future__ import annotations

import asyncio
import io
import json
import re
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import FAST, assert_user_error, dsrun, start

openai = pytest.importorskip("openai", reason="the openai client is a dev extra: pip install -e '.[dev]'")

KEY_ENV = "DSRUN_TEST_SERVE_KEY"
KEY = "test-key-not-a-secret"
AUTH = {"Authorization": f"Bearer {KEY}"}
ASK = [{"role": "user", "content": "What is 2+2?"}]


def stderr_of(proc) -> str:
    """What a server wrote on stderr so far (forked runs buffer it; a Popen's is read once it has ended)."""
    if isinstance(proc.stderr, io.StringIO) or hasattr(proc, "_chunks"):
        return proc.stderr.getvalue()
    return proc.stderr.read() if proc.poll() is not None else ""


def wait_for(proc, pattern: str, timeout: float = 120) -> re.Match:
    """The first stderr line of a running dsrun matching pattern (forked runs buffer stderr; Popen streams it)."""
    deadline, seen = time.time() + timeout, ""
    while time.time() < deadline:
        if isinstance(proc.stderr, io.StringIO) or hasattr(proc, "_chunks"):
            seen = proc.stderr.getvalue()
        else:
            seen += proc.stderr.readline()
        if match := re.search(pattern, seen):
            return match
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(f"no {pattern!r} from the server (exit {proc.poll()}):\n{seen}")


def serve(run_dir, *overrides: str):
    proc = start("serve", "model=tiny_qwen2", "hardware=cpu", "serve.port=0", f"serve.api_key_env={KEY_ENV}",
                 *overrides, f"hydra.run.dir={run_dir}", env={KEY_ENV: KEY})
    port = int(wait_for(proc, r"serving tiny_qwen2 at http://127\.0\.0\.1:(\d+)/v1").group(1))
    return proc, port


def stop(proc) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc, port = serve(tmp_path_factory.mktemp("serve") / "run", "serve.max_tokens=256", "serve.max_prompt_tokens=256")
    yield proc, port
    stop(proc)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    proc, port = serve(tmp_path_factory.mktemp("small") / "run", "serve.max_queue=4", "serve.max_tokens=16",
                       "serve.metrics_public=true", "serve.reasoning=inline")
    yield proc, port
    stop(proc)


def client(port: int, key: str = KEY):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=120)


def post(port: int, path: str, body: bytes | dict, key: str = KEY) -> httpx.Response:
    content = json.dumps(body).encode() if isinstance(body, dict) else body
    return httpx.post(f"http://127.0.0.1:{port}{path}", content=content, timeout=60,
                      headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})


def metric(port: int, name: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", headers=AUTH, timeout=30).text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None, fragment: str = "") -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["param"] == param and fragment in error["message"], error
    return error


def test_chat_completion_models_and_completions(server):
    """The default serve.reasoning=split: R1's template opens <think>, and a random model never closes it, so all
    of its text is reasoning and the content is "" (as vLLM's deepseek_r1 parser, which gives null there)."""
    _, port = server
    api = client(port)
    assert [m.id for m in api.models.list()] == ["tiny_qwen2"]
    chat = api.chat.completions.create(model="tiny_qwen2", messages=ASK, max_tokens=6, temperature=0)
    message = chat.choices[0].message
    assert chat.choices[0].finish_reason in ("stop", "length") and chat.usage.completion_tokens >= 1
    assert message.content == "" and message.reasoning_content and "</think>" not in message.reasoning_content
    again = post(port, "/v1/chat/completions", {"messages": ASK, "max_tokens": 6, "temperature": 0})  # no model
    assert again.json()["choices"][0]["message"]["reasoning_content"] == message.reasoning_content, "greedy"
    text = api.completions.create(model="tiny_qwen2", prompt="Once upon a time", max_tokens=4)
    assert text.choices[0].text and text.usage.completion_tokens == 4


def test_streaming_yields_the_same_text_in_pieces(server):
    _, port = server
    api = client(port)
    whole = api.chat.completions.create(model="tiny_qwen2", messages=ASK, max_tokens=8, temperature=0)
    chunks = list(api.chat.completions.create(model="tiny_qwen2", messages=ASK, max_tokens=8, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    pieces = [d.reasoning_content for d in deltas if getattr(d, "reasoning_content", None)]
    assert len(pieces) >= 2 and not any(d.content for d in deltas)
    assert "".join(pieces) == whole.choices[0].message.reasoning_content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


BAD = [  # body (messages added for chat), status, the param named, a fragment of the message
    ({"max_tokens": 0}, 400, "max_tokens", "from 1 to 256"),
    ({"max_completion_tokens": 0}, 400, "max_completion_tokens", "from 1 to 256"),
    ({"max_tokens": True}, 400, "max_tokens", "integer"),
    ({"max_tokens": 10_000}, 400, "max_tokens", "serve.max_tokens"),
    ({"n": True}, 400, "n", "must be 1"),
    ({"n": 2}, 400, "n", "must be 1"),
    ({"temperature": True}, 400, "temperature", "number"),
    ({"temperature": 3}, 400, "temperature", "from 0 to 2"),
    ({"top_p": 0}, 400, "top_p", "(0, 1]"),
    ({"top_k": -2}, 400, "top_k", ">= -1"),
    ({"top_k": 1.5}, 400, "top_k", "integer"),
    ({"seed": "7"}, 400, "seed", "integer"),
    ({"stream": "yes"}, 400, "stream", "true or false"),
    ({"stop": ["\n"]}, 400, "stop", "stop strings are not supported yet"),
    ({"logprobs": True}, 400, "logprobs", "not supported"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools", "not supported"),
    ({"frequency_penalty": 0.5}, 400, "frequency_penalty", "not supported"),
    ({"max_token": 5}, 400, "max_token", "Unrecognized request argument"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "messages[0].content", "'image_url' part"),
    ({"messages": [{"content": "x"}]}, 400, "messages", "role"),
    ({"messages": [{"role": "user", "content": "word " * 400}]}, 400, "messages", "serve.max_prompt_tokens"),
    ({"model": "gpt-4o"}, 404, "model", "does not exist"),
]


@pytest.mark.parametrize("body, status, param, fragment", BAD, ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_a_bad_field_is_refused_naming_it(server, body, status, param, fragment):
    """OpenAI's error shape with the field in `param`; nothing is silently ignored or read as a default (the old
    server took max_tokens=0 and booleans as numbers, and dropped keys it did not know)."""
    _, port = server
    assert_openai_error(post(port, "/v1/chat/completions", {"messages": ASK, **body}), status, param, fragment)


def test_malformed_requests_unknown_models_and_keys(server):
    _, port = server
    assert_openai_error(post(port, "/v1/chat/completions", b'{"messages": ['), 400, None, "not valid JSON")
    assert_openai_error(post(port, "/v1/completions", {"prompt": 7}), 400, "prompt", "non-empty string")
    assert_openai_error(post(port, "/v1/completions", {"prompt": "x", "messages": ASK}), 400, "messages",
                        "Unrecognized")
    assert_openai_error(post(port, "/v1/completions", {"prompt": "x"}, key="wrong"), 401, None, "API key")
    assert_openai_error(post(port, "/v1/embeddings", {"input": "x"}), 404, None, "no such endpoint")
    with pytest.raises(openai.NotFoundError) as missing:
        client(port).chat.completions.create(model="gpt-4o", messages=ASK, max_tokens=2)
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        client(port, key="wrong").models.list()


def test_a_body_over_4_mib_is_413_and_the_client_reads_it(server):
    _, port = server
    big = json.dumps({"messages": [{"role": "user", "content": "x" * (5 * 2**20)}]}).encode()
    assert_openai_error(post(port, "/v1/chat/completions", big), 413, None, "at most 4,194,304")


def test_extensions_and_harmless_keys_are_served(server):
    """top_k and seed reach the engine (the same seed samples the same text at temperature 1); text content parts
    are joined; `user`, `stream_options`, `logprobs: false`, `stop: null` are accepted."""
    _, port = server

    def ask(seed: int) -> str:
        response = post(port, "/v1/chat/completions", {
            "model": "tiny_qwen2", "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
            "max_tokens": 8, "temperature": 1.0, "top_k": 50, "seed": seed, "user": "u1", "logprobs": False,
            "stop": None, "stream_options": None})
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["message"]["reasoning_content"]

    assert ask(7) == ask(7) != ask(8)


def test_twenty_concurrent_requests_complete_and_were_batched(server):
    _, port = server
    api = client(port)

    def ask(i: int):
        return api.chat.completions.create(model="tiny_qwen2", messages=[{"role": "user", "content": f"Q {i}?"}],
                                           max_tokens=8, temperature=0.7)

    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(ask, range(20)))
    assert all(a.usage.completion_tokens >= 1 for a in answers)
    assert metric(port, "dsrun_serve_max_batch_size") >= 8, "the engine decoded fewer than 8 sequences together"
    assert metric(port, "dsrun_serve_generated_tokens_total") > 0
    assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=30).status_code == 200


def raw_request(port: int, body: dict) -> socket.socket:
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(payload) + payload)
    return sock


def test_a_client_that_leaves_cancels_its_request(server):
    """A stream closed after its first chunk, and a whole request closed while it waits, are cancelled: their
    places are freed (running and queue gauges back to 0) instead of decoding to max_tokens for nobody."""
    _, port = server
    cancelled = 'dsrun_serve_requests_total{outcome="cancelled"}'
    before = metric(port, cancelled)
    stream = raw_request(port, {"messages": ASK, "max_tokens": 256, "temperature": 0, "stream": True})
    received = b""
    while b"data: " not in received:
        received += stream.recv(4096)
    stream.close()
    whole = raw_request(port, {"messages": ASK, "max_tokens": 256, "temperature": 0})
    deadline = time.time() + 10
    while time.time() < deadline and not metric(port, "dsrun_serve_running_requests"):  # it is generating
        time.sleep(0.01)
    whole.close()
    deadline = time.time() + 10
    while time.time() < deadline and (metric(port, cancelled) < before + 2 or metric(
            port, "dsrun_serve_running_requests") or metric(port, "dsrun_serve_queue_depth")):
        time.sleep(0.1)
    assert metric(port, cancelled) == before + 2
    assert metric(port, "dsrun_serve_running_requests") == 0 and metric(port, "dsrun_serve_queue_depth") == 0


def test_probes_that_hang_up_print_nothing(server):
    """A readiness probe that times out or connects and leaves: no traceback, no line on the console."""
    proc, port = server
    before = stderr_of(proc)
    socket.create_connection(("127.0.0.1", port), timeout=5).close()
    half = socket.create_connection(("127.0.0.1", port), timeout=5)
    half.sendall(b"GET /health HTTP/1.1\r\nHost: t")
    half.close()
    early = socket.create_connection(("127.0.0.1", port), timeout=5)
    early.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
    early.close()
    assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=30).json() == {"status": "ok"}
    time.sleep(0.5)
    assert stderr_of(proc) == before


def test_metrics_need_the_key_unless_public(server, small):
    _, port = server
    assert_openai_error(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30), 401, None, "API key")
    assert httpx.get(f"http://127.0.0.1:{port}/metrics", headers=AUTH, timeout=30).status_code == 200
    assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=30).status_code == 200
    _, public = small
    scrape = httpx.get(f"http://127.0.0.1:{public}/metrics", timeout=30)
    assert scrape.status_code == 200 and "dsrun_serve_queue_depth" in scrape.text
    assert httpx.get(f"http://127.0.0.1:{public}/v1/models", timeout=30).status_code == 401, "only /metrics is public"


def test_a_burst_of_256_clients_gets_200_or_503_never_a_reset(small):
    """serve.max_queue=4: the rest are refused with 503, Retry-After and OpenAI's error shape. The stdlib server
    listened with a backlog of 5: a burst like this one had its connections reset."""
    _, port = small

    async def burst() -> list[httpx.Response | Exception]:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=120, limits=limits, headers=AUTH) as http:
            body = {"messages": ASK, "max_tokens": 2}
            return await asyncio.gather(*(http.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body)
                                          for _ in range(256)), return_exceptions=True)

    answers = asyncio.run(burst())
    failed = [a for a in answers if isinstance(a, Exception)]
    assert not failed, f"{len(failed)} connection errors, e.g. {failed[0]!r}"
    statuses = [a.status_code for a in answers]
    assert set(statuses) == {200, 503}, statuses
    refused = next(a for a in answers if a.status_code == 503)
    assert refused.headers["Retry-After"] == "1"
    assert assert_openai_error(refused, 503, None, "serve.max_queue=4")["type"] == "server_error"


def test_inline_reasoning_keeps_the_think_tag_in_content(small):
    """serve.reasoning=inline: the text as generated, opened by the <think> the prompt left open."""
    _, port = small
    api = client(port)
    whole = api.chat.completions.create(model="tiny_qwen2", messages=ASK, max_tokens=6, temperature=0)
    assert whole.choices[0].message.content.startswith("<think>\n")
    assert getattr(whole.choices[0].message, "reasoning_content", None) is None
    chunks = api.chat.completions.create(model="tiny_qwen2", messages=ASK, max_tokens=6, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content


class Pieces:
    """A tokenizer whose token i decodes to PIECES[i]: tags arrive split across tokens as a real one's may."""

    def __init__(self, pieces: list[str]):
        self.pieces = pieces

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(self.pieces[i] for i in ids)


def run_output(pieces: list[str], chat: bool, reasoning: str, opened: bool) -> tuple[dict, list]:
    from dsrun.inference.api import Output  # torch and transformers: loaded by this test only, not at collection

    output = Output(Pieces(pieces), stop=[], chat=chat, reasoning=reasoning, opened=opened)
    streamed = [p for i in range(len(pieces)) for p in output.add([i])] + output.finish()
    return output.whole, streamed


@pytest.mark.parametrize("pieces, chat, reasoning, opened, expected", [
    (["Two and", " two.</th", "ink>\n\n", "Four."], True, "split", True,
     {"reasoning_content": "Two and two.", "content": "\n\nFour."}),
    (["Still", " thinking <", "/thi"], True, "split", True, {"reasoning_content": "Still thinking </thi",
                                                             "content": ""}),
    (["<thi", "nk>hmm</think>", "Four."], True, "split", False, {"reasoning_content": "hmm", "content": "Four."}),
    (["Four."], True, "split", False, {"content": "Four."}),
    (["Two.</think>", "Four."], True, "inline", True, {"content": "<think>\nTwo.</think>Four."}),
    ([], True, "inline", True, {"content": "<think>\n"}),
    (["a</think>", "b"], False, "split", False, {"text": "a</think>b"}),
], ids=["split-closed", "split-never-closed", "split-opened-by-model", "split-no-thinking", "inline", "inline-empty",
        "completions-raw"])
def test_reasoning_split_and_inline(pieces, chat, reasoning, opened, expected):
    """The reply builder on a scripted token stream (a random model never writes </think>): the streamed pieces add
    up to the whole reply, field by field."""
    whole, streamed = run_output(pieces, chat, reasoning, opened)
    assert whole == expected
    for field, text in expected.items():
        assert "".join(piece for name, piece in streamed if name == field) == text


def test_sigterm_stops_the_server_with_exit_0(server):
    """A stream running when SIGTERM comes finishes ([DONE]); then the port closes, the exit is 0 and nothing but
    dsrun's own lines reached stderr in the whole life of the server (no traceback, no uvicorn line)."""
    proc, port = server
    received: list[str] = []
    first = threading.Event()

    def read_stream() -> None:
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", headers=AUTH, timeout=60,
                          json={"messages": ASK, "max_tokens": 128, "temperature": 0, "stream": True}) as response:
            for line in response.iter_lines():
                received.append(line)
                first.set()

    reader = threading.Thread(target=read_stream)
    reader.start()
    assert first.wait(30)
    proc.send_signal(signal.SIGTERM)
    reader.join(60)
    try:
        code = proc.wait(60)
    except Exception:
        proc.kill()
        raise AssertionError(stderr_of(proc)) from None
    events = [line for line in received if line]
    assert events[-1] == "data: [DONE]" and '"finish_reason": "length"' in events[-2], events[-3:]
    assert code == 0
    stderr = stderr_of(proc)
    assert KEY not in stderr, "the key is never printed"
    assert "Traceback" not in stderr and all(ln.startswith("dsrun: ") for ln in stderr.splitlines() if ln), stderr
    assert "dsrun: server stopped" in stderr
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2)


def test_a_taken_port_is_one_line_and_exit_2(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = dsrun("serve", "model=tiny_qwen2", *FAST, f"serve.port={port}", run_dir=tmp_path / "run")
    assert_user_error(proc, f"serve.port={port}", "serve.port=0")
