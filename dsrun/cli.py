"""Entry point: `python -m dsrun [overrides]` runs a task through Hydra; `dsrun <verb> ...` runs a subcommand.

Every composed config is resolved and validated *before* Hydra starts the job (and before any sweep starts),
so a bad override stops with one line and exit code 2 instead of a traceback.
"""

from __future__ import annotations

import difflib
import errno
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, cast

# Growable allocator segments instead of fixed blocks: what one step frees serves the next one's other sizes (a 7B
# QLoRA step held 0.4 GiB more reserved than allocated without). Read when CUDA first allocates: set before torch.
os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")
# CPU tensors of 2 MiB and up on transparent huge pages (read at PyTorch's first CPU allocation). A small model's step
# allocates its vocabulary-sized logits and gradients afresh (30-70 MB each for the tiny model's 129k vocabulary);
# faulting them in 4 KiB pages took a fifth of the default job's time on 2 cores (BENCHMARKS.md, CPU default job).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from dsrun import signals  # noqa: E402  (first: a signal during the imports below is one line)

signals.install()

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from dsrun.config import ignored_overrides, validate
from dsrun.schema import RunConfig, register_configs, typed
from dsrun.constants import CONF_DIR, VERB_OVERRIDES
from dsrun.errors import EXIT_USER_ERROR, ConfigError, Interrupted, UserError
from dsrun.hardware import gpu_catalog
from dsrun.help import unknown_verb, usage
from dsrun.keys import added_key_problems, plus_hint
from dsrun.paths import missing_paths
from dsrun.quiet import install as quiet_logging
from dsrun.quiet import quiet_environment, take_verbose_flag
from dsrun.resolve import resolve
from dsrun.run.rollback import chosen_micro_batch, refuse_group_overrides, snapshot_of
from dsrun.safe_read import read_yaml_mapping
from dsrun.run.folder import SWEEP_LOCK, check_folder, claim, lock, refuse_foreign, refuse_run_as_sweep_dir
from dsrun.run.files import rank_zero, run_dir
from dsrun.run.scratch import SCRATCH_RUN_DIR, discard_scratch_folder
from dsrun.task_table import TASKS


def fail(message: str) -> None:
    """Print one user-facing line per problem and exit 2 (no traceback)."""
    for line in message.splitlines() or [message]:
        print(f"dsrun: error: {line}", file=sys.stderr)
    raise SystemExit(EXIT_USER_ERROR)


def one_line(exc: BaseException) -> str:
    """Hydra/OmegaConf errors span several lines of hints for Hydra developers; say what the user must change."""
    text = " ".join(ln.strip() for ln in str(exc).splitlines() if ln.strip())
    cause = exc.__cause__ or exc.__context__
    if cause is not None:
        text += " " + " ".join(ln.strip() for ln in str(cause).splitlines() if ln.strip())
    if m := re.search(r"Could not override '([\w.]+)'.*?Key '(\w+)' (?:is )?not in", text):
        key, missing = m.group(1), m.group(2)
        if adding := plus_hint(key):
            return adding
        parts = key.split(".")
        at = parts.index(missing) if missing in parts else len(parts) - 1  # the first part the schema lacks
        parent, rest = ".".join(parts[:at]), ".".join(parts[at + 1:])
        known = _known_keys(parent)
        close = difflib.get_close_matches(missing, known, n=1)
        fixed = ".".join(filter(None, (parent, close[0] if close else "", rest)))
        hint = f"did you mean {fixed}?" if close else f"known keys: {', '.join(known)}"
        return f"{key}: no such key; {hint}"
    if m := re.search(r"Could not find '([\w/]+)/([\w.-]+)' Available options in '[\w/]+': (.*?) Config search", text):
        group, option, available = m.group(1), m.group(2), m.group(3).split()
        close = difflib.get_close_matches(option, available, n=1)
        hint = f" (did you mean {group}={close[0]}?)" if close else ""
        return f"{group}={option}: no such option{hint}; choose one of {', '.join(available)}"
    if m := re.search(r"Error merging override ([^ ]+) (Value .*?)(?: full_key|$)", text):
        return f"{m.group(1)}: {m.group(2)}"
    return re.sub(r" ?(full_key|object_type|reference_type): \S+| ?Set the environment variable HYDRA_FULL_ERROR.*", "",
                  text)


def _known_keys(dotted: str) -> list[str]:
    """Field names of the schema node at `dotted` (e.g. 'train'), for did-you-mean hints."""
    node = OmegaConf.structured(RunConfig)
    for part in filter(None, dotted.split(".")):
        node = node[part]
    return list(node.keys()) if OmegaConf.is_dict(node) else []


def _compose_all(args: Any) -> tuple[list[DictConfig], list[Path], list[str]]:
    """Compose the config of every job this command line would start (every trial of a sweep), once each, with
    Hydra's own settings: the folder each job writes into, as Hydra resolves it (interpolations, `++` and the
    default timestamp), and the overrides that pin those folders (`${now:...}` would resolve again, a moment later,
    when Hydra starts). The returned configs carry no `hydra` node."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser

    hydra_overrides = [o for o in args.overrides if o.lstrip("+~").startswith(("hydra.", "hydra/"))]
    overrides = [o for o in args.overrides if o not in hydra_overrides]
    jobs = [overrides]
    if args.multirun:
        parsed = OverridesParser.create().parse_overrides(overrides)
        jobs = [job for batch in BasicSweeper.split_arguments(parsed, max_batch_size=None) for job in batch]
    if not jobs:
        raise UserError(f"the sweep {' '.join(overrides)} has no trials (an empty range or list?); give every swept "
                        "key at least one value, e.g. train.seed=range(0,3)")
    config_dir = args.config_dir or args.config_path or str(CONF_DIR)
    key = "hydra.sweep.subdir" if args.multirun else "hydra.run.dir"
    configs, folders, base = [], [], None
    with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
        for num, job in enumerate(jobs):
            numbered = [f"hydra.job.num={num}", f"hydra.job.id={num}"] if args.multirun else []
            cfg = compose(config_name=args.config_name or "config", overrides=[*job, *hydra_overrides, *numbered],
                          return_hydra_config=True)
            HydraConfig.instance().set_config(cfg)
            where = str(OmegaConf.select(cfg, key))
            if not where.strip():
                raise UserError(f"{key}= is empty: Hydra would write into the current folder; name a folder, e.g. "
                                f"{key}={'${hydra.job.num}' if args.multirun else 'outputs/runs/my-run'}")
            if args.multirun and base is None:
                base = Path(str(OmegaConf.select(cfg, "hydra.sweep.dir"))).absolute()
            folders.append(base / where if base is not None else Path(where).absolute())
            with open_dict(cfg):
                del cfg["hydra"]
            configs.append(cfg)
    if base is not None:
        if len(set(folders)) < len(folders):
            same = next(f for f in folders if folders.count(f) > 1)
            raise UserError(f"hydra.sweep.subdir: several trials of this sweep would write into {same} (one would "
                            "resume another); include ${hydra.job.num} in it, e.g. hydra.sweep.subdir=${hydra.job.num}")
        return configs, folders, [f"hydra.sweep.dir={base}"]
    return configs, folders, [f"hydra.run.dir={folders[0]}"]


def precheck(argv: list[str]) -> list[str]:
    """Compose, resolve and validate every job before Hydra runs anything; then claim the run folder. Returns the
    Hydra overrides the claim adds (dsrun/run/folder.py). Hydra's global config is put back as it was: composing
    sets it (for `${hydra:...}`), and a caller in the same process (a test, a notebook) must not inherit a
    half-filled one whose runtime.output_dir is missing."""
    from hydra.core.hydra_config import HydraConfig

    before = HydraConfig.instance().cfg
    try:
        return _precheck(argv)
    finally:
        HydraConfig.instance().cfg = before


def _precheck(argv: list[str]) -> list[str]:
    from hydra._internal.utils import get_args_parser

    args = get_args_parser().parse_args(argv)
    if args.help or args.hydra_help or args.info or args.shell_completion:
        return []
    if problems := added_key_problems(args.overrides, Path(args.config_dir or args.config_path or CONF_DIR)):
        fail("\n".join(problems))
    try:
        configs, folders, pins = _compose_all(args)
        if args.config_path or args.config_dir:  # a snapshot carries no schema: type-check it against the current one
            try:
                configs = [cast(DictConfig, OmegaConf.merge(OmegaConf.structured(RunConfig), cfg)) for cfg in configs]
            except OmegaConfBaseException as exc:
                first = str(getattr(exc, "msg", exc)).strip().splitlines()[0]
                fail(f"{getattr(exc, 'full_key', '') or 'the snapshot'}: {first}")
    except UserError as exc:
        fail(str(exc))
    except Exception as exc:  # Hydra/OmegaConf composition errors are user errors here
        fail(one_line(exc))
    composed = [cast(dict[str, Any], OmegaConf.to_container(cfg)) for cfg in configs]  # as composed, before resolve() fills `auto`
    for composed_cfg in configs:
        try:
            cfg = typed(composed_cfg)
            resolve(cfg)
            validate(cfg, gpu_catalog())
            if problems := ignored_overrides(cfg, args.overrides) + missing_paths(cfg):
                raise ConfigError(problems)
        except UserError as exc:
            fail("\n".join(getattr(exc, "problems", [str(exc)])))
        except OmegaConfBaseException as exc:  # a broken ${...} interpolation
            key, why = getattr(exc, "full_key", None) or "the config", getattr(exc, "msg", None) or one_line(exc)
            why = re.sub(r" ?(full_key|object_type|reference_type)[:=] ?\S+", "", " ".join(str(why).split()))
            fail(f"{key}: cannot resolve its value ({why}); fix or remove the ${{...}} reference")
    return claim_run_dir(args, composed, configs, folders, pins)


def claim_run_dir(args: Any, composed: list[dict[str, Any]], configs: list[DictConfig], folders: list[Path],
                  pins: list[str]) -> list[str]:
    """Rank 0 locks the folder of a single run, and checks that every job may write where Hydra will put it (the
    folders _compose_all resolved), pinned in the command line so Hydra writes exactly where the checks looked.
    Returns the Hydra overrides that adds."""
    if not rank_zero():
        return []
    try:
        overrides = [o for o in args.overrides if not o.lstrip("+~").startswith(("hydra.", "hydra/"))]
        if args.multirun:
            base = Path(pins[0].split("=", 1)[1])
            refuse_run_as_sweep_dir(base)
            check_run_dir(base, "hydra.sweep.dir")
            lock(base, SWEEP_LOCK, "hydra.sweep.dir")  # one sweep at a time writes its trials here
            for folder, cfg in zip(folders, composed):
                check_folder(folder, cfg)
            return pins
        refuse_foreign(folders[0])
        check_run_dir(folders[0], "hydra.run.dir")
        if not any(o.lstrip("+").startswith("hydra.run.dir=") for o in args.overrides):
            os.environ[SCRATCH_RUN_DIR] = str(folders[0])  # dsrun's own choice: a plan's folder may go again
        return pins + claim(folders[0], composed[0], configs[0], overrides)
    except UserError as exc:
        fail(str(exc))
        return []


def check_run_dir(folder: Path, key: str) -> None:
    """The run folder must be creatable and writable before anything starts (Hydra would fail later with a
    traceback, and a full disk in the middle of its snapshot)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        fail(f"{key}={folder}: cannot create the {what(key)} ({exc.strerror}); choose a writable place, e.g. "
             f"{key}={writable_example()}")
    probe = folder / f".dsrun-write-probe-{os.getpid()}"
    try:  # a full disk or read-only mount fails here, not in Hydra's own snapshot save (a traceback)
        with probe.open("wb") as handle:
            handle.write(b"\0" * 65536)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        remedy = "free disk space" if exc.errno == errno.ENOSPC else "make it writable"
        fail(f"{key}={folder}: cannot write to the {what(key)} ({exc.strerror}); {remedy} or choose another "
             f"place, e.g. {key}={writable_example()}")
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass


def what(key: str) -> str:
    return "sweep folder" if "sweep" in key else "run folder"


def writable_example() -> str:
    """An absolute run folder that can really be created (a relative one fails in a read-only directory)."""
    import tempfile

    for base in (Path.home(), Path(tempfile.gettempdir())):
        if base.is_dir() and os.access(base, os.W_OK):
            return str(base / "dsrun-runs" / "my-run")
    return "/path/to/a/writable/folder/my-run"


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def hydra_main(cfg: DictConfig) -> None:
    from dsrun.run.checkpoint import last_checkpoint_note  # torch, loaded whole before a signal may raise into it
    from dsrun.tasks import run_task  # the tasks' libraries load here, after the pre-check has passed

    signals.started()
    try:
        quiet_logging()  # after the imports: Lightning adds its console handler as it loads
        probe = cfg.train.micro_batch == "auto"  # resolve() puts the planner's guess in its place
        resolve(typed(cfg))
        run_task(typed(cfg), probe_micro_batch=probe)
    except Exception as exc:
        # a signal, also where a library caught it and failed in its own way: transformers' lazy imports re-raise
        # it as their error, a jinja chat template went on with a None and was reported as refusing the chat
        signum = exc.signum if isinstance(exc, Interrupted) else signals.received()
        if signum is not None:
            stopped(Interrupted(signum), last_checkpoint_note)
        if isinstance(exc, UserError):
            fail("\n".join(getattr(exc, "problems", [str(exc)])))
        raise
    finally:
        discard_scratch_folder(cfg.task.name)  # done, refused or stopped: a task that keeps nothing leaves no folder


def stopped(exc: Interrupted, last_checkpoint_note: Callable[[Path], str]) -> None:
    """A signal outside the training loop (which handles its own): one line saying what is on disk, the shell's exit
    status for the signal."""
    print(f"dsrun: stopped by {exc.name} outside the training steps (start-up or the final save); "
          f"{last_checkpoint_note(run_dir())}", file=sys.stderr)
    raise SystemExit(128 + exc.signum)


def resume_argv(args: list[str]) -> list[str]:
    """`dsrun resume RUN_DIR [overrides]`: the run's own composed config, in its own folder, from its latest
    checkpoint. Overrides apply on top (e.g. train.max_steps=2000 to train further)."""
    if not args or args[0].startswith("-"):
        fail("usage: dsrun resume RUN_DIR [overrides...]")
    run = Path(args[0]).resolve()
    saved = snapshot_of(args[0])
    refuse_group_overrides("resume", saved, args[1:])
    return ["--config-path", str(saved.parent), "--config-name", "config", f"hydra.run.dir={run}",
            "train.resume=auto", *chosen_micro_batch(run), *by_steps(saved, args[1:]), *args[1:]]


def by_steps(saved: Path, overrides: list[str]) -> list[str]:
    """A run trained by epochs, continued to a number of steps (`train.max_steps=N` alone): the steps decide its
    length from now on (the two together would be refused as ambiguous)."""
    keys = {o.lstrip("+~").split("=", 1)[0] for o in overrides}
    epochs = (read_yaml_mapping(saved, "restore the file").get("train") or {}).get("epochs")
    return ["train.epochs=null"] if "train.max_steps" in keys and "train.epochs" not in keys and epochs else []


def _lazy(module: str, name: str) -> Callable[[list[str]], Any]:
    """A verb's code is imported only when the verb is used (the training path stays lean)."""
    def call(args: list[str]) -> Any:
        import importlib

        return getattr(importlib.import_module(module), name)(args)
    return call


# Verbs that become a Hydra command line, and commands that do their work and exit without Hydra.
VERBS: dict[str, Callable[[list[str]], list[str]]] = {
    "resume": resume_argv, "replay": _lazy("dsrun.run.rollback", "replay_argv"),
    "rollback": _lazy("dsrun.run.rollback", "rollback_argv"), "doctor": _lazy("dsrun.doctor", "doctor_argv"),
    "generate": _lazy("dsrun.inference.verbs", "generate_argv"), "serve": _lazy("dsrun.inference.verbs", "serve_argv")}
COMMANDS: dict[str, Callable[[list[str]], None]] = {
    "report": _lazy("dsrun.report", "report_command"), "runs": _lazy("dsrun.run.ledger", "runs_command"),
    "diff": _lazy("dsrun.run.rollback", "diff_command"), "export": _lazy("dsrun.export", "export_argv")}


def main() -> None:
    signals.install()  # again: a process forked after this module was imported starts with the defaults
    quiet_environment()
    register_configs()
    sys.argv = [sys.argv[0], *take_verbose_flag(sys.argv[1:])]
    argv = sys.argv[1:]
    verbs = [*VERBS, *COMMANDS]
    if argv and argv[0] in ("--help", "-h"):  # dsrun's verbs and tasks, then Hydra's groups and keys
        print(usage(verbs, TASKS), end="")
    elif argv and (problem := unknown_verb(argv[0], verbs)):
        fail(problem)
    if argv and argv[0] in COMMANDS:
        signals.started()
        try:
            return COMMANDS[argv[0]](argv[1:])
        except UserError as exc:
            fail(str(exc))
    if argv and argv[0] in VERBS:
        typed = argv[1:]
        try:
            argv = VERBS[argv[0]](typed)
        except UserError as exc:
            fail(str(exc))
        os.environ[VERB_OVERRIDES] = "\n".join(verb_overrides(argv, typed))
        # Fabric starts ranks > 0 by re-running sys.argv: give them the expanded command line
        sys.argv = [sys.argv[0], *argv]
    sys.argv = [sys.argv[0], *hydra_argv(sys.argv[1:], [])]
    argv = sys.argv[1:]
    rank = os.environ.get("RANK", "0")
    if rank != "0" and "LOCAL_RANK" in os.environ and "TORCHELASTIC_RUN_ID" in os.environ:
        # under torchrun every rank runs Hydra: only rank 0 writes .hydra/ and the job log (all share the folder)
        sys.argv += ["hydra.output_subdir=null", f"hydra.job.name=dsrun_rank{rank}"]
        argv = sys.argv[1:]
    sys.argv = [sys.argv[0], *hydra_argv(argv, precheck(argv))]
    hydra_main()


def verb_overrides(argv: list[str], typed: list[str]) -> list[str]:
    """The overrides a verb's expansion `argv` holds that the user did not type (`train.resume=auto`, ...)."""
    values = {i + 1 for i, token in enumerate(argv) if token in ("--config-path", "--config-name", "-cp", "-cn")}
    pending = list(typed)
    added = []
    for i, token in enumerate(argv):
        if token in pending:
            pending.remove(token)
        elif i not in values and "=" in token and not token.lstrip("+~").startswith(("hydra.", "-")):
            added.append(token)
    return added


def hydra_argv(argv: list[str], added: list[str]) -> list[str]:
    """argv in the order Hydra's parser takes it: its flags first (it takes none after the overrides:
    `python -m dsrun train.lr=1e-4,3e-4 -m` printed its usage), then the overrides, with `added` in place of the
    user's overrides of the same keys (Hydra refuses a key given twice)."""
    import contextlib
    import io

    from hydra._internal.utils import get_args_parser

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            overrides = list(get_args_parser().parse_intermixed_args(argv).overrides)
    except SystemExit:  # not parseable: Hydra reports it as it starts
        return argv + added
    flags, pending = [], list(overrides)
    for token in argv:
        if pending and token == pending[0]:
            pending.pop(0)
        else:
            flags.append(token)
    keys = {o.split("=", 1)[0] for o in added}
    return flags + [o for o in overrides if o.lstrip("+").split("=", 1)[0] not in keys] + added


def entry() -> None:
    """`python -m dsrun` and the `dsrun` script: run `main`, then `leave`. A bug's traceback still takes the normal
    exit."""
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exit_status(exc)
    except Interrupted as exc:
        print(f"dsrun: {exc}", file=sys.stderr)
        code = 128 + exc.signum
    leave(code)


def exit_status(exc: SystemExit) -> int:
    """The status the interpreter makes of sys.exit(...): a message is printed and exits 1."""
    if exc.code is None or isinstance(exc.code, int):
        return exc.code or 0
    print(exc.code, file=sys.stderr)
    return 1


def leave(code: int) -> None:
    """Exit without the interpreter tearing down the ~3000 modules torch, Lightning and transformers load (about a
    second per process, rank or probe). What shutdown must still do is done here: non-daemon threads joined, atexit
    handlers run (logging, W&B, multiprocessing), stdio flushed."""
    import atexit
    import threading

    threading._shutdown()  # type: ignore[attr-defined]
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
