"""The run ledger: one row per run (single run or sweep trial) in SQLite, and the status words every run ends in.

The database is `outputs/ledger.sqlite` (or `$DSRUN_LEDGER`). Runs finish concurrently (sweeps on several
machines sharing a disk, several jobs on one box), so the file is in WAL mode with a busy timeout and every
record is one INSERT in its own transaction: a writer waits for the lock instead of losing its row. Each run
folder also keeps its own row as `record.json`, so a folder says how it ended even without the database.
A ledger that cannot be written costs a warning, never the run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sqlite3
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, NoReturn, TypeVar

from dsrun.errors import Interrupted, TrainingDiverged, UserError
from dsrun.quiet import console
from dsrun.run.files import git_commit, rank_zero, write_json

Config = TypeVar("Config")  # the run's config, whatever shape the caller holds: passed through to fit()

# How long a run waits for another process's hold on the ledger before it warns and goes on (a write), and how long
# `dsrun runs` waits before it says who to blame (a read). SQLite waits inside C, where signals are not handled:
# it is given short waits, retried in Python, so SIGTERM and Ctrl-C still end a waiting process at once.
WRITE_WAIT_S = 30.0
READ_WAIT_S = 10.0
TRY_S = 0.2
SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL,
    run_dir TEXT NOT NULL,
    task TEXT,
    overrides TEXT NOT NULL,
    config_hash TEXT,
    status TEXT NOT NULL,
    tokens_per_s REAL,
    peak_memory_gib REAL,
    final_loss REAL,
    wall_time_s REAL,
    parent TEXT,
    git_commit TEXT,
    good INTEGER NOT NULL DEFAULT 0
)"""
COLUMNS = ("time", "run_dir", "task", "overrides", "config_hash", "status", "tokens_per_s", "peak_memory_gib",
           "final_loss", "wall_time_s", "parent", "git_commit", "good")
OOM_MARKERS = ("CUDA out of memory", "OutOfMemoryError", "MemoryError")


def ledger_path() -> Path:
    return Path(os.environ.get("DSRUN_LEDGER") or "outputs/ledger.sqlite")


def connect(path: Path | None = None) -> sqlite3.Connection:
    path = path or ledger_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    # isolation_level=None: autocommit, so each INSERT below is exactly one transaction
    conn = sqlite3.connect(path, timeout=TRY_S, isolation_level=None)
    conn.row_factory = sqlite3.Row
    return conn


def busy(exc: sqlite3.OperationalError) -> bool:
    return "locked" in str(exc) or "busy" in str(exc)


def with_ledger(work: Callable[[sqlite3.Connection], Any], wait_s: float) -> Any:
    """`work(conn)` on the ledger (switched to WAL and its table made, once per file), retried while another
    process holds it, for at most wait_s; then the last 'database is locked' error is raised."""
    deadline = time.monotonic() + wait_s
    conn = connect()
    try:
        while True:
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute(SCHEMA)
                return work(conn)
            except sqlite3.OperationalError as exc:
                if not busy(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------------------------
# Statuses: completed | interrupted | oom | nan | refused: <bad input> | crashed: <what> | skipped: <why>

def status_of_exception(exc: BaseException) -> str:
    if isinstance(exc, TrainingDiverged):
        return "nan"
    if isinstance(exc, Interrupted):
        return "interrupted"
    if isinstance(exc, MemoryError) or any(m in f"{type(exc).__name__} {exc}" for m in OOM_MARKERS):
        return "oom"
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    if isinstance(exc, UserError):  # bad input (data, weights, config) found once the run started: not a crash
        return f"refused: {first}"
    return f"crashed: {type(exc).__name__}" + (f": {first}" if first else "")


def status_of_summary(summary: dict[str, Any]) -> str:
    """A run that finished with a non-finite loss did not complete anything useful: it is `nan`."""
    status = summary.get("status", "completed")
    loss = summary.get("final_loss")
    if status == "completed" and loss is not None and not math.isfinite(loss):
        return "nan"
    return status


# ---------------------------------------------------------------------------------------------------------------
# Writing

def config_hash(cfg: object) -> str:
    """Of any shape a run's config comes in: a DictConfig (typed or not), or plain data."""
    from omegaconf import OmegaConf

    text = OmegaConf.to_yaml(cfg, resolve=True) if OmegaConf.is_config(cfg) else json.dumps(cfg, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _hydra_context() -> tuple[list[str], str | None]:
    """This job's overrides, and the run it was composed from: a replay composes from `<run>/.hydra/`."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return [], None
    hc = HydraConfig.get()
    overrides = list(hc.overrides.task)
    main = next((s.path for s in hc.runtime.config_sources if s.provider == "main"), "")
    source = Path(main)
    parent = source.parent if source.name == ".hydra" else None
    if parent is not None and parent.resolve() == Path(hc.runtime.output_dir).resolve():
        parent = None  # `dsrun resume` continues the run itself
    return overrides, str(parent.resolve()) if parent else None


def _git_commit(run_dir: Path) -> str | None:
    try:  # the snapshot already asked git; a run that died before its snapshot asks again
        return json.loads((run_dir / "env.json").read_text())["git_commit"]
    except (OSError, ValueError, KeyError):
        return git_commit()


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def record_run(run_dir: Path, summary: dict[str, Any], cfg: object, *, good: bool = False,
               parent: str | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """Append one run to the ledger and write it to `<run_dir>/record.json`. Returns the record (with its id)."""
    hydra_overrides, hydra_parent = _hydra_context()
    record = {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run_dir": str(Path(run_dir).resolve()),
        "task": _select(cfg, "task.name"),
        "overrides": json.dumps(hydra_overrides if overrides is None else overrides),
        "config_hash": config_hash(cfg),
        "status": status_of_summary(summary),
        "tokens_per_s": _number(summary.get("tokens_per_s")),
        "peak_memory_gib": _number(summary.get("peak_memory_gib")),
        "final_loss": _number(summary.get("final_loss")),
        "wall_time_s": _number(summary.get("wall_time_s")),
        "parent": parent or hydra_parent,
        "git_commit": _git_commit(Path(run_dir)),
        "good": int(good),
    }
    row_id = _write(f"INSERT INTO runs ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
                    [record[c] for c in COLUMNS])
    if row_id is not None:
        record["id"] = row_id
    if Path(run_dir).is_dir():
        write_json(Path(run_dir) / "record.json", {**record, "overrides": json.loads(record["overrides"])})
    return record


def amend_status(record: dict[str, Any], status: str) -> None:
    """Correct a recorded status once more is known (a rank's OOM seen only in the trial's log)."""
    record["status"] = status
    if "id" in record:
        _write("UPDATE runs SET status = ? WHERE id = ?", [status, record["id"]])
    write_json(Path(record["run_dir"]) / "record.json", record)


def _write(sql: str, params: list[Any]) -> int | None:
    """One statement, one transaction (autocommit). Returns the row id, or None (with a warning) on failure."""
    try:
        return with_ledger(lambda conn: conn.execute(sql, params).lastrowid, WRITE_WAIT_S)
    except (sqlite3.Error, OSError) as exc:
        print(f"dsrun: warning: the ledger {ledger_path()} was not updated: {exc}", file=sys.stderr)
        return None


def _select(cfg: object, key: str) -> Any:
    from omegaconf import DictConfig, OmegaConf

    return OmegaConf.select(cfg, key) if isinstance(cfg, DictConfig) else None


def recorded(cfg: Config, run_dir: Path, fit: Callable[[Config, Path], dict[str, Any]],
             check: Callable[[Path, dict[str, Any]], list[str]] | None = None) -> dict[str, Any]:
    """Run `fit(cfg, run_dir)` and record how it ended, failures included (then re-raised). With `check`, the run
    is marked good when the check finds no problem, and a problem is a one-line user error."""
    try:
        summary = fit(cfg, run_dir)
    except Exception as exc:  # recorded, then handled as before (tasks.train explains OOMs and timeouts)
        if rank_zero():
            record_run(run_dir, {"status": status_of_exception(exc)}, cfg)
        raise
    if not rank_zero():
        return summary
    problems = check(run_dir, summary) if check is not None else []
    record = record_run(run_dir, summary, cfg, good=check is not None and not problems)
    if check is not None and not problems:
        print(f"dsrun: checks passed; run {record.get('id', '')} ({run_dir}) marked good in the ledger "
              f"{ledger_path()}", file=sys.stderr)
    if problems:
        raise UserError("\n".join(problems))
    return summary


# ---------------------------------------------------------------------------------------------------------------
# Reading

def query(status: str | None = None, limit: int = 20, good: bool | None = None,
          refused: bool = True) -> list[dict[str, Any]]:
    """Newest first. `status` matches the status word, so `crashed` finds every `crashed: ...`. A damaged or
    unreachable ledger is a one-line user error here (training only warns: _write)."""
    path = ledger_path()
    fix = "move it aside (the next run starts a new one) or point DSRUN_LEDGER at another file"
    if path.exists() and not path.is_file():
        raise UserError(f"the ledger {path} is not a file; {fix}")
    if not path.is_file():
        return []
    where: list[str] = []
    args: list[str | int] = []
    if status:
        where.append("(status = ? OR status LIKE ?)")
        args += [status, f"{status}:%"]
    if not refused:  # runs refused for bad input trained nothing: `dsrun runs` hides them unless asked
        where.append("status NOT LIKE 'refused%'")
    if good is not None:
        where.append("good = ?")
        args.append(int(good))
    sql = "SELECT * FROM runs" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id DESC LIMIT ?"
    try:
        return with_ledger(lambda conn: [dict(row) for row in conn.execute(sql, [*args, limit])], READ_WAIT_S)
    except sqlite3.OperationalError as exc:
        if busy(exc):
            raise UserError(f"the ledger {path} is held by another process (a run writing it, or a database tool "
                            f"with an open transaction) for over {READ_WAIT_S:.0f} s; try again when it is done, or "
                            "point DSRUN_LEDGER at another file") from None
        raise UserError(f"the ledger {path}: cannot read it ({exc}); {fix}") from None
    except (sqlite3.Error, OSError) as exc:
        raise UserError(f"the ledger {path}: cannot read it ({exc}); {fix}") from None


def latest_good() -> dict[str, Any] | None:
    rows = query(good=True, limit=1)
    return rows[0] if rows else None


def runs_command(args: list[str]) -> None:
    """`dsrun runs [--status X] [--limit N]`: the ledger as a table, newest first."""
    from rich.table import Table

    parser = _Parser(prog="dsrun runs", description="List recorded runs, newest first.")
    parser.add_argument("--status", help="completed, interrupted, oom, nan, refused, crashed or skipped")
    parser.add_argument("--all", action="store_true", help="also runs refused for bad input (hidden by default)")
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--good", action="store_true", help="only runs a smoke check marked good")
    opts = parser.parse_args(args)
    if opts.limit < 1:
        raise UserError(f"--limit {opts.limit}: must be >= 1")
    rows = query(opts.status, opts.limit, good=True if opts.good else None, refused=opts.all or bool(opts.status))
    table = Table(title=f"dsrun runs ({ledger_path()})")
    for column in ("id", "time", "status", "good", "tokens/s", "peak GiB", "final loss", "run", "parent"):
        table.add_column(column, justify="right" if column in ("id", "tokens/s", "peak GiB", "final loss") else "left")
    for r in rows:
        table.add_row(str(r["id"]), r["time"].replace("T", " ")[:19], r["status"], "yes" if r["good"] else "",
                      _fmt(r["tokens_per_s"], ",.0f"), _fmt(r["peak_memory_gib"], ".2f"),
                      _fmt(r["final_loss"], ".4f"), r["run_dir"], r["parent"] or "")
    console().print(table)  # full paths outside a terminal too


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one `dsrun: error:` line, exit 2, like every user error
        raise UserError(f"{self.prog}: {message}")


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)
