"""A quiet console: dsrun's own lines on stderr, results on stdout, everything else in the run's log file.

Third-party libraries each talk in their own way: Lightning logs INFO lines through a handler of its own *and*
Hydra's root handler (every line twice), transformers and DeepSpeed keep private handlers (DeepSpeed's writes to
stdout, which carries dsrun's results), peft and transformers raise Python warnings per run, and transformers draws
a progress bar per save. `install()` routes all of it to the root logger, whose file handler (Hydra's
`<run>/dsrun.log`) keeps every line and whose console handler (ConsoleFilter) shows only dsrun's lines and errors.
`-v` / `--verbose` (or DSRUN_VERBOSE=1) shows everything, and the whole config tree.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import logging
import os
import sys
import warnings
from typing import Any, Iterator

VERBOSE_ENV = "DSRUN_VERBOSE"  # an environment variable, so ranks Fabric starts inherit the choice
VERBOSE_FLAGS = ("-v", "--verbose")
THIRD_PARTY_LOGGERS = ("lightning", "lightning.fabric", "lightning.pytorch", "lightning_fabric", "pytorch_lightning",
                       "transformers", "peft", "DeepSpeed", "torch", "accelerate", "bitsandbytes", "huggingface_hub")


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def take_verbose_flag(argv: list[str]) -> list[str]:
    """Remove -v/--verbose from the command line (Hydra does not know it) and remember it in the environment."""
    if any(a in VERBOSE_FLAGS for a in argv):
        os.environ[VERBOSE_ENV] = "1"
    return [a for a in argv if a not in VERBOSE_FLAGS]


def quiet_environment() -> None:
    """Before any library loads: no Hub progress bars; DeepSpeed told it runs on CPU where no NVIDIA device exists
    (auto-detection prints `Setting accelerator to CPU...` on stdout)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if not any(name.startswith("nvidia") and name[6:].isdigit() for name in _dev()):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    sys.meta_path.insert(0, _RouteOnImport())


def _dev() -> list[str]:
    try:
        return os.listdir("/dev")
    except OSError:
        return []


class ConsoleFilter(logging.Filter):
    """Hydra's console handler (conf/config.yaml: hydra.job_logging): dsrun's records and any error; the file
    handler has no filter and keeps every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        return verbose() or record.name.startswith("dsrun") or record.levelno >= logging.ERROR


def install() -> None:
    """Called once Hydra has configured logging (the job has started)."""
    logging.captureWarnings(True)  # Python warnings become `py.warnings` records: in the log file, off the console
    for name in THIRD_PARTY_LOGGERS:
        to_root(logging.getLogger(name))
    from transformers.utils import logging as hf_logging  # loaded now, not later with its own handler

    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    if not verbose():
        hf_logging.disable_progress_bar()  # `Writing model shards: 100%` at every save


def to_root(logger: logging.Logger) -> None:
    """Drop a library's own console handlers; its records reach the root logger's handlers instead."""
    for handler in list(logger.handlers):
        if type(handler) is logging.StreamHandler:  # not FileHandler (a subclass) a user may have added
            logger.removeHandler(handler)
    logger.propagate = True


class _RouteOnImport(importlib.abc.MetaPathFinder):
    """Libraries that add their console handler as they are imported, long after install() (Lightning loads with
    the strategy, DeepSpeed only for its strategies, with a stdout handler): routed as soon as the module ran."""

    LOGGERS = {"lightning": "lightning", "deepspeed.utils.logging": "DeepSpeed"}  # module -> the logger it sets up

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name not in self.LOGGERS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            run(module)
            to_root(logging.getLogger(self.LOGGERS[name]))

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def console(stderr: bool = False) -> Any:
    """A rich console that wraps and cuts nothing outside a terminal (a log file, CI, a pipe): rich's default
    there is 80 columns, which cut the summary's paths (`.../mod...`)."""
    from rich.console import Console

    probe = Console(stderr=stderr)
    return probe if probe.is_terminal else Console(stderr=stderr, width=100_000, soft_wrap=True)


@contextlib.contextmanager
def quiet_warnings() -> Iterator[None]:
    """For commands without a run folder or log (`dsrun export`): third-party warnings (peft's alpha_pattern,
    transformers' deprecations, bitsandbytes' missing CPU kernel) are not the user's to act on; `-v` shows them."""
    if verbose():
        yield
        return
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # `Writing model shards: 100%`
    loggers = {name: logging.getLogger(name).level for name in THIRD_PARTY_LOGGERS}
    for name in loggers:  # bitsandbytes warns through Python's last-resort handler, on stderr
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
        for name, before in loggers.items():
            logging.getLogger(name).setLevel(before)
