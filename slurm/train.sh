#!/usr/bin/env bash
# vaejob training as a Slurm batch job: N nodes x G GPUs (NCCL), or CPU-only nodes (gloo).
#
#   sbatch slurm/train.sh --config configs/X.yaml run.dir=runs/X [key=value ...]
#   sbatch --nodes=4 --gpus-per-node=4 --cpus-per-task=32 --time=12:00:00 slurm/train.sh --config ...
#   VAEJOB_PROCS_PER_NODE=2 sbatch --gpus-per-node=0 --cpus-per-task=2 slurm/train.sh --config ...   # CPU node
#
# Edit the #SBATCH defaults below or override them on the sbatch command line. Everything after the
# script name goes to `vaejob.train`. The job's first run resumes as run.resume says (default auto; a
# rollback: run.resume=RUN_DIR/checkpoints/step_XXXXXXXX); a requeued run (SLURM_RESTART_COUNT > 0) gets
# `run.resume=auto` appended, so it continues from the newest checkpoint in run.dir, with the same W&B run.
# Give run.dir explicitly.
#
# One srun task per node runs `accelerate launch`, which starts one training process per GPU
# (VAEJOB_PROCS_PER_NODE overrides the count; with no GPU: CPU mode, gloo, 1 process per node by default).
# A job of one process in all runs `python -m vaejob.train` directly (see below).
#
# Python: the environment sbatch was called from (sbatch exports PATH), or VAEJOB_VENV=/path/to/venv.
# vaejob must be importable there (`pip install -e .`, or submit from the repository root).
# Logs: %x-%j.out / %x-%j.err in the submit directory, appended across requeues.
#
# Preemption and time limits: Slurm sends USR1 to this shell 120 s before the time limit (or run
# `scancel --signal=USR1 --batch JOBID` to checkpoint and requeue by hand). The shell forwards USR1 to every
# training process, which finishes its step, writes a checkpoint and exits 75; the shell then runs
# `scontrol requeue` and the job starts again in place. SIGTERM (scancel, scheduler preemption) is forwarded
# the same way, but the shell never requeues after it: a cancelled job stays cancelled, and a partition with
# PreemptMode=REQUEUE requeues the job itself. Raise @120 if checkpoints take longer.
#
#SBATCH --job-name=vaejob
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
#SBATCH --error=%x-%j.err
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#SBATCH --open-mode=append
set -euo pipefail
: "${SLURM_JOB_ID:?submit this script with sbatch}"

if [ -n "${VAEJOB_VENV:-}" ]; then
  # shellcheck disable=SC1091
  . "$VAEJOB_VENV/bin/activate"
fi
if ! command -v accelerate >/dev/null; then
  echo "[train.sh] accelerate is not on PATH: activate the venv before sbatch or set VAEJOB_VENV" >&2
  exit 2
fi

nnodes=${SLURM_NNODES:-1}
# GPUs per node: --gpus-per-node sets the first two ("a100:4" form possible), --gres=gpu:N the third.
gpus=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-}}
if [ -z "$gpus" ] && [ -n "${SLURM_JOB_GPUS:-}" ]; then gpus=$(tr ',' '\n' <<<"$SLURM_JOB_GPUS" | wc -l); fi
gpus=${gpus:-0}
gpus=${gpus##*:}
if ! [[ "$gpus" =~ ^[0-9]+$ ]]; then
  echo "[train.sh] cannot read the GPU count from '$gpus': set VAEJOB_PROCS_PER_NODE" >&2
  exit 2
fi
if [ "$gpus" -gt 0 ]; then procs=${VAEJOB_PROCS_PER_NODE:-$gpus}; else procs=${VAEJOB_PROCS_PER_NODE:-1}; fi
world=$((nnodes * procs))
master=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
port=$((15000 + SLURM_JOB_ID % 15000)) # same for every node, below the ephemeral range, stable across requeues
cpus=${SLURM_CPUS_PER_TASK:-1}
step_cpus=() # since Slurm 22.05 srun no longer inherits --cpus-per-task: pass it on, or each node gets 1 CPU
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then step_cpus=(--cpus-per-task="$SLURM_CPUS_PER_TASK"); fi

resume=() # the first run keeps the user's run.resume; a requeue continues the run dir's newest checkpoint
if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then resume=(run.resume=auto); fi

if [ "$gpus" -eq 0 ]; then
  export ACCELERATE_USE_CPU=1 # without it, --multi_gpu on a CPU node starts processes that never sync
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((cpus / procs > 0 ? cpus / procs : 1))}
export MASTER_ADDR=$master MASTER_PORT=$port
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1 # a failed NCCL collective aborts the ranks instead of hanging
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1

launch=(--num_machines "$nnodes" --num_processes "$world" --main_process_ip "$master"
  --main_process_port "$port" --rdzv_backend static --dynamo_backend no
  --mixed_precision no) # precision comes from the config (train.mixed_precision); this only silences a warning
if [ "$world" -gt 1 ]; then launch+=(--multi_gpu); fi # with ACCELERATE_USE_CPU=1 this means multi-CPU (gloo)

echo "[train.sh] job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: $nnodes node(s) x $procs process(es)" \
  "($([ "$gpus" -gt 0 ] && echo "$gpus GPUs/node" || echo CPU)), master $master:$port, python $(command -v python)"

signalled=""
# shellcheck disable=SC2317  # called from the traps
forward() {
  if [ "$signalled" != TERM ]; then signalled=$1; fi # a TERM (cancel) always wins: never requeue after it
  echo "[train.sh] SIG$1: asking the training processes to checkpoint and stop"
  # Signals every process of the job's steps on every node (not this shell). The launchers ignore it
  # (trap below), the training ranks handle it.
  scancel --signal="$1" "$SLURM_JOB_ID" || true
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

# machine_rank must be read on each node, hence the single quotes. accelerate's launcher (torch elastic's
# agent) runs with SIGTERM/SIGUSR1 blocked (python -m vaejob.preempt): on SIGTERM it would pass the signal on
# and SIGKILL the ranks 30 s later, checkpoint written or not, whatever TORCHELASTIC_SIGNALS_TO_HANDLE says
# (torch 2.14's launcher overwrites that variable). The ranks unblock and handle them; the launcher exits when they do.
# srun runs with them blocked too: a SIGTERM of its own (scancel --full) would make it "force job termination"
# and SIGKILL the tasks 32 s later; the ranks get Slurm's signals from their step directly.
# srun --wait: once one node's launcher has exited, the others get 60 s, then the step is killed (a node lost
# or a rank hung: the job ends within run.collective_timeout_s + 60 s).
# One process: no launcher. accelerate >= 1.16's single-process launcher turns a rank's exit code (75: requeue
# me, 2: bad input) into exit 1 and a traceback that repeats the rank's stderr (commands/launch.py,
# _run_subprocess); a lone rank needs no rendezvous, so it runs directly, its signals blocked until it handles them.
# shellcheck disable=SC2016
if [ "$world" -eq 1 ]; then
  node_cmd='trap "" USR1 TERM; exec python -m vaejob.preempt python "$@"'
  launch=()
else
  node_cmd='trap "" USR1 TERM; exec python -m vaejob.preempt accelerate launch --machine_rank "$SLURM_NODEID" "$@"'
fi
python -m vaejob.preempt srun --nodes="$nnodes" --ntasks-per-node=1 "${step_cpus[@]}" --wait=60 \
  bash -c "$node_cmd" vaejob "${launch[@]}" -m vaejob.train "$@" "${resume[@]}" &
srun_pid=$!
while :; do
  rc=0
  wait "$srun_pid" || rc=$?
  kill -0 "$srun_pid" 2>/dev/null || break # still running: the wait was cut short by a trapped signal
done

if [ "$rc" -ne 0 ] && [ "$signalled" = USR1 ]; then
  trap - USR1 TERM
  echo "[train.sh] training stopped (launcher exit $rc, ranks exit 75 at a checkpoint): requeueing $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
echo "[train.sh] training exited with $rc"
exit "$rc"
