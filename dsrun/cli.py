"""Entry point: `python -m dsrun [overrides]` runs a task through Hydra; `dsrun <verb> ...` runs a subcommand.

Every composed config is resolved and validated *before* Hydra starts the job (and before any sweep starts),
so a bad override stops with one line and exit code 2 instead of a traceback.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any, Callable

import hydra
from omegaconf import DictConfig

from dsrun.config import register_configs, resolve, validate
from dsrun.errors import EXIT_USER_ERROR, UserError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def fail(message: str) -> None:
    """Print one user-facing line per problem and exit 2 (no traceback)."""
    for line in message.splitlines() or [message]:
        print(f"dsrun: error: {line}", file=sys.stderr)
    raise SystemExit(EXIT_USER_ERROR)


def one_line(exc: BaseException) -> str:
    """Hydra/OmegaConf errors span several lines with hints for Hydra developers; keep what a user acts on."""
    text = str(exc)
    cause = exc.__cause__ or exc.__context__
    if cause is not None and "full_key" in str(cause):
        text = f"{text} {cause}"
    key = re.search(r"full_key: (\S+)", text)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    keep = [ln for ln in lines if not ln.startswith(("full_key", "object_type", "reference_type", "Set the environment"))]
    msg = " ".join(keep)
    msg = msg.replace("To append to your config use ", "to add a new key use ")
    if key and key.group(1) not in msg:
        msg = f"{key.group(1)}: {msg}"
    return msg


def _compose_all(args: Any) -> list[DictConfig]:
    """Compose the config of every job this command line would start (every trial of a sweep)."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = [o for o in args.overrides if not o.lstrip("+~").startswith(("hydra.", "hydra/"))]
    jobs = [overrides]
    if args.multirun:
        parsed = OverridesParser.create().parse_overrides(overrides)
        jobs = [job for batch in BasicSweeper.split_arguments(parsed, max_batch_size=None) for job in batch]
    config_dir = args.config_dir or args.config_path or str(CONF_DIR)
    configs = []
    with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
        for job in jobs:
            configs.append(compose(config_name=args.config_name or "config", overrides=list(job)))
    return configs


def precheck(argv: list[str]) -> None:
    """Compose, resolve and validate every job before Hydra runs anything."""
    from hydra._internal.utils import get_args_parser

    from dsrun.hardware import gpu_catalog

    args = get_args_parser().parse_args(argv)
    if args.help or args.hydra_help or args.info or args.shell_completion:
        return
    try:
        configs = _compose_all(args)
    except UserError as exc:
        fail(str(exc))
    except Exception as exc:  # Hydra/OmegaConf composition errors are user errors here
        fail(one_line(exc))
    for cfg in configs:
        try:
            resolve(cfg)
            validate(cfg, gpu_catalog())
        except UserError as exc:
            fail("\n".join(getattr(exc, "problems", [str(exc)])))


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def hydra_main(cfg: DictConfig) -> None:
    from dsrun.tasks import run_task

    try:
        resolve(cfg)
        run_task(cfg)
    except UserError as exc:
        fail("\n".join(getattr(exc, "problems", [str(exc)])))


VERBS: dict[str, Callable[[list[str]], int]] = {}


def main() -> None:
    register_configs()
    argv = sys.argv[1:]
    if argv and argv[0] in VERBS:
        raise SystemExit(VERBS[argv[0]](argv[1:]))
    precheck(argv)
    hydra_main()
