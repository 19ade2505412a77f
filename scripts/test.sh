#!/usr/bin/env bash
# Set up everything (venv, Fashion-MNIST, a two-node SLURM on this machine) and run the whole test suite.
# This is what CI runs (.ci/run). Extra arguments go to pytest, e.g. `bash scripts/test.sh -k shard`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "$(id -u)" = 0 ]; then
  bash slurm/ci-up.sh --nodes 2 || echo "test: SLURM could not be started; the SLURM tests will skip"
else
  echo "test: not root, so no local SLURM; the SLURM tests will skip"
fi
export WANDB_MODE=offline WANDB_SILENT=true
. "${VAEJOB_VENV:-.venv}/bin/activate"
ruff check vaejob launch tests benchmarks
ruff format --check vaejob launch tests benchmarks
exec python -m pytest -q "$@"
