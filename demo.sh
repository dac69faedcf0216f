#!/usr/bin/env bash
# Offline demo on a fresh machine: sets up .venv, makes a synthetic MSD task, trains 2 epochs, segments its
# test scans and a whole head (the MNI152 template) with the shipped model, and prints the validation metrics of the
# demo model.
# The shipped models/model.pt is never touched: the demo writes under demo/.
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh
DEMO="$PWD/demo"
rm -rf "$DEMO"
cd bundle
../.venv/bin/python -m scripts.data.synthetic --output_dir "$DEMO/Task04_Synthetic" --num_cases 24
../.venv/bin/python -m monai.bundle run training --config_file configs/train.yaml \
    --dataset_dir "$DEMO/Task04_Synthetic" --output_dir "$DEMO/train" --ckpt_dir "$DEMO/models" --epochs 2
../.venv/bin/python -m monai.bundle run evaluating --config_file "['configs/train.yaml','configs/evaluate.yaml']" \
    --dataset_dir "$DEMO/Task04_Synthetic" --ckpt_dir "$DEMO/models" --output_dir "$DEMO/eval"
../.venv/bin/python -m monai.bundle run --config_file configs/inference.yaml \
    --dataset_dir "$DEMO/Task04_Synthetic" --output_dir "$DEMO/masks"
# a whole head: the MNI152 template shipped for registration, segmented left and right, with a QC picture
mkdir -p "$DEMO/heads" && cp atlas/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz "$DEMO/heads/mni152.nii.gz"
../.venv/bin/python -m monai.bundle run --config_file configs/inference.yaml \
    --dataset_dir "$DEMO/heads" --output_dir "$DEMO/head_masks" --qc_png true
echo "Demo done: masks of the shipped model and volumes.csv in $DEMO/masks and $DEMO/head_masks (QC picture in qc/),"
echo "demo metrics in $DEMO/eval/summary.json"
