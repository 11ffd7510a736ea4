"""serve.engine=vllm: hand an exported folder to `vllm serve`, which runs in its own environment (vLLM pins its own
torch; it cannot share dsrun's). Tensor parallel over hardware.devices; the API key travels in VLLM_API_KEY, never
on the command line."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from typing import TYPE_CHECKING

from dsrun.errors import UserError
from dsrun.inference.load import describe

if TYPE_CHECKING:
    from dsrun.schema import RunConfig

INSTALL = ("serve.engine=vllm: no `vllm` executable on PATH; install vLLM in an environment of its own "
           "(python -m venv ~/vllm && ~/vllm/bin/pip install vllm), put ~/vllm/bin on PATH, or use "
           "serve.engine=dsrun")


def vllm_command(cfg: RunConfig, folder: str, executable: str) -> list[str]:
    srv = cfg.serve
    command = [executable, "serve", folder, "--host", srv.host, "--port", str(srv.port or 8000),
               "--served-model-name", srv.model_name or os.path.basename(os.path.normpath(folder)),
               "--tensor-parallel-size", str(cfg.hardware.devices), "--max-num-seqs", str(srv.max_batch),
               "--max-model-len", str(srv.max_prompt_tokens + srv.max_tokens), "--seed", str(srv.seed)]
    if cfg.quant.method == "nf4":
        command += ["--quantization", "bitsandbytes"]
    return command


def serve_with_vllm(cfg: RunConfig) -> None:
    executable = shutil.which("vllm")
    if executable is None:
        raise UserError(INSTALL)
    source = cfg.task.source
    if source is None or describe(source) != "folder":
        raise UserError(f"serve.engine=vllm takes a Hugging Face folder; export the run first: dsrun export {source} "
                        f"OUT_DIR, then dsrun serve OUT_DIR serve.engine=vllm")
    env = dict(os.environ)
    if cfg.serve.api_key_env:
        key = os.environ.get(cfg.serve.api_key_env)
        if not key:
            raise UserError(f"serve.api_key_env={cfg.serve.api_key_env}: that environment variable is not set")
        env["VLLM_API_KEY"] = key
    command = vllm_command(cfg, source, executable)
    print(f"dsrun: starting {' '.join(command)}", file=sys.stderr, flush=True)
    child = subprocess.Popen(command, env=env)
    forward = lambda signum, frame: child.send_signal(signum)  # noqa: E731 - vLLM drains on SIGTERM itself
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = child.wait()
    if code not in (0, -signal.SIGTERM, -signal.SIGINT):
        raise SystemExit(code)
