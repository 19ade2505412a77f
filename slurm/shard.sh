#!/usr/bin/env bash
# Shard a large source as a Slurm job array (run this on the login node, not with sbatch):
#
#   bash slurm/shard.sh [SBATCH_OPTION=VALUE ...] NUM_TASKS --source SPEC --out DIR [vaejob.shard flags]
#   bash slurm/shard.sh --partition=cpu --time=2:00:00 16 --source fashion-mnist --out /data/shards/fmnist
#
# Submits NUM_TASKS array tasks, each running `python -m vaejob.shard ... --task-index I --num-tasks T`
# (it writes the shards whose ordinal mod T == I, plus DIR/parts/part-I.json), and one job that runs
# `python -m vaejob.shard --finalize --out DIR` after every task succeeded (afterok): it writes
# manifest.json, the same one a single `python -m vaejob.shard` run writes. If a task fails, the finalize
# job is cancelled; rerun with the same arguments (tasks rewrite only their own shards).
# Prints the two job ids. DIR must be on a file system every node sees; a relative DIR is relative to the
# current directory. Each task uses --workers = its --cpus-per-task unless you pass --workers.
# Sbatch options go before NUM_TASKS in --opt=value form; SBATCH_* environment variables work too.
# Python: the environment you run this from (sbatch exports PATH), or VAEJOB_VENV=/path/to/venv.
#
#SBATCH --job-name=vaejob-shard
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --mem=16G
#SBATCH --time=04:00:00
#SBATCH --output=%x-%A_%a.out
set -euo pipefail

usage() {
  echo "usage: bash slurm/shard.sh [SBATCH_OPTION=VALUE ...] NUM_TASKS --source SPEC --out DIR [vaejob.shard flags]" >&2
  exit 2
}

case "${VAEJOB_SHARD_ROLE:-submit}" in
task | finalize)
  if [ -n "${VAEJOB_VENV:-}" ]; then
    # shellcheck disable=SC1091
    . "$VAEJOB_VENV/bin/activate"
  fi
  echo "[shard.sh] job ${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID:-?}}${SLURM_ARRAY_TASK_ID:+_$SLURM_ARRAY_TASK_ID} ($VAEJOB_SHARD_ROLE) on $(hostname), python $(command -v python)"
  if [ "$VAEJOB_SHARD_ROLE" = finalize ]; then
    exec python -m vaejob.shard --finalize --out "$VAEJOB_SHARD_OUT"
  fi
  exec python -m vaejob.shard --workers "${SLURM_CPUS_PER_TASK:-1}" "$@" \
    --task-index "$SLURM_ARRAY_TASK_ID" --num-tasks "$SLURM_ARRAY_TASK_COUNT"
  ;;
submit) ;;
*) usage ;;
esac

sbatch_opts=()
while [ $# -gt 0 ] && [[ "$1" == -* ]]; do
  sbatch_opts+=("$1")
  shift
done
if [ $# -eq 0 ] || ! [[ "$1" =~ ^[1-9][0-9]*$ ]]; then usage; fi
n=$1
shift

out=""
prev=""
for a in "$@"; do
  case "$a" in --out=*) out=${a#--out=} ;; esac
  if [ "$prev" = --out ]; then out=$a; fi
  prev=$a
done
[ -n "$out" ] || { echo "[shard.sh] --out DIR is required (the tasks and the finalize job share it)" >&2; exit 2; }
case "$out" in /* | *://*) ;; *) out="$PWD/$out" ;; esac

self=$(readlink -f "${BASH_SOURCE[0]}")
array=$(sbatch --parsable "${sbatch_opts[@]}" --array="0-$((n - 1))" \
  --export=ALL,VAEJOB_SHARD_ROLE=task "$self" "$@")
array=${array%%;*} # --parsable prints "id[;cluster]"
final=$(sbatch --parsable "${sbatch_opts[@]}" --job-name=vaejob-shard-finalize --cpus-per-task=1 \
  --output=%x-%j.out --dependency="afterok:$array" --kill-on-invalid-dep=yes \
  --export="ALL,VAEJOB_SHARD_ROLE=finalize,VAEJOB_SHARD_OUT=$out" "$self")
final=${final%%;*}
echo "[shard.sh] array job $array ($n tasks) -> $out; finalize job $final (after all tasks succeed)"
