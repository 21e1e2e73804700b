#!/usr/bin/env bash
# The README's main command: set up a fresh machine and run the main job.
# For now: check every shipped preset and list them.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
layerwise check presets/*.lw
layerwise presets
