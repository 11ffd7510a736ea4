"""The `task` option group's registry: each task's name, the function that runs it and what kind of task it is.

The function is named by module and attribute and imported only when the task runs, so the schema's validate(),
the entry point's --help and the sweep can read this table without loading torch or the task's libraries. Adding a
task: its conf/task/<name>.yaml and one entry here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Task:
    module: str
    function: str
    trains: bool = False  # runs the training loop: its own process under -m, the GPU plan check, pending backends
    loads_weights: bool = False  # inference: loads weights and trains nothing (dsrun/inference/)
    scratch: bool = False  # leaves no run folder behind (dsrun/run/scratch.py)

    def __call__(self, cfg: Any) -> Any:  # Any: the table sits below the schema; run_task holds the RunConfig
        return getattr(importlib.import_module(self.module), self.function)(cfg)


TASKS: dict[str, Task] = {
    "train": Task("dsrun.tasks", "train", trains=True),
    "dry_run": Task("dsrun.tasks", "dry_run", scratch=True),
    "plan": Task("dsrun.plan.report", "plan_task", scratch=True),  # no GPU needed
    "smoke": Task("dsrun.tasks", "smoke", trains=True),
    "dpo": Task("dsrun.tasks", "train", trains=True),  # the training loop with a preference loss (dsrun/preference.py)
    "grpo": Task("dsrun.tasks", "train", trains=True),  # rollouts by the engine, verifiable rewards (dsrun/reinforce.py)
    "generate": Task("dsrun.inference.generate", "generate_task", loads_weights=True, scratch=True),
    "serve": Task("dsrun.inference.server", "serve_task", loads_weights=True, scratch=True),
    "bench_infer": Task("dsrun.inference.bench", "bench_task", loads_weights=True),
    "doctor": Task("dsrun.doctor", "doctor_task"),
    "export": Task("dsrun.export", "export_task", scratch=True),
}
DPO_LOSSES = ("sigmoid", "ipo")  # task.loss under task=dpo (dsrun/preference.py)
GRPO_KEYS = ("generations", "max_completion_tokens", "temperature", "epsilon", "rewards", "compile")  # task=grpo's own
RUNNABLE_TASKS = tuple(name for name, task in TASKS.items() if task.trains)
INFERENCE_TASKS = tuple(name for name, task in TASKS.items() if task.loads_weights)
SCRATCH_TASKS = tuple(name for name, task in TASKS.items() if task.scratch)
