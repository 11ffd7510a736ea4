"""task=serve (`dsrun serve SOURCE`): the OpenAI-compatible API (dsrun/inference/api.py) over HTTP, on uvicorn and
starlette, in front of the batching engine (dsrun/inference/engine.py).

/v1/chat/completions and /v1/completions (streamed as server-sent events, or whole), /v1/models, /health and
Prometheus /metrics. One asyncio loop carries every connection; the engine decodes in its own thread and hands each
event to that loop (Request.listener -> call_soon_threadsafe), so a waiting reply holds no thread. The port is bound
before the model loads (a taken port stops at once); SIGTERM or Ctrl-C stops accepting, lets running requests
finish (30 s), stops the engine and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
from typing import TYPE_CHECKING, Any, AsyncIterator, Iterator

import uvicorn
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from dsrun.errors import UserError
from dsrun.inference.api import Api, ApiError, Output, Plan
from dsrun.inference.engine import Engine, QueueFull, Request, build_engine
from dsrun.inference.load import describe, load
from dsrun.inference.metrics import ServerMetrics
from dsrun.inference.vllm import serve_with_vllm

if TYPE_CHECKING:
    from dsrun.schema import RunConfig

# connections the kernel holds before they are accepted: a burst of clients waits there instead of being reset (the
# stdlib server's 5 reset a burst of 256); Linux caps it at net.core.somaxconn (4096 on current kernels)
LISTEN_BACKLOG = 2048
MAX_BODY_BYTES = 4 * 2**20
# a body over the limit is still read (and dropped) up to this size, so the client gets its 413 rather than a reset
# (closing a socket with unread data resets it); a larger one is cut off
MAX_DISCARDED_BYTES = 64 * 2**20
DRAIN_TIMEOUT_S = 30.0
RETRY_AFTER_S = 1  # a refused client's wait: requests of a batch finish, and free their places, within seconds
# longer than clients keep an idle connection (httpx, under the openai client: 5 s), so a client never sends on a
# connection the server is closing at that moment
KEEP_ALIVE_S = 65


def serve_task(cfg: RunConfig) -> None:
    srv = cfg.serve
    if srv.engine == "vllm":
        return serve_with_vllm(cfg)
    describe(cfg.task.source)  # a wrong source stops before the port or the model
    api_key = _api_key(srv)
    listener = bind(srv.host, srv.port)
    loaded = load(cfg)
    metrics = ServerMetrics()
    engine = build_engine(loaded.model, srv, metrics, loaded.context)
    host, port = listener.getsockname()[:2]
    ready = (f"dsrun: serving {loaded.name} at http://{host}:{port}/v1 ({type(engine).__name__}, up to "
             f"{srv.max_batch} sequences per batch{', API key required' if api_key else ''})")
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        ready += f"\ndsrun: warning: serving on {host} without an API key; set serve.api_key_env"
    app = Http(Api(loaded, srv, api_key), engine, metrics, metrics_public=srv.metrics_public).app()
    server = Server(uvicorn.Config(app, http="h11", ws="none", lifespan="off", log_config=None, access_log=False,
                                   backlog=LISTEN_BACKLOG, timeout_keep_alive=KEEP_ALIVE_S,
                                   timeout_graceful_shutdown=int(DRAIN_TIMEOUT_S)), ready)
    _uvicorn_logs_to_file()
    asyncio.run(_serve_then_stop(server, listener, engine))
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


def bind(host: str, port: int) -> socket.socket:
    try:
        return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                                    backlog=LISTEN_BACKLOG)
    except OSError as exc:
        raise UserError(f"serve.port={port}: cannot listen on {host}:{port} ({exc.strerror}); choose another port, "
                        "or serve.port=0 for a free one") from None


def _uvicorn_logs_to_file() -> None:
    """uvicorn's records, and the event loop's, go to the run's log file only: their errors (a client gone
    mid-reply, a bug's traceback) would pass the console's filter (dsrun/quiet.py), which lets every error through."""
    files: list[logging.Handler] = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    for name in ("uvicorn", "asyncio"):
        logger = logging.getLogger(name)
        logger.handlers = files or [logging.NullHandler()]  # NullHandler: not Python's last-resort stderr handler
        logger.propagate = False


async def _serve_then_stop(server: Server, listener: socket.socket, engine: Engine) -> None:
    try:
        await server.serve(sockets=[listener])
    finally:
        engine.stop(DRAIN_TIMEOUT_S)  # in the loop's thread: the listeners' loop is still open for the last events


class Server(uvicorn.Server):
    """uvicorn's server, saying dsrun's line once it accepts, and stopping on SIGTERM/SIGINT with exit 0: uvicorn's
    own handler raises the signal again once it has drained, which would end the process by the signal."""

    def __init__(self, config: uvicorn.Config, ready: str):
        super().__init__(config)
        self.ready = ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        print(self.ready, file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        previous = {sig: signal.signal(sig, self.on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def on_signal(self, signum: int, frame: Any) -> None:
        if self.should_exit:
            self.force_exit = signum == signal.SIGINT  # a second Ctrl-C: stop waiting for running requests
            return
        print(f"dsrun: {signal.Signals(signum).name}: finishing running requests, then stopping", file=sys.stderr)
        self.should_exit = True


class Job:
    """A submitted request as the event loop sees it: the engine's thread puts its events on an asyncio queue."""

    def __init__(self, engine: Engine, request: Request):
        self.engine, self.request, self.done = engine, request, False
        loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def listener(event: tuple[str, Any]) -> None:  # called in the engine's thread
            with contextlib.suppress(RuntimeError):  # the loop has closed (the server stopped): nobody waits
                loop.call_soon_threadsafe(self.events.put_nowait, event)

        request.listener = listener
        try:
            engine.submit(request)
        except QueueFull as exc:
            raise ApiError(503, str(exc), "server_error", code="overloaded",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None

    async def next(self) -> tuple[str, Any]:
        event = await self.events.get()
        self.done = self.done or event[0] == "done"
        return event

    def abandon(self) -> None:
        """The client left, or the drain's deadline passed: free the request's place in the batch."""
        if not self.done:
            self.done = True
            self.engine.cancel(self.request)


class EventStream(StreamingResponse):
    """A stream whose request is cancelled however the stream ends early: starlette cancels the response when the
    client disconnects (even before the first chunk), uvicorn when the drain's deadline passes."""

    def __init__(self, chunks: AsyncIterator[bytes], job: Job):
        super().__init__(chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.job = job

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.abandon()


class Http:
    """The endpoints over HTTP: the API key, the body, errors in OpenAI's shape; what a reply says is Api's."""

    def __init__(self, api: Api, engine: Engine, metrics: ServerMetrics, metrics_public: bool):
        self.api, self.engine, self.metrics, self.metrics_public = api, engine, metrics, metrics_public

    def app(self) -> Starlette:
        routes = [Route("/v1/chat/completions", self.chat, methods=["POST"]),
                  Route("/v1/completions", self.completions, methods=["POST"]),
                  Route("/v1/models", self.models), Route("/health", self.health), Route("/metrics", self.prometheus)]
        return Starlette(routes=routes, exception_handlers={404: self.no_route, 405: self.no_route,
                                                            Exception: self.crashed})

    async def chat(self, http: HttpRequest) -> Response:
        return await self.complete(http, chat=True)

    async def completions(self, http: HttpRequest) -> Response:
        return await self.complete(http, chat=False)

    async def complete(self, http: HttpRequest, chat: bool) -> Response:
        try:
            self.authorize(http)
            plan = self.api.plan(await _body(http), chat)
            job = Job(self.engine, plan.request)
        except ApiError as exc:
            return error(exc)
        except ClientDisconnect:  # gone while sending its body: nobody reads an answer
            return Response(status_code=400)
        if plan.stream:
            return EventStream(self.stream(plan, job), job)
        return await self.whole(http, plan, job)

    async def stream(self, plan: Plan, job: Job) -> AsyncIterator[bytes]:
        reply, output = self.api.reply(plan), self.api.output(plan)
        if (first := reply.first_chunk()) is not None:
            yield _event(first)
        failed = False
        while True:
            kind, value = await job.next()
            if kind == "tokens":
                if pieces := output.add(value):
                    yield _event(reply.chunk(pieces))
            elif kind == "error":
                failed = True
                yield _event(ApiError(500, f"generation failed: {value}", "server_error").body())
            else:
                if not failed:
                    yield _event(reply.chunk(output.finish(), finish_reason=value))
                    if plan.include_usage:
                        yield _event(reply.usage_chunk())
                break
        yield b"data: [DONE]\n\n"

    async def whole(self, http: HttpRequest, plan: Plan, job: Job) -> Response:
        """The reply once generation ends; a client that leaves before that cancels its request."""
        output = self.api.output(plan)
        generation = asyncio.ensure_future(_generate(job, output))
        gone = asyncio.ensure_future(_disconnected(http))
        try:
            await asyncio.wait({generation, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not generation.done():
                generation.cancel()
                job.abandon()
        if generation.cancelled():
            return Response(status_code=499)  # nobody reads it (nginx's "client closed request")
        reason, failure = generation.result()
        if failure is not None:
            return error(ApiError(500, f"generation failed: {failure}", "server_error"))
        return JSONResponse(self.api.reply(plan).whole(output, reason))

    async def models(self, http: HttpRequest) -> Response:
        try:
            self.authorize(http)
        except ApiError as exc:
            return error(exc)
        return JSONResponse(self.api.models())

    async def health(self, http: HttpRequest) -> Response:
        return JSONResponse({"status": "ok"})  # no key: readiness probes hold none

    async def prometheus(self, http: HttpRequest) -> Response:
        try:
            if not self.metrics_public:
                self.authorize(http)
        except ApiError as exc:
            return error(exc)
        return Response(self.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def authorize(self, http: HttpRequest) -> None:
        if not self.api.authorized(http.headers.get("authorization")):
            raise ApiError(401, "invalid or missing API key (send Authorization: Bearer <key>)",
                           code="invalid_api_key")

    async def no_route(self, http: HttpRequest, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        verb = "no such endpoint" if status == 404 else "method not allowed"
        return error(ApiError(status, f"{verb}: {http.method} {http.url.path}",
                              headers=getattr(exc, "headers", None)))

    async def crashed(self, http: HttpRequest, exc: Exception) -> Response:
        """A bug: the client gets a 500 in OpenAI's shape; the traceback goes to the run's log file (uvicorn logs
        what starlette raises again after this answer)."""
        return error(ApiError(500, f"internal error ({type(exc).__name__}); the server's log file has the "
                                   "traceback", "server_error"))


async def _body(http: HttpRequest) -> dict[str, Any]:
    declared = http.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_DISCARDED_BYTES:
        raise _too_large(int(declared))
    raw, size = bytearray(), 0
    async for chunk in http.stream():
        size += len(chunk)
        if size > MAX_DISCARDED_BYTES:
            raise _too_large(size)
        if size <= MAX_BODY_BYTES:
            raw += chunk
    if size > MAX_BODY_BYTES:
        raise _too_large(size)
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def _too_large(size: int) -> ApiError:
    return ApiError(413, f"the request body is {size:,} bytes; at most {MAX_BODY_BYTES:,} are accepted",
                    headers={"Connection": "close"})


async def _generate(job: Job, output: Output) -> tuple[str, str | None]:
    """Every token into output; (finish reason, the engine's error message or None)."""
    failure = None
    while True:
        kind, value = await job.next()
        if kind == "tokens":
            output.add(value)
        elif kind == "error":
            failure = value
        else:
            output.finish()
            return value, failure


async def _disconnected(http: HttpRequest) -> None:
    """Returns when the client has closed its connection (the body is read: the next message is the disconnect)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def error(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)
