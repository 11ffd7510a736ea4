"""Issue 31: a newcomer's first hour, part 2. One test (or a few) per numbered item of the issue, each failing on
the code before; real `dsrun` runs (forked, tests/forkserver.py) for what the user sees."""

from __future__ import annotations

import json

from omegaconf import OmegaConf

from dsrun.data import build_datasets, load_tokenizer, unique
from dsrun.sources import SOURCES
from tests.conftest import FAST, REPO, dsrun, model_cfg


# 2. Eval rows are never copies of training rows ------------------------------------------------------------------

def test_2_eval_split_drops_duplicates_and_says_how_many(tmp_path):
    proc = dsrun(*[a for a in FAST if not a.startswith("data.num_samples")], "data.num_samples=4000",
                 "data.eval_split=0.05", "train.max_steps=1", "train.eval_every=1", "train.seq_len=64",
                 run_dir=tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(ln for ln in proc.stderr.splitlines() if ln.startswith("dsrun: data:"))
    records = SOURCES["reasoning"].records(OmegaConf.load(tmp_path / "run" / "config.yaml").data)
    kept, dropped = unique(records)
    assert dropped > 0 and f"{dropped} duplicate records dropped before the eval split" in line
    assert f"{len(kept) - round(len(kept) * 0.05)} records ->" in line


def test_2_no_eval_record_has_a_copy_in_train():
    data = OmegaConf.create({"source": "reasoning", "num_samples": 4000, "seed": 0, "eval_split": 0.05,
                             "eval_path": None, "train_on": "assistant", "packing": False, "document_mask": True,
                             "name": "reasoning"})
    tokenizer = load_tokenizer(model_cfg("tiny"))
    train, held, _ = build_datasets(data, tokenizer, 512, 129280)
    as_rows = lambda blocks: {tuple(row.tolist()) for row in blocks.inputs}  # noqa: E731
    assert not as_rows(train) & as_rows(held)
