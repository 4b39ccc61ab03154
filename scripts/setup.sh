#!/usr/bin/env bash
# Set up .venv with vaedraw (editable) and what it needs; with --test, also the test tools and the
# browser for the web tests. Safe to run again: it installs only what is missing.
#
# torch: an existing torch in .venv is kept (e.g. your CUDA build). Otherwise TORCH_SPEC is installed
# (default "torch==2.13.0"; on a GPU machine e.g. TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu126").
set -euo pipefail
cd "$(dirname "$0")/.."
want_test=0
[ "${1:-}" = "--test" ] && want_test=1

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  # shellcheck disable=SC2086
  "${pip[@]}" ${TORCH_SPEC:-torch==2.13.0}
fi
if [ "$want_test" = 1 ]; then
  # the ONNX export and TensorBoard tests need their optional extras too
  "${pip[@]}" -e ".[test,onnx,tensorboard]"
  # The browser tests drive Debian's Chromium through Playwright (never `playwright install`, which
  # downloads its own browsers). Without root or apt-get they skip and say why.
  if [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      apt-get install -y -q chromium >/dev/null 2>&1 ||
        { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; } ||
        echo "setup: could not install chromium; tests/test_browser.py will skip" >&2
    else
      echo "setup: no /usr/bin/chromium and no root apt-get; tests/test_browser.py will skip (apt-get install chromium)" >&2
    fi
  fi
else
  "${pip[@]}" -e .
fi
.venv/bin/python -c "import torch, vaedraw; print(f'vaedraw {vaedraw.__version__} ready (torch {torch.__version__}, cuda available: {torch.cuda.is_available()})')"
