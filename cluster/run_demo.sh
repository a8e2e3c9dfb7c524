#!/usr/bin/env bash
# The embedded demo, end to end on this machine (no GPU, no downloads):
#   real photos (scikit-image) → a small AutoencoderKL trained on them → latent WebDataset shards
#   → DeepSpeed ZeRO-2 on 2 CPU ranks → EMA sample grids decoded by that VAE, loss plot and summary.
# Env: DEMO_DATA (data/demo), RUN_DIR (runs/demo), NPROC (2), DS_CONFIG (zero2.json), OVERRIDES ("").
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO_DATA=${DEMO_DATA:-data/demo}
RUN_DIR=${RUN_DIR:-runs/demo}
NPROC=${NPROC:-2}
DS_CONFIG=${DS_CONFIG:-zero2.json}
export PYTHONUNBUFFERED=1 WANDB_MODE=${WANDB_MODE:-offline}

if grep -q '"type": "pca"' "$DEMO_DATA/128/manifest.json" 2>/dev/null; then
  # an older build encoded with the patch-PCA: kept aside, not overwritten (an encode never mixes two encoders)
  if [ -e "$DEMO_DATA.pca" ]; then
    echo "demo: $DEMO_DATA holds patch-PCA latents and $DEMO_DATA.pca exists too: training on the PCA set as it is" \
         "(remove one of them to build the VAE set)"
  else
    echo "demo: $DEMO_DATA holds patch-PCA latents from an older version; moved to $DEMO_DATA.pca, building the VAE set"
    mv "$DEMO_DATA" "$DEMO_DATA.pca"
  fi
fi
if [ ! -f "$DEMO_DATA/128/manifest.json" ] || [ ! -f "$DEMO_DATA/64/manifest.json" ] \
   || [ ! -f "$DEMO_DATA/val/128/manifest.json" ]; then  # an older build without the validation set: adds it
  python -m data_pipeline.demo_data --out "$DEMO_DATA" --resolutions 64 128
fi
# shellcheck disable=SC2086
deepspeed --num_gpus "$NPROC" trainer/main.py --config configs/demo.yaml --ds_config "$DS_CONFIG" \
  data.root="$DEMO_DATA" run.dir="$RUN_DIR" ${OVERRIDES:-}
python -m trainer.report "$RUN_DIR" || echo "demo: report failed (training outputs are intact)"
echo
echo "demo outputs:"
echo "  run directory   $RUN_DIR"
echo "  sample grids    $RUN_DIR/samples/  (rows = classes, final grid: final.png)"
echo "  metrics         $RUN_DIR/metrics.jsonl"
echo "  checkpoints     $RUN_DIR/checkpoints/ (latest: $(cat "$RUN_DIR/checkpoints/latest" 2>/dev/null))"
echo "  status          python -m trainer.status $RUN_DIR"
