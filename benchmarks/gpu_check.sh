#!/usr/bin/env bash
# One-shot GPU check (see benchmarks/gpu_check.py): correctness and ms/step of every GPU variant for the
# seed and default presets, then the seed preset's full 30,000-step schedule. About 6 minutes.
#
#   OUT=/some/folder benchmarks/gpu_check.sh --data-dir data/mnist      # on the GPU machine
#   benchmarks/gpu_check.sh --data-dir /work/shared/data/mnist --device cpu --dry-run   # logic check
#
# No virtual environment is needed: it runs `python3` (or $PYTHON); the script finds src/ itself. With OUT
# set, gpu_check.log, gpu_check.json and the end-to-end run directory are written there.
set -uo pipefail
cd "$(dirname "$0")/.."
"${PYTHON:-python3}" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
