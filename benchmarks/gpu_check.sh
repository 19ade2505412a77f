#!/usr/bin/env bash
# benchmarks/gpu_check.py on a GPU machine that has Python with PyTorch, accelerate and pytest but no network:
#
#   bash benchmarks/gpu_check.sh --prepare      # here, with network: wheels + Fashion-MNIST into .gpu_check/ (~31 MB)
#   bash benchmarks/gpu_check.sh [ARGS...]      # there, from a copy of the repo that includes .gpu_check/
#
# The second form installs the few pure-Python packages that machine may lack (braceexpand, webdataset) into
# /tmp/vaejob-site, runs the repository from its checkout (PYTHONPATH, no pip install of vaejob), gives
# gpu_check.py the Fashion-MNIST files, and tees everything to $OUT/gpu_check.log (or runs/) beside the JSON.
# ARGS go to gpu_check.py, e.g. --quick or --sections throughput,ttq --budget-s 240.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CARRY=.gpu_check

if [ "${1:-}" = "--prepare" ]; then
  mkdir -p "$CARRY/wheels" "$CARRY/fashion-mnist"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    -d "$CARRY/wheels" braceexpand==0.1.7 webdataset==1.0.2
  src=${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
  cp "$src"/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz "$CARRY/fashion-mnist/"
  du -sh "$CARRY"
  exit 0
fi

out=${OUT:-runs}
mkdir -p "$out"
if compgen -G "$CARRY/wheels/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/vaejob-site \
    "$CARRY"/wheels/*.whl
  export PYTHONPATH=/tmp/vaejob-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 WANDB_MODE=disabled WANDB_SILENT=true
fmnist=()
if [ -d "$CARRY/fashion-mnist" ]; then fmnist=(--fashion-mnist "$CARRY/fashion-mnist"); fi
set -o pipefail
"$PY" benchmarks/gpu_check.py "${fmnist[@]}" "$@" 2>&1 | tee "$out/gpu_check.log"
