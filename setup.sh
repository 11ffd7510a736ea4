#!/usr/bin/env bash
# Sets up dsrun in ./.venv (idempotent). `./setup.sh --dev` adds the test tools: pytest, and Prometheus
# (Debian's package, for the monitoring integration test) where apt-get can install it.
set -euo pipefail
cd "$(dirname "$0")"
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build where a CPU one is wanted
.venv/bin/python -c "import torch" 2>/dev/null || "${pip[@]}" "torch==2.13.0"
if [ "${1:-}" = "--dev" ]; then
  "${pip[@]}" -e ".[dev]"
  if ! command -v prometheus >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null) \
      || echo "setup.sh: could not install prometheus; its integration test will be skipped" >&2
  fi
else
  "${pip[@]}" -e .
fi
