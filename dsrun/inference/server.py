"""task=serve (`dsrun serve SOURCE`): an OpenAI-compatible HTTP API over a batching engine (dsrun/inference/engine.py).

/v1/chat/completions and /v1/completions (streamed as server-sent events, or whole), /v1/models, /health and
Prometheus /metrics. The stdlib's ThreadingHTTPServer carries it: one thread per connection is plenty next to a
model that decodes every request in one batch, and it adds no dependency. The port is bound before the model loads
(a taken port stops at once); SIGTERM stops accepting, lets running requests finish (30 s), and exits 0.
"""

from __future__ import annotations

import hmac
import json
import os
import signal
import socket
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from dsrun.errors import UserError
from dsrun.inference.chat import ChatError, Detokenizer, render, stop_ids
from dsrun.inference.engine import Engine, QueueFull, Request, build_engine
from dsrun.inference.load import Loaded, describe, load
from dsrun.inference.metrics import ServerMetrics
from dsrun.inference.vllm import serve_with_vllm

MAX_BODY_BYTES = 4 * 2**20
DRAIN_TIMEOUT_S = 30.0


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.kind = status, kind


def serve_task(cfg: Any) -> None:
    srv = cfg.serve
    if srv.engine == "vllm":
        return serve_with_vllm(cfg)
    describe(cfg.task.source)  # a wrong source stops before the port or the model
    api_key = _api_key(srv)
    httpd = bind(srv.host, srv.port)
    loaded = load(cfg)
    metrics = ServerMetrics()
    engine = build_engine(loaded.model, srv, metrics)
    httpd.app = App(loaded, engine, metrics, srv, api_key)  # type: ignore[attr-defined]
    host, port = httpd.server_address[:2]
    stopping = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        if not stopping.is_set():
            stopping.set()
            print(f"dsrun: {signal.Signals(signum).name}: finishing running requests, then stopping", file=sys.stderr)
            threading.Thread(target=httpd.shutdown, daemon=True).start()  # shutdown() waits for serve_forever

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    print(f"dsrun: serving {loaded.name} at http://{host}:{port}/v1 ({type(engine).__name__}, up to "
          f"{srv.max_batch} sequences per batch{', API key required' if api_key else ''})", file=sys.stderr, flush=True)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"dsrun: warning: serving on {host} without an API key; set serve.api_key_env", file=sys.stderr)
    try:
        httpd.serve_forever(poll_interval=0.2)
    finally:
        engine.stop(DRAIN_TIMEOUT_S)
        httpd.close_idle()
        httpd.server_close()  # joins the connection threads: every response is written
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("dsrun: server stopped", file=sys.stderr)


def _api_key(srv: Any) -> str | None:
    """The key comes from the environment variable serve.api_key_env names: it never enters the config, the run
    folder or a log."""
    if srv.api_key_env is None:
        return None
    key = os.environ.get(srv.api_key_env)
    if not key:
        raise UserError(f"serve.api_key_env={srv.api_key_env}: that environment variable is not set or empty; "
                        f"export {srv.api_key_env}=<key>, or leave serve.api_key_env unset for no key")
    return key


class Server(ThreadingHTTPServer):
    daemon_threads = False  # server_close() waits for running responses
    block_on_close = True
    allow_reuse_address = False  # a port held by another server is refused, not shared

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def close_idle(self) -> None:
        """End the reading side of every connection: a client's idle keep-alive connection (the openai client keeps
        them) would otherwise hold its thread, and server_close() would wait for it forever. A response being
        written is not affected."""
        with self.connections_lock:
            for connection in self.connections:
                try:
                    connection.shutdown(socket.SHUT_RD)
                except OSError:
                    pass


def bind(host: str, port: int) -> Server:
    try:
        return Server((host, port), Handler)
    except OSError as exc:
        raise UserError(f"serve.port={port}: cannot listen on {host}:{port} ({exc.strerror}); choose another port, "
                        "or serve.port=0 for a free one") from None


class App:
    """The endpoints' logic, apart from HTTP plumbing."""

    def __init__(self, loaded: Loaded, engine: Engine, metrics: ServerMetrics, srv: Any, api_key: str | None):
        self.loaded, self.engine, self.metrics, self.srv, self.api_key = loaded, engine, metrics, srv, api_key
        self.stop = stop_ids(loaded.tokenizer, loaded.model)
        self.created = int(time.time())

    def authorized(self, header: str | None) -> bool:
        if self.api_key is None:
            return True
        given = (header or "").removeprefix("Bearer ").strip()
        return hmac.compare_digest(given.encode(), self.api_key.encode())

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": self.loaded.name, "object": "model", "created": self.created,
                                            "owned_by": "dsrun", "max_model_len": self.loaded.context}]}

    def request(self, body: dict[str, Any], chat: bool) -> tuple[Request, dict[str, Any]]:
        """Check a completion request and turn it into an engine request (ApiError 400 when it cannot be served)."""
        if chat:
            try:
                ids = render(self.loaded.tokenizer, body.get("messages"))
            except ChatError as exc:
                raise ApiError(400, str(exc)) from None
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str) or not prompt:
                raise ApiError(400, "`prompt` must be a non-empty string")
            ids = self.loaded.tokenizer.encode(prompt)
        srv = self.srv
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens")) or srv.max_tokens
        temperature = body.get("temperature", srv.temperature)
        top_p = body.get("top_p", srv.top_p)
        if not isinstance(max_tokens, int) or not 1 <= max_tokens <= srv.max_tokens:
            raise ApiError(400, f"max_tokens={max_tokens}: must be an integer from 1 to {srv.max_tokens} "
                                "(serve.max_tokens)")
        if not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
            raise ApiError(400, f"temperature={temperature}: must be a number from 0 to 2")
        if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise ApiError(400, f"top_p={top_p}: must be a number in (0, 1]")
        if body.get("n", 1) != 1:
            raise ApiError(400, "n: only 1 completion per request is served")
        if len(ids) > srv.max_prompt_tokens:
            raise ApiError(400, f"the prompt is {len(ids):,} tokens; this server takes at most "
                                f"{srv.max_prompt_tokens:,} (serve.max_prompt_tokens)")
        if len(ids) + max_tokens > self.loaded.context:
            raise ApiError(400, f"the prompt ({len(ids):,} tokens) plus max_tokens ({max_tokens}) exceeds the "
                                f"model's context of {self.loaded.context:,} tokens")
        request = Request(ids=ids, max_new_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p),
                          stop=self.stop)
        options = body.get("stream_options") or {}
        return request, {"stream": bool(body.get("stream")), "usage": bool(options.get("include_usage"))}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "dsrun"
    timeout = 300  # seconds a connection may sit idle between requests

    @property
    def app(self) -> App:
        return self.server.app  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        pass  # one line per request on stderr would drown the progress lines; /metrics counts them

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        if self.path == "/health":
            return self._json(200, {"status": "ok"})
        if self.path == "/metrics":
            return self._send(200, self.app.metrics.exposition(), "text/plain; version=0.0.4; charset=utf-8")
        if self.path == "/v1/models":
            if not self.app.authorized(self.headers.get("Authorization")):
                return self._error(ApiError(401, "invalid or missing API key", "authentication_error"))
            return self._json(200, self.app.models())
        self._error(ApiError(404, f"no such endpoint: GET {self.path}", "not_found_error"))

    def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
        routes = {"/v1/chat/completions": True, "/v1/completions": False}
        try:
            if self.path not in routes:
                raise ApiError(404, f"no such endpoint: POST {self.path}", "not_found_error")
            if not self.app.authorized(self.headers.get("Authorization")):
                raise ApiError(401, "invalid or missing API key", "authentication_error")
            request, options = self.app.request(self._body(), chat=routes[self.path])
            try:
                self.app.engine.submit(request)
            except QueueFull as exc:
                raise ApiError(503, str(exc), "overloaded_error") from None
        except ApiError as exc:
            return self._error(exc)
        if options["stream"]:
            self._stream(request, chat=routes[self.path], usage=options["usage"])
        else:
            self._whole(request, chat=routes[self.path])

    def _body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            raise ApiError(413, f"the request body is {length:,} bytes; at most {MAX_BODY_BYTES:,} are accepted")
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON ({exc})") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    # -- responses ----------------------------------------------------------------------------------------------

    def _whole(self, request: Request, chat: bool) -> None:
        detok = Detokenizer(self.app.loaded.tokenizer, set(request.stop))
        reason = "error"
        while True:
            kind, value = request.events.get()
            if kind == "tokens":
                detok.add(value)
            elif kind == "error":
                return self._error(ApiError(500, f"generation failed: {value}", "server_error"))
            else:
                reason = value
                break
        text = detok.text()
        choice = {"index": 0, "finish_reason": _finish_reason(reason)}
        choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
        self._json(200, {**self._head(chat, chunk=False), "choices": [choice], "usage": _usage(request)})

    def _stream(self, request: Request, chat: bool, usage: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the stream ends when the connection does
        self.end_headers()
        self.close_connection = True
        head = self._head(chat, chunk=True)
        detok = Detokenizer(self.app.loaded.tokenizer, set(request.stop))
        try:
            if chat:
                self._event({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                  "finish_reason": None}]})
            while True:
                kind, value = request.events.get()
                if kind == "tokens":
                    text = detok.add(value)
                    if text:
                        delta = {"delta": {"content": text}} if chat else {"text": text}
                        self._event({**head, "choices": [{"index": 0, **delta, "finish_reason": None}]})
                elif kind == "done":
                    end = {"delta": {}} if chat else {"text": ""}
                    self._event({**head, "choices": [{"index": 0, **end, "finish_reason": _finish_reason(value)}]})
                    if usage:
                        self._event({**head, "choices": [], "usage": _usage(request)})
                    break
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.app.engine.cancel(request)  # the client left: free its batch slot

    def _event(self, payload: dict[str, Any]) -> None:
        self.wfile.write(b"data: " + json.dumps(payload).encode() + b"\n\n")
        self.wfile.flush()

    def _head(self, chat: bool, chunk: bool) -> dict[str, Any]:
        kind = "chat.completion" if chat else "text_completion"
        return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
                "object": f"{kind}.chunk" if chat and chunk else kind,
                "created": int(time.time()), "model": self.app.loaded.name}

    def _error(self, exc: ApiError) -> None:
        self._json(exc.status, {"error": {"message": str(exc), "type": exc.kind, "code": exc.status}})

    def _json(self, status: int, payload: dict[str, Any]) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _finish_reason(reason: str) -> str:
    return {"stop": "stop", "length": "length"}.get(reason, reason)


def _usage(request: Request) -> dict[str, int]:
    return {"prompt_tokens": len(request.ids), "completion_tokens": request.generated,
            "total_tokens": len(request.ids) + request.generated}
