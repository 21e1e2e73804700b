#!/usr/bin/env bash
# Create .venv (if missing) and install torch 2.13.0 (CPU build) first, then
# layerwise with its test, tasks and integration extras. Sourced by scripts/test.sh and scripts/demo.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LAYERWISE_VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# torch first and pinned: a range that admits a newer torch would pull a CUDA build.
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$ROOT[test,tasks,hf,lightning]"
# timm without its dependencies: its torchvision would not import beside this
# torch build (and could pull another torch). The migration tests load
# timm/optim's files on their own (tests/timm_optim.py), never `import timm`.
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps "timm==1.0.31"
export PATH="$VENV/bin:$PATH"
