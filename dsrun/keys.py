"""Keys the user adds with a leading `+`: read by some code, or refused before any work.

Hydra accepts `+group.new_key=value` into any node, writes it to config.yaml, and nothing reads it: a silently
ignored setting. Only the free-form nodes (a model's architecture fields, the process environment) take new keys;
`+recipe=...` and other `+group=option` add a config group, which Hydra itself checks.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from dsrun.schema import RunConfig

FREE_FORM = ("model.fields", "hardware.env")  # dict nodes whose new keys code reads (HF config fields, env vars)


def schema_keys() -> list[str]:
    """Every dotted key of the schema (leaves and free-form nodes)."""
    def walk(node: Any, prefix: str) -> Any:
        for key in node.keys():
            dotted = f"{prefix}{key}"
            child = node._get_node(key)
            if OmegaConf.is_dict(child) and dotted not in FREE_FORM:
                yield from walk(child, dotted + ".")
            else:
                yield dotted

    return list(walk(OmegaConf.structured(RunConfig), ""))


def closest_key(key: str, known: list[str]) -> str | None:
    """The schema key nearest to `key`: among its siblings first (train.epoch -> train.epochs) after the same name
    in another group (optim.epochs -> train.epochs), then anywhere."""
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    siblings = [k for k in known if k.rsplit(".", 1)[0] == parent]
    leaf = key.rsplit(".", 1)[-1]
    by_leaf = {k.rsplit(".", 1)[-1]: k for k in known}
    if leaf in by_leaf:  # the right name in the wrong group
        return by_leaf[leaf]
    if close := difflib.get_close_matches(leaf, [k.rsplit(".", 1)[-1] for k in siblings], n=1, cutoff=0.6):
        return f"{parent}.{close[0]}" if parent else close[0]
    if close := difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.75):
        return by_leaf[close[0]]
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return close[0] if close else None


def free_form(key: str) -> bool:
    return any(key.startswith(node + ".") for node in FREE_FORM)


def plus_hint(key: str) -> str | None:
    """The message for an unknown key where adding one is meaningful (a free-form node); None elsewhere."""
    return f"{key}: not set yet; a new key needs a leading +: +{key}=..." if free_form(key) else None


def added_key_problems(overrides: list[str], conf_dir: Path) -> list[str]:
    """One problem per `+key=value` that no code would read, or that is already a key."""
    known = None
    problems = []
    for override in overrides:
        if not override.startswith("+"):
            continue
        forced = override.startswith("++")
        key = override.lstrip("+").split("=", 1)[0].strip()
        if key.startswith(("hydra.", "hydra/")) or (conf_dir / key).is_dir() or free_form(key):
            continue  # a config group (+recipe=...), Hydra's own keys, a field of a free-form node
        known = known if known is not None else schema_keys()
        value = override.split("=", 1)[1] if "=" in override else "..."
        if key in known:
            if not forced:
                problems.append(f"+{key}: already a key; set it without the +: {key}={value}")
            continue
        close = closest_key(key, known)
        hint = f"did you mean {close}?" if close else "see docs/configuration.md for the keys"
        problems.append(f"+{key}: no code reads this key, so it would be ignored; {hint}")
    return problems
