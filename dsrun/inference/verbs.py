"""`dsrun generate [SOURCE] [PROMPT] [overrides]` and `dsrun serve [SOURCE] [overrides]` as Hydra command lines.

SOURCE is a folder (a run, an exported or a Hugging Face folder); without one the model option is used (model=tiny,
random init). An argument of the form key=value is an override; anything else is SOURCE, then PROMPT."""

from __future__ import annotations

import re
from pathlib import Path

from dsrun.errors import UserError

OVERRIDE = re.compile(r"^[+~]?[\w.@/-]+=")


def quoted(value: str) -> str:
    """A Hydra override value that stays a string whatever it holds (quotes, spaces, `${`, `=`)."""
    escaped = value.replace("\\", "\\\\").replace("'", "\\'").replace("${", "\\${")
    return f"'{escaped}'"


def _split(args: list[str]) -> tuple[list[str], list[str]]:
    positional = [a for a in args if not OVERRIDE.match(a) and not a.startswith("-")]
    return positional, [a for a in args if a not in positional]


def generate_argv(args: list[str]) -> list[str]:
    positional, overrides = _split(args)
    if len(positional) > 2:
        raise UserError("usage: dsrun generate [SOURCE] [PROMPT] [overrides...]; quote a prompt with spaces")
    source = prompt = None
    if len(positional) == 2:
        source, prompt = positional
    elif positional:  # one: a folder (or something that names a path) is SOURCE, anything else the prompt
        looks_like_path = Path(positional[0]).expanduser().is_dir() or "/" in positional[0]
        source, prompt = (positional[0], None) if looks_like_path else (None, positional[0])
    argv = ["task=generate"]
    if source is not None:
        argv.append(f"task.source={quoted(source)}")
    if prompt is not None:
        argv.append(f"generate.prompt={quoted(prompt)}")
    return [*argv, *overrides]


def serve_argv(args: list[str]) -> list[str]:
    positional, overrides = _split(args)
    if len(positional) > 1:
        raise UserError("usage: dsrun serve [SOURCE] [overrides...]")
    return ["task=serve", *[f"task.source={quoted(p)}" for p in positional], *overrides]
