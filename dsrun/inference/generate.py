"""task=generate (`dsrun generate SOURCE "prompt"`): the chat template, streamed to the console; a file of prompts;
an interactive loop when no prompt is given and stdin is a terminal (or prompts read from piped stdin, one a line).
The answer goes to stdout; the <think> part is dimmed on stderr, hidden, or kept on stdout (generate.show_thinking).
Tokens come from the engine `dsrun serve` runs (dsrun/inference/engine.py), with one slot."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from dsrun.errors import UserError
from dsrun.inference.chat import Detokenizer, ThinkSplitter, opens_thinking, render, stop_ids
from dsrun.inference.engine import Engine, Request, compile_wanted
from dsrun.inference.load import Loaded, load
from dsrun.inference.metrics import ServerMetrics

if TYPE_CHECKING:
    from dsrun.schema import RunConfig

DIM, RESET = "\x1b[2m", "\x1b[0m"
MAX_POSITIONS = 8192


def generate_task(cfg: RunConfig) -> None:
    gen = cfg.generate
    prompts = _prompts(gen)  # a missing prompts file stops before the model is loaded
    loaded = load(cfg)
    engine = _engine(loaded, gen)
    history: list[dict[str, str]] = []
    interactive = prompts is None
    labelled = prompts is not None and len(prompts) > 1  # a file or a pipe of prompts: each answer says whose it is
    for number, prompt in enumerate(_interactive() if prompts is None else prompts):
        messages = [*history, {"role": "user", "content": prompt}] if interactive else [
            {"role": "user", "content": prompt}]
        if labelled:
            print(f"{chr(10) if number else ''}> {prompt}", flush=True)
        answer = respond(loaded, engine, messages, gen)
        if interactive:
            history = [*messages, {"role": "assistant", "content": answer}]
    engine.stop(0)


def respond(loaded: Loaded, engine: Engine, messages: list[dict[str, str]], gen: Any) -> str:
    """Generate one reply, streamed to the console; returns its text (thinking included)."""
    ids = render(loaded.tokenizer, messages)
    check_length(len(ids), gen.max_new_tokens, engine.max_len)
    stop = stop_ids(loaded.tokenizer, loaded.model)
    out = Console(loaded.tokenizer, gen.show_thinking, opens_thinking(loaded.tokenizer, ids), skip=set(stop))
    request = Request(ids=ids, max_new_tokens=gen.max_new_tokens, temperature=gen.temperature, top_p=gen.top_p,
                      stop=stop, seed=gen.seed)
    engine.submit(request)
    while (event := request.events.get())[0] != "done":
        if event[0] == "error":
            raise RuntimeError(f"generation failed: {event[1]}")
        out.put(event[1])
    out.end()
    print(f"dsrun: {speed(request)}", file=sys.stderr)
    return out.text


def speed(request: Request) -> str:
    """What the reply cost: tokens, time to the first, the decode rate after it."""
    done = time.perf_counter()
    first = (request.first_token_at or done) - request.arrived
    rate = (request.generated - 1) / (done - request.first_token_at) if request.generated > 1 and \
        request.first_token_at and done > request.first_token_at else 0.0
    return f"{request.generated} tokens, first after {first * 1e3:,.0f} ms, then {rate:,.1f} tokens/s"


def check_length(prompt_tokens: int, max_new_tokens: int, context: int) -> None:
    if prompt_tokens + max_new_tokens > context:
        raise UserError(f"the prompt is {prompt_tokens:,} tokens; with generate.max_new_tokens={max_new_tokens} "
                        f"that exceeds the {context:,} positions generate holds (the model's context, at most "
                        f"{MAX_POSITIONS:,}); shorten the prompt or lower "
                        "generate.max_new_tokens")


def _engine(loaded: Loaded, gen: Any) -> Engine:
    """One slot as long as the model's context (at most 8k positions: the cache is allocated whole), its decode step
    compiled and warmed up before the first prompt when generate.compile says so."""
    compiled = compile_wanted(gen.compile, loaded.device)
    engine = Engine(loaded.model, slots=1, max_len=min(loaded.context, MAX_POSITIONS), metrics=ServerMetrics(),
                    max_queue=1, seed=gen.seed, compile=compiled)
    counts, lengths = engine.buckets()
    engine.warm_up(counts, lengths[:3], setting="generate.compile")  # a longer chat records its graph then
    return engine


def _prompts(gen: Any) -> list[str] | None:
    """The prompts to answer; None means an interactive loop."""
    if gen.prompt is not None:
        return [str(gen.prompt)]
    if gen.prompts_file is not None:
        path = Path(gen.prompts_file).expanduser()
        if not path.is_file():
            raise UserError(f"generate.prompts_file={path}: no such file; one prompt per line")
        return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not sys.stdin.isatty():
        return [line for line in sys.stdin.read().splitlines() if line.strip()]
    return None


def _interactive() -> Iterator[str]:
    print("dsrun: interactive chat; an empty line or Ctrl-D ends it", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        if not line.strip():
            return
        yield line


class Console:
    """Writes the reply as it is generated: the answer to stdout, the thinking dimmed on stderr
    (show_thinking=dim), dropped (hide) or kept on stdout (show)."""

    def __init__(self, tokenizer: Any, show_thinking: str, thinking: bool, skip: set[int]):
        self.detok = Detokenizer(tokenizer, skip)
        self.split = ThinkSplitter(thinking)
        self.show = show_thinking
        self.dim = DIM if sys.stderr.isatty() else ""
        self.started = False  # the answer's leading blank lines (R1 writes "</think>\n\n") are not printed

    def put(self, tokens: list[int]) -> None:
        self._write(self.detok.add(tokens))

    def end(self) -> None:
        self._write("", final=True)
        sys.stdout.write("\n")
        sys.stdout.flush()

    def _write(self, text: str, final: bool = False) -> None:
        if self.show == "show":
            self._answer(text)
        else:
            for thinking, piece in self.split.feed(text) + (self.split.flush() if final else []):
                if not thinking:
                    self._answer(piece)
                elif self.show == "dim":
                    sys.stderr.write(f"{self.dim}{piece}{RESET if self.dim else ''}")
        sys.stdout.flush()

    def _answer(self, piece: str) -> None:
        if not self.started:
            piece = piece.lstrip()
            self.started = bool(piece)
        sys.stdout.write(piece)

    @property
    def text(self) -> str:
        return self.detok.text()
