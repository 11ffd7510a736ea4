"""The OpenAI-compatible API apart from HTTP: a request body checked and turned into an engine Request, generated
token ids turned into reply text (R1's <think> part split off or kept inline: serve.reasoning), and the JSON shapes
of replies and of errors (OpenAI's `{"error": {"message", "type", "param", "code"}}`). dsrun/inference/server.py
carries it over HTTP."""

from __future__ import annotations

import hmac
import time
import uuid
from dataclasses import dataclass
from typing import Any

from dsrun.inference.chat import THINK_OPEN, ChatError, Detokenizer, ThinkSplitter, opens_thinking, render, stop_ids
from dsrun.inference.engine import Request
from dsrun.inference.load import Loaded

COMMON_KEYS = {"model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "top_k", "seed", "n", "user",
               "metadata", "service_tier", "parallel_tool_calls"}  # the last four change nothing without tools
KEYS = {True: COMMON_KEYS | {"messages", "max_completion_tokens"}, False: COMMON_KEYS | {"prompt"}}  # chat or not
# OpenAI keys this server does not implement, with the values that mean "not used": those (and null) are served,
# any other value is refused naming the key, never silently ignored
UNUSED_VALUES: dict[str, tuple[Any, ...]] = {
    "stop": ([],), "logprobs": (False,), "top_logprobs": (0,), "logit_bias": ({},), "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0), "tools": ([],), "tool_choice": ("none",), "functions": ([],),
    "function_call": ("none",), "response_format": ({"type": "text"},), "echo": (False,), "best_of": (1,),
    "suffix": ("",), "store": (False,), "modalities": (["text"],), "audio": (), "prediction": (),
    "reasoning_effort": (), "web_search_options": ()}
MAX_SEED = 2**63 - 1


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.kind, self.param, self.code, self.headers = status, kind, param, code, headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Plan:
    """A checked request: what the engine runs and how the reply is shaped."""
    request: Request
    chat: bool
    stream: bool
    include_usage: bool
    opens_thinking: bool  # the prompt ends inside <think> (R1 templates)


class Api:
    def __init__(self, loaded: Loaded, srv: Any, api_key: str | None):
        self.loaded, self.srv, self.api_key = loaded, srv, api_key
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

    def plan(self, body: dict[str, Any], chat: bool) -> Plan:
        """Check a completion request and turn it into an engine request (ApiError when it cannot be served). The
        fields are checked before the prompt is rendered, the one costly step."""
        _check_keys(body, chat)
        model = body.get("model")
        if model is not None and model != self.loaded.name:
            raise ApiError(404, f"The model `{model}` does not exist; this server serves `{self.loaded.name}`",
                           param="model", code="model_not_found")
        _integer(body, "n", 1, 1, "one completion per request")
        stream, include_usage = _streaming(body)
        top_k = _integer(body, "top_k", -1, None, "-1 or 0: no cut")
        temperature = _number(body, "temperature", self.srv.temperature, 0, 2)
        top_p = _number(body, "top_p", self.srv.top_p, 0, 1, open_low=True)
        seed = _integer(body, "seed", 0, MAX_SEED)
        ids = self._prompt(body, chat)
        request = Request(ids=ids, max_new_tokens=self._max_tokens(body, len(ids), chat), stop=self.stop,
                          temperature=temperature, top_p=top_p, top_k=max(top_k or 0, 0), seed=seed)
        return Plan(request=request, chat=chat, stream=stream, include_usage=include_usage,
                    opens_thinking=chat and opens_thinking(self.loaded.tokenizer, ids))

    def _max_tokens(self, body: dict[str, Any], prompt_tokens: int, chat: bool) -> int:
        """The request's max_completion_tokens or max_tokens; when it sets neither, serve.max_tokens cut to what
        the context leaves after the prompt."""
        srv, context, prompt_key = self.srv, self.loaded.context, "messages" if chat else "prompt"
        if prompt_tokens > srv.max_prompt_tokens:
            raise ApiError(400, f"the prompt is {prompt_tokens:,} tokens; this server takes at most "
                                f"{srv.max_prompt_tokens:,} (serve.max_prompt_tokens)", param=prompt_key)
        key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        asked = _integer(body, key, 1, srv.max_tokens, "serve.max_tokens")
        if asked is not None and prompt_tokens + asked > context:
            raise ApiError(400, f"the prompt ({prompt_tokens:,} tokens) plus {key} ({asked}) exceeds the model's "
                                f"context of {context:,} tokens", param=key)
        if prompt_tokens >= context:
            raise ApiError(400, f"the prompt ({prompt_tokens:,} tokens) fills the model's context of {context:,} "
                                "tokens", param=prompt_key)
        return asked or min(srv.max_tokens, context - prompt_tokens)

    def _prompt(self, body: dict[str, Any], chat: bool) -> list[int]:
        if chat:
            try:
                return render(self.loaded.tokenizer, _text_messages(body.get("messages")))
            except ChatError as exc:
                raise ApiError(400, str(exc), param="messages") from None
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise ApiError(400, "`prompt` must be a non-empty string", param="prompt")
        return self.loaded.tokenizer.encode(prompt)

    def output(self, plan: Plan) -> Output:
        return Output(self.loaded.tokenizer, self.stop, plan.chat, self.srv.reasoning, plan.opens_thinking)

    def reply(self, plan: Plan) -> Reply:
        return Reply(plan, self.loaded.name)


def _check_keys(body: dict[str, Any], chat: bool) -> None:
    for key, value in body.items():
        if key in KEYS[chat] or value is None:
            continue
        if key not in UNUSED_VALUES:
            raise ApiError(400, f"Unrecognized request argument supplied: {key}", param=key)
        if not any(type(value) is type(unused) and value == unused for unused in UNUSED_VALUES[key]):
            why = ("stop strings are not supported yet: generation ends at the model's end-of-turn token or "
                   "max_tokens" if key == "stop" else f"`{key}` is not supported by this server")
            raise ApiError(400, f"{key}={value!r}: {why}; leave it out", param=key)


def _streaming(body: dict[str, Any]) -> tuple[bool, bool]:
    """(stream, include_usage)."""
    stream, options = body.get("stream"), body.get("stream_options")
    if stream is not None and not isinstance(stream, bool):
        raise ApiError(400, f"stream={stream!r}: must be true or false", param="stream")
    if options is not None and not isinstance(options, dict):
        raise ApiError(400, "stream_options: must be an object such as {\"include_usage\": true}",
                       param="stream_options")
    return bool(stream), bool((options or {}).get("include_usage"))


def _text_messages(messages: Any) -> Any:
    """OpenAI's content parts ([{"type": "text", "text": ...}]) joined into one string with newlines, as vLLM
    joins them; other part types (images, audio, files) are refused. Anything else malformed is left for
    check_messages to name."""
    if not isinstance(messages, list):
        return messages
    joined = []
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise ApiError(400, f"messages[{i}].content[{j}]: a {kind!r} part; this server reads only text "
                                        "parts ({\"type\": \"text\", \"text\": ...})", param=f"messages[{i}].content")
            message = {**message, "content": "\n".join(part["text"] for part in content)}
        joined.append(message)
    return joined


def _integer(body: dict[str, Any], key: str, low: int, high: int | None, note: str = "") -> int | None:
    """body[key] as a whole number in [low, high], or None when absent or null; a boolean is not a number."""
    value = body.get(key)
    if value is None:
        return None
    if type(value) is not int or value < low or (high is not None and value > high):
        bound = f"{low}" if low == high else f"an integer from {low} to {high}" if high is not None else \
            f"an integer >= {low}"
        raise ApiError(400, f"{key}={value!r}: must be {bound}{f' ({note})' if note else ''}", param=key)
    return value


def _number(body: dict[str, Any], key: str, default: float, low: float, high: float, open_low: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return float(default)
    if type(value) not in (int, float) or not (low < value if open_low else low <= value) or not value <= high:
        bound = f"in ({low}, {high}]" if open_low else f"from {low} to {high}"
        raise ApiError(400, f"{key}={value!r}: must be a number {bound}", param=key)
    return float(value)


class Output:
    """Generated token ids in, reply text out as (field, piece) pairs: `text` for /v1/completions (raw, always);
    for chat `content`, with serve.reasoning=split the thinking apart in `reasoning_content` (what vLLM's
    deepseek_r1 reasoning parser does: text before </think> is reasoning, and when </think> never comes all of it
    is, with content "" where vLLM gives null), with inline all of it in `content`, opened by the <think> the
    prompt left open so the text is well-formed. `whole` collects every field's text for a non-streamed reply."""

    def __init__(self, tokenizer: Any, stop: list[int], chat: bool, reasoning: str, opened: bool):
        self.detokenizer = Detokenizer(tokenizer, set(stop))
        self.splitter = ThinkSplitter(thinking=opened) if chat and reasoning == "split" else None
        self.field = "content" if chat else "text"
        self.prefix = THINK_OPEN + "\n" if chat and reasoning == "inline" and opened else ""
        self.whole = {self.field: ""}

    def add(self, ids: list[int]) -> list[tuple[str, str]]:
        return self._pieces(self.detokenizer.add(ids), last=False)

    def finish(self) -> list[tuple[str, str]]:
        """What is held back: a partial character the stream never completed, a partial tag."""
        rest = self.detokenizer.text()[self.detokenizer.sent:]
        return self._pieces(rest, last=True)

    def _pieces(self, text: str, last: bool) -> list[tuple[str, str]]:
        if self.splitter is None:
            if self.prefix and (text or last):
                text, self.prefix = self.prefix + text, ""
            pieces = [(self.field, text)] if text else []
        else:
            split = self.splitter.feed(text) + (self.splitter.flush() if last else [])
            pieces = [("reasoning_content" if thinking else "content", piece) for thinking, piece in split]
        for field, piece in pieces:
            self.whole[field] = self.whole.get(field, "") + piece
        return pieces


class Reply:
    """The JSON of one request's reply: whole, or as stream chunks."""

    def __init__(self, plan: Plan, model: str):
        self.plan, self.chat = plan, plan.chat
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created, self.model = int(time.time()), model

    def head(self, chunk: bool) -> dict[str, Any]:
        kind = "chat.completion" if self.chat else "text_completion"
        return {"id": self.id, "object": f"{kind}.chunk" if self.chat and chunk else kind, "created": self.created,
                "model": self.model}

    def chunk(self, pieces: list[tuple[str, str]], finish_reason: str | None = None) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"delta": {}}
            for field, piece in pieces:
                delta["delta"][field] = delta["delta"].get(field, "") + piece
        else:
            delta = {"text": "".join(piece for _, piece in pieces)}
        return {**self.head(chunk=True), "choices": [{"index": 0, **delta, "finish_reason": finish_reason}]}

    def first_chunk(self) -> dict[str, Any] | None:
        """Chat streams open with the assistant's role, as OpenAI's do."""
        if not self.chat:
            return None
        return {**self.head(chunk=True), "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                      "finish_reason": None}]}

    def usage_chunk(self) -> dict[str, Any]:
        return {**self.head(chunk=True), "choices": [], "usage": usage(self.plan.request)}

    def whole(self, output: Output, reason: str) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": reason}
        if self.chat:
            choice["message"] = {"role": "assistant", **output.whole}
        else:
            choice["text"] = output.whole["text"]
        return {**self.head(chunk=False), "choices": [choice], "usage": usage(self.plan.request)}


def usage(request: Request) -> dict[str, int]:
    return {"prompt_tokens": len(request.ids), "completion_tokens": request.generated,
            "total_tokens": len(request.ids) + request.generated}
