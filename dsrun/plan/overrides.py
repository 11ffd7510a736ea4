"""The config as plain data for the planner: cheap to copy and change for re-planning (`apply_overrides`)."""

from __future__ import annotations

import functools
from dataclasses import asdict
from typing import Any, cast

import yaml
from omegaconf import OmegaConf

from dsrun.schema import RunConfig
from dsrun.constants import CONF_DIR


class Box(dict):
    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    def __setattr__(self, key: str, value: Any) -> None:
        self[key] = value


def boxed(value: Any) -> Any:
    """A deep copy as Box/list/scalars (from a DictConfig, dict or Box)."""
    if isinstance(value, dict):
        return Box({k: boxed(v) for k, v in value.items()})
    if isinstance(value, list):
        return [boxed(v) for v in value]
    if value is None or isinstance(value, (str, int, float)):
        return value
    return boxed(OmegaConf.to_container(value, resolve=True)) if OmegaConf.is_config(value) else value


@functools.cache
def option_file(group: str, option: str) -> dict[str, Any]:
    """conf/<group>/<option>.yaml over the group's schema defaults, as Hydra composes it."""
    schema = getattr(RunConfig(), group)
    return {**asdict(schema), **(yaml.safe_load((CONF_DIR / group / f"{option}.yaml").read_text()) or {})}


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """A copy of cfg with Hydra-style overrides applied: `group=option` (its conf/ file) or `a.b=value`."""
    new = boxed(cfg)
    for item in overrides:
        key, value = item.split("=", 1)
        if "." not in key:
            new[key] = boxed(option_file(key, value))
            continue
        *path, last = key.split(".")
        node = new
        for part in path:
            node = node[part]
        node[last] = yaml.safe_load(value)
    return cast(RunConfig, new)  # the Box reads like the schema it copies (attribute access, the same keys)


# ---------------------------------------------------------------------------------------------------------------
# The model, counted exactly on the meta device (no memory, well under a second even for 671 B parameters).
