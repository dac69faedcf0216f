"""QC calibration on the user's own labelled MSD task: the volume range of the training labels and the crops'
confidence threshold, and how the flags fare against Dice. Run from the bundle folder:

    python -m scripts.qc reference --dataset_dir D           # volume range of each label in the training split
    python -m scripts.qc evaluate --dataset_dir D --split development --output_dir OUT   # confidences: threshold
    python -m scripts.qc evaluate --dataset_dir D --split validation --output_dir OUT    # flags against Dice
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
from scripts import BUNDLE_DIR
from scripts.labels import PARTS, mask_name
from scripts.qc.check import CaseRow


def split_cases(dataset_dir: str, split: str) -> list[dict[str, str]]:
    """The MSD task's `training` (the model's 187 cases), `validation` (21) or `development` (47 of the training
    cases) cases, as configs/train.yaml (and configs/dev_split.yaml for `development`) split them."""
    from scripts.recipe import load

    configs = ["configs/train.yaml", *(["configs/dev_split.yaml"] if split == "development" else [])]
    # the task's list as it is: the training run's check of every case is not needed to name them
    parser = load(
        BUNDLE_DIR, configs, {"dataset_dir": dataset_dir, "cases": "$scripts.data.msd.load_training_list(@dataset_dir)"}
    )
    return parser.get_parsed_content("split")["validation" if split == "development" else split]


def reference(dataset_dir: str) -> dict:
    """The range of each label's volume (mm3) over the training split's labels: `qc#volume_range`."""
    ranges = {}
    volumes = {part: [] for part in PARTS}
    for case in split_cases(dataset_dir, "training"):
        label = nib.load(case["label"])
        counts = np.bincount(np.asarray(label.dataobj, dtype=np.uint8).ravel(), minlength=3)
        voxel = abs(float(np.linalg.det(label.affine[:3, :3])))
        for index, part in enumerate(PARTS, start=1):
            volumes[part].append(counts[index] * voxel)
    for part in PARTS:
        ranges[part] = [float(min(volumes[part])), float(max(volumes[part]))]
    return ranges


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


def segment_folder(images: str, masks: str, *overrides: str, check: bool = True) -> None:
    """The README's inference command on `images`, masks to `masks` (overwritten, no report), with `overrides`."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "run",
            "--config_file",
            "configs/inference.yaml",
            "--dataset_dir",
            images,
            "--output_dir",
            masks,
            "--overwrite",
            "true",
            "--report",
            "false",
            *overrides,
        ],
        check=check,
    )


def evaluate(
    dataset_dir: str, split: str = "validation", output_dir: str = "eval/qc", keep_largest: bool | None = None
) -> dict:
    """Runs configs/inference.yaml on a split's images (with `--keep_largest` when given)
    and measures, against the labels in each image's grid: Dice per case, the QC flags (Dice of flagged and
    unflagged cases), volume agreement (Pearson r and mean absolute % error per label and total) and confidences."""
    dataset_dir = os.path.abspath(dataset_dir)
    cases = split_cases(dataset_dir, split)
    images = os.path.join(output_dir, "images")
    os.makedirs(images, exist_ok=True)
    for case in cases:
        link = os.path.join(images, os.path.basename(case["image"]))
        if not os.path.lexists(link):
            os.symlink(case["image"], link)
    masks = os.path.join(output_dir, "masks")
    segment_folder(
        images, masks, *(["--keep_largest", str(keep_largest).lower()] if keep_largest is not None else []), check=False
    )
    with open(os.path.join(masks, "volumes.csv"), newline="", encoding="utf-8") as f:
        rows = {row["case"]: CaseRow.from_columns(row) for row in csv.DictReader(f)}
    results = []
    for case in cases:
        name = os.path.basename(case["image"])
        predicted = np.asarray(nib.load(os.path.join(masks, mask_name(name))).dataobj)
        label = nib.load(case["label"])
        truth = np.asarray(label.dataobj)
        voxel = abs(float(np.linalg.det(label.affine[:3, :3])))
        row = rows[name]
        results.append(
            {
                "case": name,
                "qc": row.qc,
                "reasons": row.qc_reasons,
                "confidence": row.confidence,
                **{f"dice_{part}": dice(predicted == i, truth == i) for i, part in enumerate(PARTS, start=1)},
                **{f"{part}_true": float((truth == i).sum()) * voxel for i, part in enumerate(PARTS, start=1)},
                **{f"{part}_pred": row.volume(part=part) for part in PARTS},
            }
        )
    return {"split": split, "cases": len(results), **_summarise(results)}


def _summarise(results: list[dict]) -> dict:
    summary: dict = {}
    for part in PARTS:
        summary[f"dice_{part}"] = round(float(np.mean([r[f"dice_{part}"] for r in results])), 4)
    for r in results:
        r["total_true"], r["total_pred"] = (
            r["anterior_true"] + r["posterior_true"],
            r["anterior_pred"] + r["posterior_pred"],
        )
    for part in (*PARTS, "total"):
        true = np.array([r[f"{part}_true"] for r in results])
        pred = np.array([r[f"{part}_pred"] for r in results])
        summary[f"volume_{part}"] = {
            "pearson_r": round(float(np.corrcoef(true, pred)[0, 1]), 3),
            "mean_abs_error_pct": round(float(np.mean(np.abs(pred - true) / true) * 100), 2),
        }
    confidences = np.array([r["confidence"] for r in results])
    summary["confidence"] = {
        "min": round(float(confidences.min()), 4),
        "p5": round(float(np.percentile(confidences, 5)), 4),
        "median": round(float(np.median(confidences)), 4),
    }
    for flag in ("review", "pass"):
        group = [r for r in results if r["qc"] == flag]
        mean = (lambda key: round(float(np.mean([r[key] for r in group])), 4)) if group else (lambda key: math.nan)
        summary[f"qc_{flag}"] = {
            "cases": len(group),
            "dice_anterior": mean("dice_anterior"),
            "dice_posterior": mean("dice_posterior"),
        }
    summary["reasons"] = {r["case"]: r["reasons"] for r in results if r["qc"] != "pass"}
    return summary
