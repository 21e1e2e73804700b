#!/usr/bin/env bash
# The README's main command: set up a fresh machine, then run the default
# large-batch ablation -- lamb, lars, adamw, sgd x 3 batch sizes on both
# built-in tasks (digits convnet, charlm transformer) -- and print its table.
# Writes results/ablation/ (or $1): results.md, results.csv, PNG plots, runs/*.json.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
START=$SECONDS
source "$ROOT/scripts/setup.sh"
SETUP=$((SECONDS - START))
cd "$ROOT"
layerwise ablate --out "${1:-results/ablation}"
echo "demo: set-up ${SETUP} s, ablation $((SECONDS - START - SETUP)) s, total $((SECONDS - START)) s"
