#!/usr/bin/env bash
# The README's main command: set up a fresh machine, then run the default
# large-batch ablation -- lamb, lars, adamw, sgd x 3 batch sizes x 3 seeds on
# the three built-in tasks (digits convnet, charlm transformer LM, mlm
# BERT-style masked LM) -- print its tables (mean +- sd, steps to target), and
# measure the gradient noise scale of charlm.
# Writes results/ablation/ (or $1): results.md, results.csv, summary.csv, PNG
# plots, runs/*.json; and results/noise_scale/ (or $2).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
START=$SECONDS
source "$ROOT/scripts/setup.sh"
SETUP=$((SECONDS - START))
cd "$ROOT"
layerwise ablate --seeds 3 --out "${1:-results/ablation}"
ABLATE=$((SECONDS - START - SETUP))
layerwise noise-scale --task charlm --batch-size 256 --micro-batch-size 32 --steps 100 --every 5 \
  --out "${2:-results/noise_scale}"
echo "demo: set-up ${SETUP} s, ablation ${ABLATE} s, noise scale $((SECONDS - START - SETUP - ABLATE)) s, total $((SECONDS - START)) s"
