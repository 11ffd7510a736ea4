"""`dsrun --help`: every verb and task in one line each, before Hydra's help (groups and keys); an unknown verb is
one line naming the closest one."""

from __future__ import annotations

import difflib
from typing import Collection

VERB_LINES = {
    "resume": "RUN_DIR [overrides]  continue a run from its latest checkpoint (train.max_steps=N trains further)",
    "replay": "RUN_DIR [overrides]  a past run again from its snapshot, in a new folder",
    "rollback": "[overrides]         replay the newest run a smoke check marked good",
    "report": "SWEEP_DIR           a sweep's table, sweep_report.png/.json and winner.yaml",
    "runs": "[--status S --all]   the run ledger, newest first (--all: refused runs too)",
    "diff": "RUN_A RUN_B         the config keys that differ between two runs",
    "doctor": "[overrides]         check this machine: versions, GPUs, links, all-reduce speed",
    "generate": "RUN_DIR \"PROMPT\"    answer a prompt with a run's (or a model folder's) weights",
    "serve": "RUN_DIR             an OpenAI-compatible API on 127.0.0.1:8000/v1",
    "export": "RUN_DIR OUT_DIR     a run as a Hugging Face folder (LoRA merged; bfloat16, or --dtype float32)",
}
TASK_LINES = {
    "train": "train (the default): progress bar, summary, weights in <run>/model",
    "dry_run": "print the whole resolved config and the batch arithmetic; start nothing",
    "plan": "memory, speed and cost per GPU, and the cheapest fixes when it does not fit (no GPU needed)",
    "dpo": "preference fine-tuning (DPO/IPO) on chosen/rejected pairs; the reference free under LoRA",
    "grpo": "GRPO with verifiable rewards: completions sampled by the engine on the training weights, rewarded",
    "smoke": "a short run whose checks (finite, falling loss) mark it good for `dsrun rollback`",
    "generate": "answer task.source's model (as `dsrun generate`)",
    "serve": "serve task.source's model (as `dsrun serve`)",
    "bench_infer": "time-to-first-token, decode tokens/s and memory per batch size",
    "doctor": "the machine check (as `dsrun doctor`)",
    "export": "task.source's run as a Hugging Face folder in task.out (as `dsrun export`)",
}
# Words a newcomer tries that are not verbs, and the verb or command that does it.
SYNONYMS = {"merge": "export", "continue": "resume", "ls": "runs", "list": "runs", "status": "runs",
            "check": "doctor", "chat": "generate", "compare": "diff"}


def usage(verbs: list[str], tasks: Collection[str]) -> str:
    width = max(map(len, verbs))
    lines = ["usage: dsrun [VERB ARGS...] | dsrun [group=option ...] [key=value ...]  (also: python -m dsrun ...)",
             "", "Verbs:"]
    lines += [f"  {verb:<{width}}  {VERB_LINES.get(verb, '')}".rstrip() for verb in verbs]
    lines += ["", "Tasks (task=NAME; the default is train):"]
    width = max(map(len, tasks))
    lines += [f"  {task:<{width}}  {TASK_LINES.get(task, '')}".rstrip() for task in tasks]
    lines += ["", "Options: -v/--verbose shows every config key and third-party log line on the console.",
              "Docs: README.md, docs/configuration.md (every key), docs/bad-inputs.md (every error).", "", ""]
    return "\n".join(lines)


def unknown_verb(word: str, verbs: list[str]) -> str | None:
    """The one-line problem for a first argument that is neither a verb nor an override, or None."""
    if not word or word in verbs or word.startswith(("-", "+", "~")) or "=" in word:
        return None
    close = SYNONYMS.get(word) or next(iter(difflib.get_close_matches(word, verbs, n=1, cutoff=0.5)), None)
    hint = f"did you mean `dsrun {close}`? " if close else ""
    return (f"{word}: no such verb; {hint}verbs: {', '.join(verbs)} (dsrun --help says what each does); an "
            "override needs key=value")
