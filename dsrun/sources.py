"""Where training records come from (the `data` group): generated R1-style reasoning chats, a local JSONL file, or
random tokens for throughput runs; the eval split. dsrun/data.py renders, tokenizes and packs what these return.

SOURCES is the data.source registry: adding a source is conf/data/<option>.yaml and one entry there (a function
returning records, or one returning token rows, and the data.* keys only it reads). torch loads only for the
token rows.
"""

from __future__ import annotations

import json
import random
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from dsrun.errors import DataError

@dataclass
class DataConfig:
    name: str = "reasoning"
    source: str = "reasoning"  # reasoning | jsonl | synthetic_tokens
    path: Optional[str] = None
    num_samples: int = 4000
    seed: int = 1234
    train_on: str = "assistant"  # assistant (chats and instructions: loss on the replies only) | all
    packing: bool = True  # several documents per row; false: one document per row, padded
    document_mask: bool = True  # packed documents see only themselves (positions restart); false: one sequence
    eval_split: Optional[float] = None  # fraction of the records held out for eval loss (by data.seed)
    eval_path: Optional[str] = None  # a second JSONL as the eval set


@dataclass(frozen=True)
class Source:
    records: Callable[..., list[tuple[Any, str]]] | None = None  # (data config) -> [(record, where it came from)]
    tokens: Callable[..., Any] | None = None  # (data config, seq_len, vocab) -> [rows, seq_len + 1] token ids
    reads: tuple[str, ...] = ()  # data.* keys only this source reads


def _reasoning(data: DataConfig) -> list[tuple[Any, str]]:
    return [(r, f"reasoning sample {i}") for i, r in enumerate(reasoning_samples(data.num_samples, data.seed))]


def _jsonl(data: DataConfig) -> list[tuple[Any, str]]:
    return read_records(data.path or "")  # validation refused data=jsonl without a path


def _synthetic_tokens(data: DataConfig, seq_len: int, vocab_size: int) -> Any:
    import torch

    generator = torch.Generator().manual_seed(data.seed)
    return torch.randint(0, vocab_size, (data.num_samples, seq_len + 1), generator=generator)


SOURCES: dict[str, Source] = {"reasoning": Source(records=_reasoning), "jsonl": Source(records=_jsonl, reads=("path",)),
                              "synthetic_tokens": Source(tokens=_synthetic_tokens)}


def reasoning_samples(n: int, seed: int) -> list[dict[str, Any]]:
    """Deterministic R1-style chats: a question, then step-by-step thinking in <think> and the answer."""
    rng = random.Random(seed)
    makers = (_addition, _subtraction, _multiplication, _comparison, _parity, _letter_count)
    return [_chat(*rng.choice(makers)(rng)) for _ in range(n)]


def _chat(question: str, thinking: str, answer: str) -> dict[str, Any]:
    reply = f"<think>\n{thinking}\n</think>\n\n{answer}"
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]}


def _addition(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    ones, tens = a % 10 + b % 10, a // 10 + b // 10
    steps = f"Ones: {a % 10} + {b % 10} = {ones}. Tens: {a // 10} + {b // 10} = {tens}. "
    steps += f"So {tens} tens and {ones} ones make {a + b}."
    return f"What is {a} + {b}?", steps, f"{a} + {b} = {a + b}."


def _subtraction(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(50, 99), rng.randint(10, 49)
    steps = f"Take {b // 10 * 10} from {a}: {a - b // 10 * 10}. Then take {b % 10}: {a - b}."
    return f"What is {a} - {b}?", steps, f"{a} - {b} = {a - b}."


def _multiplication(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(11, 49), rng.randint(2, 9)
    steps = f"{a // 10 * 10} x {b} = {a // 10 * 10 * b}. {a % 10} x {b} = {a % 10 * b}. "
    steps += f"Add them: {a // 10 * 10 * b} + {a % 10 * b} = {a * b}."
    return f"What is {a} x {b}?", steps, f"{a} x {b} = {a * b}."


def _comparison(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.sample(range(100, 999), 2)
    big = max(a, b)
    steps = f"Compare hundreds: {a // 100} and {b // 100}. "
    steps += f"Then tens and ones. {big} is larger." if a // 100 == b // 100 else f"{big} has more hundreds."
    return f"Which is larger, {a} or {b}?", steps, f"{big} is larger."


def _parity(rng: random.Random) -> tuple[str, str, str]:
    a = rng.randint(100, 9999)
    kind = "even" if a % 2 == 0 else "odd"
    steps = f"The last digit of {a} is {a % 10}. {a % 10} is {kind}, so {a} is {kind}."
    return f"Is {a} even or odd?", steps, f"{a} is {kind}."


_WORDS = ("banana", "strawberry", "mississippi", "parallel", "reasoning", "deepseek", "gradient", "tensor",
          "accumulation", "checkpoint", "balloon", "committee", "bookkeeper", "assessment", "letter")


def _letter_count(rng: random.Random) -> tuple[str, str, str]:
    word = rng.choice(_WORDS)
    letter = rng.choice(sorted(set(word)))
    marks = " ".join(f"{c}{'*' if c == letter else ''}" for c in word)
    n = word.count(letter)
    return (f"How many times does '{letter}' appear in '{word}'?", f"Spell it: {marks}. I marked {n}.",
            f"'{letter}' appears {n} times in '{word}'.")


def read_records(path: str | Path, key: str = "data.path") -> list[tuple[Any, str]]:
    """The JSON objects of a local JSONL file, each with its `file:line`."""
    path = Path(path)
    check_data_file(path, key)
    records = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{number}: not UTF-8 (byte {exc.start}); re-encode the file as UTF-8") from None
            if not line:
                continue
            try:
                records.append((json.loads(line), f"{path}:{number}"))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: malformed JSON ({exc.msg} at column {exc.colno})") from None
    if not records:
        raise DataError(f"{key}={path}: the dataset is empty; it needs at least one JSON line")
    return records


def split_eval(records: list[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """(train, eval): a `fraction` of the records held out, chosen by `seed` alone (the same split every run)."""
    held = max(1, round(len(records) * fraction))
    if held >= len(records):
        raise DataError(f"data.eval_split={fraction}: holds out all {len(records)} records, leaving none to train on; "
                        "lower data.eval_split or add data")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    out = set(order[:held])
    return [r for i, r in enumerate(records) if i not in out], [r for i, r in enumerate(records) if i in out]


COMPRESSED = {b"\x1f\x8b": ("gzip", "gunzip"), b"BZh": ("bzip2", "bunzip2"), b"\xfd7zXZ": ("xz", "unxz"),
              b"\x28\xb5\x2f\xfd": ("zstd", "unzstd"), b"PK\x03\x04": ("zip", "unzip")}


def check_data_file(path: Path, key: str = "data.path") -> None:
    """`key` names a regular, readable, uncompressed file; say what it is when it is not (a FIFO is refused
    before it is opened: reading one would wait for a writer forever)."""
    where = f"point {key} at a .jsonl file"
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise DataError(f"{key}={path}: no such file; {where}") from None
    except OSError as exc:
        raise DataError(f"{key}={path}: cannot reach it ({exc.strerror}); {where}") from None
    kind = ("a directory" if stat.S_ISDIR(mode) else "a named pipe (FIFO)" if stat.S_ISFIFO(mode) else
            "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else None)
    if kind:
        raise DataError(f"{key}={path}: {kind}, not a regular file; {where}")
    try:
        with path.open("rb") as handle:
            head = handle.read(6)
    except OSError as exc:
        raise DataError(f"{key}={path}: cannot read it ({exc.strerror}); {where}") from None
    for magic, (name, tool) in COMPRESSED.items():
        if head.startswith(magic):
            raise DataError(f"{key}={path}: a {name}-compressed file; decompress it first ({tool} {path}) and "
                            "point {key} at the .jsonl")


def source_records(data: DataConfig) -> list[tuple[Any, str]]:
    """The records of `data.source` as (record, where it came from); a source of token rows has none."""
    read = SOURCES[data.source].records
    if read is None:
        raise DataError(f"data.source={data.source} makes token rows, not records; choose data=reasoning or "
                        "data=jsonl data.path=<file>")
    return read(data)
