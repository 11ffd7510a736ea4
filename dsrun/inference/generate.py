"""task=generate (`dsrun generate SOURCE "prompt"`): the chat template, streamed to the console; a file of prompts;
an interactive loop when no prompt is given and stdin is a terminal (or prompts read from piped stdin, one a line).
The answer goes to stdout; the <think> part is dimmed on stderr, hidden, or kept on stdout (generate.show_thinking)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Iterator

import torch
from transformers.generation.streamers import BaseStreamer

from dsrun.errors import UserError
from dsrun.inference.chat import Detokenizer, ThinkSplitter, opens_thinking, render, stop_ids
from dsrun.inference.fast import cache_bucket, static_settings, wanted, warm_up
from dsrun.inference.load import Loaded, load

DIM, RESET = "\x1b[2m", "\x1b[0m"


def generate_task(cfg: Any) -> None:
    gen = cfg.generate
    prompts = _prompts(gen)  # a missing prompts file stops before the model is loaded
    loaded = load(cfg)
    extra = _fast(loaded, gen)
    history: list[dict[str, str]] = []
    interactive = prompts is None
    for prompt in (_interactive() if interactive else prompts):
        messages = [*history, {"role": "user", "content": prompt}] if interactive else [
            {"role": "user", "content": prompt}]
        answer = respond(loaded, messages, gen, extra)
        if interactive:
            history = [*messages, {"role": "assistant", "content": answer}]


def respond(loaded: Loaded, messages: list[dict[str, str]], gen: Any, extra: dict[str, Any]) -> str:
    """Generate one reply, streamed to the console; returns its text (thinking included)."""
    ids = render(loaded.tokenizer, messages)
    check_length(len(ids), gen.max_new_tokens, loaded.context)
    out = Console(loaded.tokenizer, gen.show_thinking, opens_thinking(loaded.tokenizer, ids),
                  skip=set(stop_ids(loaded.tokenizer, loaded.model)))
    input_ids = torch.tensor([ids], device=loaded.device)
    torch.manual_seed(gen.seed)
    sampling = {"do_sample": True, "temperature": gen.temperature, "top_p": gen.top_p} if gen.temperature > 0 \
        else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    with torch.inference_mode():
        loaded.model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=gen.max_new_tokens,
                              eos_token_id=stop_ids(loaded.tokenizer, loaded.model),
                              pad_token_id=pad_id(loaded.tokenizer), streamer=out, **sampling, **extra)
    return out.text


def check_length(prompt_tokens: int, max_new_tokens: int, context: int) -> None:
    if prompt_tokens + max_new_tokens > context:
        raise UserError(f"the prompt is {prompt_tokens:,} tokens; with generate.max_new_tokens={max_new_tokens} "
                        f"that exceeds the model's context of {context:,} tokens; shorten the prompt or lower "
                        "generate.max_new_tokens")


def pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _fast(loaded: Loaded, gen: Any) -> dict[str, Any]:
    """Static cache + compiled decode when wanted (generate.static_cache), warmed up for batch 1."""
    if not wanted(gen.static_cache, loaded.device):
        return {}
    length = cache_bucket(min(loaded.context, 4096))  # a longer prompt grows the cache once (one recompile)
    extra = static_settings(length, backend="inductor" if loaded.device.type == "cuda" else "eager")
    warm_up(loaded.model, [1], length, extra)
    return extra


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


class Console(BaseStreamer):
    """A transformers streamer that writes the reply as it is generated: the answer to stdout, the thinking dimmed
    on stderr (show_thinking=dim), dropped (hide) or kept on stdout (show)."""

    def __init__(self, tokenizer: Any, show_thinking: str, thinking: bool, skip: set[int]):
        self.detok = Detokenizer(tokenizer, skip)
        self.split = ThinkSplitter(thinking)
        self.show, self.prompt_seen = show_thinking, False
        self.dim = DIM if sys.stderr.isatty() else ""

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt
            self.prompt_seen = True
            return
        self._write(self.detok.add(value.flatten().tolist()))

    def end(self) -> None:
        self._write("", final=True)
        sys.stdout.write("\n")
        sys.stdout.flush()

    def _write(self, text: str, final: bool = False) -> None:
        if self.show == "show":
            sys.stdout.write(text)
        else:
            for thinking, piece in self.split.feed(text) + (self.split.flush() if final else []):
                if not thinking:
                    sys.stdout.write(piece)
                elif self.show == "dim":
                    sys.stderr.write(f"{self.dim}{piece}{RESET if self.dim else ''}")
        sys.stdout.flush()

    @property
    def text(self) -> str:
        return self.detok.text()
