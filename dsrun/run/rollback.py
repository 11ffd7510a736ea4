"""Snapshots and rollback: replay a past run, roll back to the last good one, smoke-check a config, diff two runs.

A run's `.hydra/config.yaml` is the config exactly as composed (before `auto` was filled in), so composing from
it again (`--config-path <run>/.hydra`, as `dsrun resume` does) re-runs that run. A replay starts from scratch in
a new folder and records the run it came from as its parent in the ledger (dsrun/run/ledger.py reads that from the
config path). `task=smoke` is a short run whose checks mark it `good`; `dsrun rollback` replays the newest good run.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from dsrun.constants import CONF_DIR
from dsrun.errors import UserError
from dsrun.run.ledger import latest_good, ledger_path
from dsrun.safe_read import read_yaml_mapping

if TYPE_CHECKING:
    from dsrun.schema import RunConfig

SMOKE_MIN_LOGGED = 6  # first 3 and last 3 logged losses, not overlapping
SMOKE_MAX_GRAD_NORM = 100.0  # pre-clip norm; healthy runs clipped at 1.0 stay within ~0.1-10


def snapshot_of(folder: str) -> Path:
    """`<run>/.hydra/config.yaml`, checked to be a dsrun config, or a one-line user error."""
    run = Path(folder).resolve()
    saved = run / ".hydra" / "config.yaml"
    if not saved.is_file():
        raise UserError(f"{run}: not a dsrun run folder (no .hydra/config.yaml); pass a folder a run wrote "
                        "(outputs/runs/<time> or a sweep's outputs/sweeps/<time>/<n>)")
    try:
        data = yaml.safe_load(saved.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"{saved}: corrupted snapshot, not YAML ({str(exc).splitlines()[0]}); "
                        "replay another run or restore the file") from None
    if not isinstance(data, dict) or not {"train", "model", "task"} <= set(data):
        raise UserError(f"{saved}: corrupted snapshot, not a dsrun config (no train/model/task sections); "
                        "replay another run or restore the file")
    return saved


def refuse_group_overrides(verb: str, saved: Path, args: list[str]) -> None:
    """`group=option` cannot apply to a snapshot: composing from `<run>/.hydra/config.yaml` there are no groups left,
    only their keys. Say so, with the command that starts a new run with that option instead."""
    groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir()}
    chosen = [a for a in args if "=" in a and a.split("=", 1)[0].lstrip("+~") in groups]
    if not chosen:
        return
    try:
        original = yaml.safe_load((saved.parent / "overrides.yaml").read_text()) or []
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        original = []
    replaced = {a.split("=", 1)[0].lstrip("+~") for a in chosen}
    original = [o for o in original if isinstance(o, str) and not o.startswith("hydra.")
                and o.split("=", 1)[0].lstrip("+~") not in replaced] if isinstance(original, list) else []
    keys = " ".join(f"{a.split('=', 1)[0]}.<key>=..." for a in chosen)
    raise UserError(f"dsrun {verb} {saved.parent.parent} {' '.join(chosen)}: {verb} composes from the run's snapshot "
                    f"({saved}), where config groups are already keys; change keys instead ({keys}), or start a new "
                    f"run with that option: python -m dsrun {' '.join([*original, *chosen])}")


def _run_dir_pattern() -> str:
    """New folders follow conf/config.yaml's hydra.run.dir (a snapshot does not carry Hydra's settings)."""
    return yaml.safe_load((CONF_DIR / "config.yaml").read_text())["hydra"]["run"]["dir"]


def replay_argv(args: list[str]) -> list[str]:
    """`dsrun replay RUN_DIR [overrides]`: the run's composed config, from scratch, in a new run folder."""
    if not args or args[0].startswith("-"):
        raise UserError("usage: dsrun replay RUN_DIR [overrides...]")
    saved = snapshot_of(args[0])
    refuse_group_overrides("replay", saved, args[1:])
    return ["--config-path", str(saved.parent), "--config-name", "config", f"hydra.run.dir={_run_dir_pattern()}",
            "hydra.job.name=dsrun", "train.resume=never", *chosen_micro_batch(saved.parent.parent), *args[1:]]


def chosen_micro_batch(run: Path) -> list[str]:
    """`dsrun resume|replay` of a train.micro_batch=auto run use the size its probe chose (its config.yaml
    snapshot) instead of probing again: the data order and the checkpoint assume that split."""
    snapshot = run / "config.yaml"
    if not snapshot.is_file():
        return []
    saved = read_yaml_mapping(snapshot, "restore it, or remove it to resume with the snapshot in .hydra/")
    chosen = (saved.get("train") or {}).get("micro_batch") if isinstance(saved.get("train"), dict) else None
    return [f"train.micro_batch={chosen}"] if isinstance(chosen, int) else []


def rollback_argv(args: list[str]) -> list[str]:
    """`dsrun rollback [overrides]`: replay the newest run a smoke check marked good."""
    good = latest_good()
    if good is None:
        raise UserError(f"no run is marked good in the ledger {ledger_path()}; a passing `python -m dsrun "
                        "task=smoke ...` marks one")
    print(f"dsrun: rolling back to run {good['id']} ({good['run_dir']}, {good['time']})", file=sys.stderr)
    return replay_argv([good["run_dir"], *args])


# ---------------------------------------------------------------------------------------------------------------
# task=smoke

def prepare_smoke(cfg: RunConfig) -> None:
    """At most task.steps steps (a recipe's 1000 become 100; train.max_steps=20 stays 20), logged often enough
    for the loss check; the shortened values land in the run's config.yaml."""
    length = cfg.train.max_steps if cfg.train.max_steps is not None else cfg.task.steps  # by epochs: task.steps
    if length is None:
        raise UserError("task=smoke with task.steps=null and a run counted in epochs: the check needs a length; set "
                        "task.steps=100")
    steps = min(length, cfg.task.steps or length)
    cfg.train.epochs = None  # the smoke run's length is in steps
    if steps < SMOKE_MIN_LOGGED:  # refuse before the model costs anything
        raise UserError(f"task=smoke with {steps} steps: the loss check needs at least {SMOKE_MIN_LOGGED} "
                        "(task.steps and train.max_steps)")
    cfg.train.max_steps = steps
    cfg.train.log_every = min(cfg.train.log_every, max(1, steps // (2 * SMOKE_MIN_LOGGED)))


def smoke_problems(run_dir: Path, summary: dict[str, Any]) -> list[str]:
    """What makes this run not good: unfinished, loss not finite or not falling, gradient norm out of bounds."""
    import json

    path = run_dir / "metrics.jsonl"
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []
    return check_metrics(rows, summary.get("status", "completed"))


def check_metrics(rows: list[dict[str, Any]], status: str = "completed") -> list[str]:
    problems = []
    if status != "completed":
        problems.append(f"task=smoke failed: the run ended {status}, not completed")
    if len(rows) < SMOKE_MIN_LOGGED:
        return problems + [f"task=smoke failed: {len(rows)} logged steps, the check needs {SMOKE_MIN_LOGGED}; "
                           "raise task.steps or lower train.log_every"]
    rows = [row for row in rows if row["loss"] is not None]  # intervals with no trained token have no loss
    losses = [row["loss"] for row in rows]
    bad = next((row["step"] for row in rows if not math.isfinite(row["loss"])), None)
    if bad is not None:
        problems.append(f"task=smoke failed: loss not finite at step {bad}; lower train.lr")
    else:
        first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
        if not last < first:
            problems.append(f"task=smoke failed: loss not falling (first 3 logged {first:.4f}, last 3 {last:.4f}); "
                            "check train.lr and the data")
    norms = [(row["step"], row["grad_norm"]) for row in rows]
    step, worst = max(norms, key=lambda n: n[1] if math.isfinite(n[1]) else math.inf)
    if not math.isfinite(worst) or worst > SMOKE_MAX_GRAD_NORM:
        problems.append(f"task=smoke failed: gradient norm {worst:.4g} at step {step} (bound "
                        f"{SMOKE_MAX_GRAD_NORM:g}); lower train.lr or keep clipping on")
    return problems


# ---------------------------------------------------------------------------------------------------------------
# dsrun diff

def diff_command(args: list[str]) -> None:
    """`dsrun diff RUN_A RUN_B`: every config key that differs, one `key: old → new` line each (stdout)."""
    if len(args) != 2:
        raise UserError("usage: dsrun diff RUN_A RUN_B")
    a, b = (flatten(_resolved_config(folder)) for folder in args)
    changed = [key for key in sorted(a.keys() | b.keys()) if a.get(key, _ABSENT) != b.get(key, _ABSENT)]
    for key in changed:
        print(f"{key}: {_show(a.get(key, _ABSENT))} → {_show(b.get(key, _ABSENT))}")
    if not changed:
        print("dsrun: the two runs' configs are identical", file=sys.stderr)


_ABSENT = object()


def _resolved_config(folder: str) -> dict[str, Any]:
    """The run's config.yaml (what really ran); a run that died before writing it has only its snapshot."""
    run = Path(folder)
    path = next((p for p in (run / "config.yaml", run / ".hydra" / "config.yaml") if p.is_file()), None)
    if path is None:
        raise UserError(f"{run.resolve()}: not a dsrun run folder (no config.yaml); pass a folder a run wrote")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError):
        data = None
    if not isinstance(data, dict):
        raise UserError(f"{path}: corrupted config, not a YAML mapping")
    return data


def flatten(node: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _show(value: Any) -> str:
    if value is _ABSENT:
        return "(absent)"
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()
