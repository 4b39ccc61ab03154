#!/usr/bin/env bash
# One-shot GPU check (see benchmarks/gpu_check.py): correctness and ms/step of the GPU variants of the training
# step for the seed, default and hierarchical presets, the seed preset's full 30,000-step schedule, then
# `vaedraw train` and `vaedraw eval` end to end (seed, default, and a hierarchical run sized to the time left).
# About 9 minutes: a time budget (--budget-s, 550 s, counted from the script's start) skips what does not fit, so it ends within 10.
#
#   OUT=/some/folder benchmarks/gpu_check.sh --data-dir data/mnist      # on the GPU machine
#   OUT=/tmp/gpu_dry OMP_NUM_THREADS=1 benchmarks/gpu_check.sh --data-dir DIR --device cpu \
#       --dry-run --doc /tmp/SPEED_dry.md                                # the whole flow at tiny sizes on a CPU
#
# No virtual environment is needed: it runs `python3` (or $PYTHON); the script finds src/ itself. It rewrites the
# speed:cuda block of docs/SPEED.md (--doc). With OUT set, gpu_check.log, gpu_check.json, SPEED.md (the updated
# doc), the eval JSONs and plans.json are written there as the check goes; run directories go to --work-dir
# (/tmp/gpu_check).
set -uo pipefail
cd "$(dirname "$0")/.."
"${PYTHON:-python3}" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
