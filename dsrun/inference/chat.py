"""Chat rendering, end-of-turn tokens, incremental detokenization and the <think> split, shared by the console
(generate) and the HTTP server."""

from __future__ import annotations

from typing import Any

from dsrun.chat import r1_template

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


class ChatError(ValueError):
    """A malformed conversation (the server answers 400 with this message)."""


def render(tokenizer: Any, messages: list[dict[str, Any]]) -> list[int]:
    """Prompt token ids ending where the assistant speaks: the tokenizer's chat template when it ships one (an
    exported or Hugging Face folder), else DeepSeek-R1's, the one dsrun trains with (dsrun/chat.py)."""
    check_messages(messages)
    if not getattr(tokenizer, "chat_template", None):  # a folder without one: the template dsrun trains with
        tokenizer.chat_template = r1_template()
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise ChatError("`messages` must be a non-empty list of {role, content} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise ChatError(f"messages[{i}]: needs a role of system, user or assistant")
        if not isinstance(message.get("content"), str):
            raise ChatError(f"messages[{i}]: content must be a string")


def stop_ids(tokenizer: Any, model: Any) -> list[int]:
    """End-of-turn tokens: the tokenizer's end of sentence and any the model's generation config names."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    return sorted(i for i in ids if i is not None and i >= 0)


class Detokenizer:
    """Token ids in, new text out: decodes the whole output each time and returns what was added, holding back a
    trailing partial character (a multi-byte character spread over tokens)."""

    def __init__(self, tokenizer: Any, skip: set[int]):
        self.tokenizer, self.skip = tokenizer, skip
        self.ids: list[int] = []
        self.sent = 0

    def add(self, ids: list[int]) -> str:
        self.ids.extend(i for i in ids if i not in self.skip)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        if text.endswith("\ufffd"):
            return ""
        new, self.sent = text[self.sent:], len(text)
        return new

    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=False)


class ThinkSplitter:
    """Splits streamed text into (thinking, answer) pieces at <think> ... </think>. R1 templates end the prompt
    inside an open <think>, so `thinking` may start true."""

    def __init__(self, thinking: bool = False):
        self.thinking = thinking
        self.pending = ""

    def feed(self, text: str) -> list[tuple[bool, str]]:
        """(is_thinking, text) pieces; a tag split across calls is held until it is whole."""
        self.pending += text
        pieces: list[tuple[bool, str]] = []
        while self.pending:
            tag = THINK_CLOSE if self.thinking else THINK_OPEN
            at = self.pending.find(tag)
            if at >= 0:
                if at:
                    pieces.append((self.thinking, self.pending[:at]))
                self.pending = self.pending[at + len(tag):]
                self.thinking = not self.thinking
                continue
            keep = next((k for k in range(min(len(tag) - 1, len(self.pending)), 0, -1)
                         if tag.startswith(self.pending[-k:])), 0)  # a tag's beginning at the end: wait for more
            if len(self.pending) > keep:
                pieces.append((self.thinking, self.pending[:len(self.pending) - keep]))
            self.pending = self.pending[len(self.pending) - keep:]
            break
        return pieces

    def flush(self) -> list[tuple[bool, str]]:
        rest, self.pending = self.pending, ""
        return [(self.thinking, rest)] if rest else []


def opens_thinking(tokenizer: Any, prompt_ids: list[int]) -> bool:
    """Whether the prompt leaves a <think> open (R1-Distill templates end with '<｜Assistant｜><think>\\n')."""
    tail = tokenizer.decode(prompt_ids[-8:], skip_special_tokens=False)
    return tail.rfind(THINK_OPEN) > tail.rfind(THINK_CLOSE)
