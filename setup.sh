#!/usr/bin/env bash
# Creates .venv and installs the project with its test tools. Safe to run again.
# TORCH_SPEC picks the torch build; the default is the CPU wheel these project machines
# carry on disk. On a CUDA machine, run e.g. `TORCH_SPEC=torch ./setup.sh`.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
# constraints.txt: the library versions the committed results were made with.
.venv/bin/python -m pip install -q -e ".[dev]" -c constraints.txt
