#!/usr/bin/env bash
# The README's test command: set up a fresh machine and run the whole test suite.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
# The installed (non-editable) package must work from another directory.
(cd "$(mktemp -d)" && layerwise presets > /dev/null \
   && python -c "from layerwise.resources import language_reference; language_reference()")
cd "$ROOT"
python -m pytest -q "$@"
