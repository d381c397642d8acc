#!/usr/bin/env bash
# Set up everything GKP-Bench needs in ./.venv, and Fashion-MNIST where Debian's package exists.
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
quiet_pip() {  # pip, without the local package index's harmless "is ignored" warnings
    .venv/bin/pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
# torch first, pinned to the release this project is tested with (a local file on our machines).
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
    quiet_pip install --quiet --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
fi
quiet_pip install --quiet --disable-pip-version-check -e ".[dev]"

# Offline real data: Debian's Fashion-MNIST package (best effort; the loader can also download).
if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] \
        && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
        || echo "note: apt-get could not install dataset-fashion-mnist; use --download or --data-dir" >&2
fi
echo "setup done: $(.venv/bin/python -c 'import torch; print("torch", torch.__version__)')" >&2
