"""`dsrun serve`: one real server process (tiny Qwen2-architecture model, random init, CPU) shared by the tests of
this module, spoken to with the official `openai` client at 127.0.0.1."""

from __future__ import annotations

import io
import json
import re
import signal
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import FAST, assert_user_error, dsrun, start

openai = pytest.importorskip("openai", reason="the openai client is a dev extra: pip install -e '.[dev]'")

KEY_ENV = "DSRUN_TEST_SERVE_KEY"
KEY = "test-key-not-a-secret"


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


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("serve") / "run"
    proc = start("serve", "model=tiny_qwen2", "hardware=cpu", "serve.port=0", f"serve.api_key_env={KEY_ENV}",
                 "serve.max_tokens=64", "serve.max_prompt_tokens=256", f"hydra.run.dir={run_dir}",
                 env={KEY_ENV: KEY})
    port = int(wait_for(proc, r"serving tiny_qwen2 at http://127\.0\.0\.1:(\d+)/v1").group(1))
    yield proc, port
    if proc.poll() is None:
        proc.kill()
        proc.wait(30)


def client(port: int, key: str = KEY):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=120)


def post(port: int, path: str, body: bytes, key: str = KEY) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method="POST",
                                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_chat_completion_models_and_completions(server):
    _, port = server
    api = client(port)
    assert [m.id for m in api.models.list()] == ["tiny_qwen2"]
    chat = api.chat.completions.create(model="tiny_qwen2", messages=[{"role": "user", "content": "What is 2+2?"}],
                                       max_tokens=6, temperature=0)
    assert chat.choices[0].finish_reason in ("stop", "length")
    assert chat.usage.completion_tokens >= 1 and chat.choices[0].message.content
    again = api.chat.completions.create(model="tiny_qwen2", messages=[{"role": "user", "content": "What is 2+2?"}],
                                        max_tokens=6, temperature=0)
    assert again.choices[0].message.content == chat.choices[0].message.content, "temperature 0 is greedy"
    text = api.completions.create(model="tiny_qwen2", prompt="Once upon a time", max_tokens=4)
    assert text.choices[0].text and text.usage.completion_tokens == 4


def test_streaming_yields_the_same_text_in_pieces(server):
    _, port = server
    api = client(port)
    messages = [{"role": "user", "content": "Count to three."}]
    whole = api.chat.completions.create(model="m", messages=messages, max_tokens=8, temperature=0)
    chunks = list(api.chat.completions.create(model="m", messages=messages, max_tokens=8, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 2
    assert "".join(pieces) == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_bad_requests_get_a_4xx_with_a_message(server):
    _, port = server
    status, body = post(port, "/v1/chat/completions", b'{"messages": [')
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    long = json.dumps({"messages": [{"role": "user", "content": "word " * 400}], "max_tokens": 4}).encode()
    status, body = post(port, "/v1/chat/completions", long)
    assert status == 400 and "serve.max_prompt_tokens" in body["error"]["message"]
    status, body = post(port, "/v1/chat/completions", json.dumps({"messages": [{"content": "x"}]}).encode())
    assert status == 400 and "role" in body["error"]["message"]
    status, body = post(port, "/v1/completions", json.dumps({"prompt": "x", "max_tokens": 10_000}).encode())
    assert status == 400 and "serve.max_tokens" in body["error"]["message"]
    with pytest.raises(openai.AuthenticationError):
        client(port, key="wrong").models.list()
    status, body = post(port, "/v1/completions", json.dumps({"prompt": "x"}).encode(), key="wrong")
    assert status == 401 and "API key" in body["error"]["message"]


def test_twenty_concurrent_requests_complete_and_were_batched(server):
    _, port = server
    api = client(port)

    def ask(i: int):
        return api.chat.completions.create(model="m", messages=[{"role": "user", "content": f"Question {i}?"}],
                                           max_tokens=8, temperature=0.7)

    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(ask, range(20)))
    assert all(a.usage.completion_tokens >= 1 for a in answers)
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    largest = float(re.search(r"^dsrun_serve_max_batch_size (\S+)$", metrics, re.M).group(1))
    assert largest >= 8, f"the engine decoded at most {largest} sequences together"
    assert re.search(r"^dsrun_serve_generated_tokens_total (\S+)$", metrics, re.M)
    assert "dsrun_serve_time_to_first_token_seconds_bucket" in metrics
    assert urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30).status == 200


def test_sigterm_stops_the_server_with_exit_0(server):
    proc, port = server
    assert KEY not in proc.stderr.getvalue() if hasattr(proc, "_chunks") else True, "the key is never printed"
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(60)
    except Exception:
        proc.kill()
        raise AssertionError(proc.stderr.getvalue() if hasattr(proc, "_chunks") else "") from None
    assert code == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2)


def test_a_taken_port_is_one_line_and_exit_2(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = dsrun("serve", "model=tiny_qwen2", *FAST, f"serve.port={port}", run_dir=tmp_path / "run")
    assert_user_error(proc, f"serve.port={port}", "serve.port=0")
