#!/usr/bin/env bash
# The GPU throughput table of docs/throughput.md ("GPU path") in one command; run from the bundle folder with the
# requirements installed:
#   bash scripts/engine/gpu_benchmark.sh OUT_DIR [DATASET_DIR]
# For both recipes, train and predict at batch 32 with AMP and num_workers 0 and 8: img/s of the pipeline and of the
# model alone (also with the weights in the plain memory layout instead of channels-last), and their ratio
# (scripts/engine/benchmark.py; one JSON per cell in OUT_DIR). With DATASET_DIR (an MSD task folder) the cells run on its
# cases, train cells also time one epoch with and without validation, and the native recipe's full training
# (validation every epoch) is timed and then evaluated. The environment can shorten it: STEPS, WARMUP, EPOCHS
# (0: no full training), BATCH, WORKERS, RECIPES.
set -euo pipefail
OUT=${1:?usage: bash scripts/engine/gpu_benchmark.sh OUT_DIR [DATASET_DIR]}
DATA=${2:-}
STEPS=${STEPS:-30} WARMUP=${WARMUP:-10} EPOCHS=${EPOCHS:-90} BATCH=${BATCH:-32} WORKERS=${WORKERS:-"0 8"}
RECIPES=${RECIPES:-"tf native"}
mkdir -p "$OUT"
python -c "import monai, torch; print('torch', torch.__version__, '| monai', monai.__version__, '|',
  torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" | tee "$OUT/versions.txt"
declare -A CONFIGS=([tf]="['configs/train.yaml']" [native]="['configs/train.yaml','configs/train_native.yaml']")
for recipe in $RECIPES; do
  for mode in train predict; do
    for workers in $WORKERS; do
      python -m scripts.engine.benchmark --mode "$mode" --batch_size "$BATCH" --amp True --warmup_steps "$WARMUP" \
        --steps "$STEPS" --num_workers "$workers" --config_file "${CONFIGS[$recipe]}" ${DATA:+--dataset_dir "$DATA"} \
        --output_json "$OUT/${recipe}_${mode}_workers${workers}.json" > "$OUT/${recipe}_${mode}_workers${workers}.log" 2>&1
    done
  done
done
if [ -n "$DATA" ] && [ "$EPOCHS" -gt 0 ]; then
  start=$(date +%s.%N)
  python -m monai.bundle run training --config_file "${CONFIGS[native]}" --dataset_dir "$DATA" --epochs "$EPOCHS" \
    --output_dir "$OUT/native_training" --ckpt_dir "$OUT/native_models" > "$OUT/native_training.log" 2>&1
  end=$(date +%s.%N)
  python -c "import json; print(json.dumps({'epochs': $EPOCHS, 'wall_s': $end - $start}))" > "$OUT/native_training.json"
  python -m monai.bundle run evaluating --config_file "['configs/train.yaml','configs/train_native.yaml','configs/evaluate.yaml']" \
    --dataset_dir "$DATA" --ckpt_dir "$OUT/native_models" --output_dir "$OUT/native_eval" > "$OUT/native_eval.log" 2>&1
fi
python - "$OUT" <<'EOF'
import glob, json, os, sys

out = sys.argv[1]
print("| recipe | mode | num_workers | pipeline img/s | model alone img/s | efficiency | model alone, plain layout img/s "
      "| one epoch s (with validation) |")
print("|---|---|---|---|---|---|---|---|")
for path in sorted(glob.glob(os.path.join(out, "*_workers*.json"))):
    r = json.load(open(path))
    recipe = os.path.basename(path).split("_")[0]
    epoch = f"{r['epoch_s']:.1f} ({r['epoch_with_validation_s']:.1f})" if "epoch_s" in r else ""
    print(f"| {recipe} | {r['mode']} | {r['num_workers']} | {r['pipeline_img_per_s']:.0f} | "
          f"{r['model_only_img_per_s']:.0f} | {r['efficiency']:.2f} | {r['model_only_contiguous_img_per_s']:.0f} | {epoch} |")
print(f"device: {r['device']}, {r['precision']}, batch {r['batch_size']}, "
      f"{'channels-last' if r['channels_last'] else 'plain'} weights in the pipeline")
training = os.path.join(out, "native_training.json")
if os.path.isfile(training):
    t, s = json.load(open(training)), json.load(open(os.path.join(out, "native_eval", "summary.json")))
    print(f"native recipe, {t['epochs']} epochs with validation: {t['wall_s'] / 60:.1f} min; validation Dice "
          f"{s['dice_anterior']['mean']:.4f} / {s['dice_posterior']['mean']:.4f}")
EOF
