from __future__ import annotations

from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from dsrun.monitor.base import Monitor
from dsrun.quiet import console


class ConsoleMonitor(Monitor):
    """A rich progress bar (step, loss, tokens/s, memory, ETA) on stderr and a summary table on stdout at the end."""

    def __init__(self) -> None:
        self.console = console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=self.console, transient=False)

    def start(self, info: dict[str, Any]) -> None:
        self.live = self.console.is_terminal  # a log file or CI gets one line per log step instead of a bar
        if not self.live:
            return
        self.progress.start()
        self.task = self.progress.add_task("train", total=info["max_steps"], completed=info.get("start_step", 0),
                                           stats="")

    def log(self, metrics: dict[str, Any]) -> None:
        loss = "(no trained token)" if metrics["loss"] is None else f"{metrics['loss']:.4f}"
        stats = (f"loss {loss}  lr {metrics['lr']:.2e}  gnorm {metrics['grad_norm']:.2f}  "
                 f"{metrics['tokens_per_s']:,.0f} tok/s  {metrics['peak_memory_gib']:.2f} GiB")
        if "reward" in metrics:  # task=grpo
            stats += f"  reward {metrics['reward']:.3f}  length {metrics['completion_length']:.0f}"
        elif "reward_margin" in metrics:  # task=dpo
            stats += f"  margin {metrics['reward_margin']:.3f}  accuracy {metrics['reward_accuracy']:.2f}"
        if "eval_loss" in metrics:
            ppl = f" (ppl {metrics['eval_ppl']:,.2f})" if "eval_ppl" in metrics else ""  # task=dpo: none
            stats += f"  eval {metrics['eval_loss']:.4f}{ppl}"
        if self.live:
            self.progress.update(self.task, completed=metrics["step"], stats=stats)
        else:
            self.console.print(f"step {metrics['step']}  {stats}", soft_wrap=True)

    def finish(self, summary: dict[str, Any]) -> None:
        if self.live:
            self.progress.stop()
        table = Table(title=f"dsrun: {summary['status']}", show_header=False)
        for key in ("run_dir", "steps", "max_steps", "epochs", "final_loss", "first_loss", "eval_loss", "eval_ppl",
                    "best_eval_loss", "best_eval_step", "tokens_per_s", "trained_tokens_per_s", "mfu",
                    "peak_memory_gib", "tokens_seen", "tokens_trained", "tokens_per_epoch", "global_batch",
                    "wall_time_s", "weights"):
            if summary.get(key) is not None:
                value = summary[key]
                table.add_row(key, f"{value:,.4g}" if isinstance(value, float) else str(value))
        console(stderr=False).print(table)  # the run's result: stdout (progress and notes stay on stderr)
