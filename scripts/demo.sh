#!/usr/bin/env bash
# The main job on the embedded default: set up, shard Fashion-MNIST, train the default conv VAE with
# 2 processes on CPU (DDP over gloo via accelerate launch, W&B offline), then say where everything is.
# Extra arguments are config overrides, e.g. `bash scripts/demo.sh train.max_steps=200`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. "${VAEJOB_VENV:-.venv}/bin/activate"

SHARDS=shards/fashion-mnist
if [ ! -f "$SHARDS/manifest.json" ]; then
  if [ -d /usr/share/datasets/fashion-mnist ]; then
    python -m vaejob.shard --source fashion-mnist --out "$SHARDS" --overwrite
  else  # not Debian: fetch the official files with torchvision (needs internet)
    python -m vaejob.shard --source fashion-mnist --download --out "$SHARDS" --overwrite
  fi
fi

RUN=runs/demo-$(date +%Y%m%d-%H%M%S)
export ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1 WANDB_MODE=offline WANDB_SILENT=true
accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \
  vaejob/train.py --config configs/fashion_mnist.yaml data.shards="$SHARDS" run.dir="$RUN" "$@"

last=$(ls -d "$RUN"/samples/step_* | tail -n 1)
cat <<MSG

Done. What the job wrote:
  samples      $last/samples.png   (and recon.png, samples.npy)
  plots        $RUN/plots/          (loss curves, latent scatter, interpolation)
  metrics      $RUN/metrics.jsonl   (val -ELBO: grep '"val"' $RUN/metrics.jsonl | tail -n 1)
  checkpoints  $RUN/checkpoints/
  W&B (offline) $(ls -d "$RUN"/wandb/offline-run-* | tail -n 1)   ->  wandb sync <that dir>
MSG
