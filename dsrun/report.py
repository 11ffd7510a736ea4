"""Sweep report: every trial in a table sorted by throughput, a plot, a JSON file, and the winner as a recipe.

Written at the end of every sweep (a Hydra callback, conf/config.yaml) and by `dsrun report SWEEP_DIR`, from the
trials' folders alone (`record.json`, else `.hydra/overrides.yaml` for a trial that never finished).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback

from dsrun.constants import CONF_DIR
from dsrun.errors import UserError
COLOURS = {"completed": "tab:green", "interrupted": "tab:blue", "nan": "tab:orange", "oom": "tab:red",
           "crashed": "tab:purple", "refused": "tab:brown", "skipped": "tab:gray", "not finished": "black"}


class SweepReport(Callback):
    """Hydra calls this once the launcher has run every trial."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not any(sweep_dir.glob("*/record.json")):  # a sweep of plans or dry runs has nothing to rank
            return
        try:
            write_report(sweep_dir)
        except Exception as exc:  # the trials are done and on disk: a report problem must not look like a failure
            print(f"dsrun: warning: sweep report failed ({type(exc).__name__}: {exc}); retry with: dsrun report "
                  f"{sweep_dir}", file=sys.stderr)


def trials(sweep_dir: Path) -> list[dict[str, Any]]:
    found = []
    for folder in sweep_dir.iterdir():
        overrides = folder / ".hydra" / "overrides.yaml"
        if not (folder.is_dir() and (overrides.is_file() or (folder / "record.json").is_file())):
            continue
        try:
            record = json.loads((folder / "record.json").read_text())
        except (OSError, ValueError):
            record = {"status": "not finished", "overrides": yaml.safe_load(overrides.read_text()) or []}
        found.append({"trial": folder.name, "run_dir": str(folder.resolve()), **record})
    # throughput first; trials without a throughput (failed, skipped) after, in trial order
    return sorted(found, key=lambda t: (-(t.get("tokens_per_s") or -1), _num(t["trial"])))


def _num(name: str) -> int | float:
    return int(name) if name.isdigit() else math.inf


def winner(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    done = [t for t in rows if t["status"] == "completed" and t.get("tokens_per_s")]
    return max(done, key=lambda t: t["tokens_per_s"]) if done else None


def write_report(sweep_dir: Path, console: Any = None) -> dict[str, Any]:
    from rich.console import Console

    sweep_dir = Path(sweep_dir).resolve()
    if not sweep_dir.is_dir():
        raise UserError(f"{sweep_dir}: no such folder; pass a sweep folder (outputs/sweeps/<time>)")
    rows = trials(sweep_dir)
    if not rows:
        raise UserError(f"{sweep_dir}: no sweep trials in it (no <n>/.hydra/overrides.yaml); pass the folder a "
                        "`python -m dsrun -m ...` sweep wrote (outputs/sweeps/<time>)")
    best = winner(rows)
    report = {"sweep_dir": str(sweep_dir), "trials": rows, "winner": best["trial"] if best else None}
    (sweep_dir / "sweep_report.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(rows, sweep_dir / "sweep_report.png")
    if best is not None:
        (sweep_dir / "winner.yaml").write_text(winner_yaml(best, sweep_dir, standalone=True))
        (sweep_dir / "recipe").mkdir(exist_ok=True)
        (sweep_dir / "recipe" / "winner.yaml").write_text(winner_yaml(best, sweep_dir, standalone=False))
    console = console or Console(stderr=True, width=None if sys.stderr.isatty() else 160)
    console.print(table(rows, best))
    if best is not None:
        console.print(f"winner: trial {best['trial']}; run it: python -m dsrun --config-path {sweep_dir} "
                      "--config-name winner", soft_wrap=True)
    console.print(f"report: {sweep_dir / 'sweep_report.png'}, {sweep_dir / 'sweep_report.json'}", soft_wrap=True)
    return report


def varying(rows: list[dict[str, Any]]) -> set[str]:
    """Overrides that differ between trials: what the sweep swept (the rest is noise in a table)."""
    sets = [set(t.get("overrides") or []) for t in rows]
    return (set.union(*sets) - set.intersection(*sets) or set.union(*sets)) if sets else set()


def table(rows: list[dict[str, Any]], best: dict[str, Any] | None) -> Any:
    from rich.table import Table

    swept = varying(rows)
    out = Table(title="sweep trials, fastest first")
    for column in ("trial", "status", "tokens/s", "peak GiB", "final loss", "wall s", "overrides"):
        out.add_column(column, justify="right" if column in ("tokens/s", "peak GiB", "final loss", "wall s") else "left")
    for t in rows:
        style = "bold green" if t is best else "red" if t["status"] != "completed" else None
        out.add_row(t["trial"] + (" *" if t is best else ""), t["status"], _fmt(t.get("tokens_per_s"), ",.0f"),
                    _fmt(t.get("peak_memory_gib"), ".2f"), _fmt(t.get("final_loss"), ".4f"),
                    _fmt(t.get("wall_time_s"), ".1f"), " ".join(o for o in t.get("overrides") or [] if o in swept),
                    style=style)
    return out


def _fmt(value: Any, spec: str) -> str:
    return "" if value is None else format(value, spec)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """tokens/s against peak memory, one colour per status; trials without numbers are counted in the legend."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for status, colour in COLOURS.items():
        group = [t for t in rows if t["status"].split(":")[0] == status]
        if not group:
            continue
        shown = [t for t in group if t.get("tokens_per_s") and t.get("peak_memory_gib")]
        missing = len(group) - len(shown)
        label = f"{status}: {len(group)}" + (f" ({missing} not plotted: no numbers)" if missing else "")
        ax.scatter([t["peak_memory_gib"] for t in shown], [t["tokens_per_s"] for t in shown], c=colour, label=label,
                   s=60, edgecolors="black", linewidths=0.5)
        for t in shown:
            ax.annotate(t["trial"], (t["peak_memory_gib"], t["tokens_per_s"]), textcoords="offset points",
                        xytext=(5, 4), fontsize=8)
    ax.set_xlabel("peak memory per device (GiB)")
    ax.set_ylabel("tokens/s")
    ax.set_title("sweep: throughput vs memory")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def winner_yaml(trial: dict[str, Any], sweep_dir: Path, standalone: bool) -> str:
    """The winning trial's overrides as a `# @package _global_` config: group choices become `override /group`
    defaults, values become nested keys. standalone: also includes conf/config.yaml and finds conf/ through
    hydra.searchpath, so `--config-path SWEEP_DIR --config-name winner` runs it; otherwise a recipe for recipes/."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    defaults: list[Any] = ["config"] if standalone else []
    values: dict[str, Any] = {}
    skipped: list[str] = []
    for o in OverridesParser.create().parse_overrides(list(trial.get("overrides") or [])):
        key = o.key_or_group
        if o.is_delete() or o.package:
            skipped.append(o.input_line or key)
        elif (CONF_DIR / key).is_dir():
            defaults.append({("" if o.is_add() else "override ") + f"/{key}": o.value()})
        else:
            node = values
            *parents, leaf = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = o.value()
    body: dict[str, Any] = {"defaults": [*defaults, "_self_"]}
    if standalone:
        body["hydra"] = {"searchpath": [f"file://{CONF_DIR}"]}
    body.update(values)
    how = (f"python -m dsrun --config-path {sweep_dir} --config-name winner" if standalone else
           "copy into recipes/NAME.yaml, then python -m dsrun +recipe=NAME")
    head = ["# @package _global_",
            f"# Winner of sweep {sweep_dir}: trial {trial['trial']}, {trial['tokens_per_s']:,.0f} tokens/s, "
            f"peak {trial.get('peak_memory_gib') or 0:.2f} GiB, final loss {trial.get('final_loss')}",
            f"# Run: {how}"]
    if skipped:
        head.append(f"# Not expressible here, add on the command line: {' '.join(skipped)}")
    return "\n".join(head) + "\n" + yaml.safe_dump(body, sort_keys=False)


def report_command(args: list[str]) -> None:
    """`dsrun report SWEEP_DIR`."""
    if len(args) != 1 or args[0].startswith("-"):
        raise UserError("usage: dsrun report SWEEP_DIR")
    from rich.console import Console

    write_report(Path(args[0]), Console(width=None if sys.stdout.isatty() else 160))
