"""QC calibration on the user's own labelled MSD task: the volume range of the training labels, the crops'
flags against Dice (the crops' agreement thresholds: scripts.qc.folds). Run from the bundle folder:

    python -m scripts.qc reference --dataset_dir D           # volume ranges and slice sharpness of the training split
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
import torch
from scripts import BUNDLE_DIR
from scripts.data.acquisition import neighbour_differences, simulate_voxel_size, slice_sharpness
from scripts.labels import PARTS, mask_name
from scripts.qc.check import CaseRow


def split_cases(dataset_dir: str, split: str, fold: int | None = None) -> list[dict[str, str]]:
    """The MSD task's `training` (the model's 187 cases), `validation` (21) or `development` (47 of the training
    cases) cases, as configs/train.yaml (and configs/dev_split.yaml for `development`) split them; with `fold`, that
    fold's (configs/fold.yaml)."""
    from scripts.recipe import load

    configs = ["configs/train.yaml", *(["configs/dev_split.yaml"] if split == "development" else [])]
    # the task's list as it is: the training run's check of every case is not needed to name them
    overrides = {"dataset_dir": dataset_dir, "cases": "$scripts.data.msd.load_training_list(@dataset_dir)"}
    if fold is not None:
        configs += ["configs/train_native.yaml", "configs/fold.yaml"]
        overrides["fold"] = fold
    parser = load(BUNDLE_DIR, configs, overrides)
    return parser.get_parsed_content("split")["validation" if split == "development" else split]


def reference(dataset_dir: str) -> dict:
    """From the training split: the range of each label's volume (mm3) over its labels (`qc#volume_range`), the
    median of each axis's `neighbour_differences` over its images (`slice_sharpness_reference`) and the crops'
    `qc#crop#min_slice_sharpness`: the lowest `slice_sharpness` of the images with 1.5 mm slices simulated across
    each axis in turn (as training simulates them), rounded down to 0.05, so that slices thicker than about 2 mm
    are flagged and 1.5 mm ones are not."""
    volumes = {part: [] for part in PARTS}
    images = []
    for case in split_cases(dataset_dir, "training"):
        label = nib.load(case["label"])
        counts = np.bincount(np.asarray(label.dataobj, dtype=np.uint8).ravel(), minlength=3)
        voxel = abs(float(np.linalg.det(label.affine[:3, :3])))
        for index, part in enumerate(PARTS, start=1):
            volumes[part].append(counts[index] * voxel)
        images.append(torch.from_numpy(np.asarray(nib.load(case["image"]).dataobj, dtype=np.float32))[None])
    sharpness_reference = np.median([neighbour_differences(image[0]) for image in images], axis=0)
    thinner = [
        slice_sharpness(
            simulate_voxel_size(image, [1.5 if a == axis else 1.0 for a in range(3)])[0], sharpness_reference
        )[0]
        for image in images
        for axis in range(3)
    ]
    return {
        "volume_range": {part: [float(min(volumes[part])), float(max(volumes[part]))] for part in PARTS},
        "slice_sharpness_reference": [round(float(r), 4) for r in sharpness_reference],
        "min_slice_sharpness": math.floor(20 * min(thinner)) / 20,
    }


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


def as_flags(values: dict) -> list[str]:
    """Command-line flags of the inference command, `--name value`, for the `values` of python-fire's keywords."""
    return [word for name, value in values.items() for word in (f"--{name}", str(value))]


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


def link_images(cases: list[dict[str, str]], folder: str) -> str:
    """`folder` with a link to each case's image: the folder inference runs on."""
    os.makedirs(folder, exist_ok=True)
    for case in cases:
        link = os.path.join(folder, os.path.basename(case["image"]))
        if not os.path.lexists(link):
            os.symlink(case["image"], link)
    return folder


def score_masks(cases: list[dict[str, str]], masks: str, folder: str = "") -> list[dict]:
    """Each case's Dice per label against its label (its own grid), true and predicted volumes, and the QC of the
    run's volumes table in `masks`; with `folder`, of the case's copy in that sub-folder of a recursive run."""
    with open(os.path.join(masks, "volumes.csv"), newline="", encoding="utf-8") as f:
        rows = {row["case"]: CaseRow.from_columns(row) for row in csv.DictReader(f)}
    results = []
    for case in cases:
        name = os.path.join(folder, os.path.basename(case["image"]))
        predicted = np.asarray(nib.load(os.path.join(masks, folder, mask_name(name))).dataobj)
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
                "qc_score": row.qc_score,
                **{f"dice_{part}": dice(predicted == i, truth == i) for i, part in enumerate(PARTS, start=1)},
                **{f"{part}_true": float((truth == i).sum()) * voxel for i, part in enumerate(PARTS, start=1)},
                **{f"{part}_pred": row.volume(part=part) for part in PARTS},
            }
        )
    return results


def evaluate(
    dataset_dir: str,
    split: str = "validation",
    output_dir: str = "eval/qc",
    keep_largest: bool | None = None,
    ensemble: bool = True,
    **inference_flags,
) -> dict:
    """Runs configs/inference.yaml on a split's images (with `--keep_largest` when given; the single model with
    `ensemble` False; any other flag, e.g. `--tta_flip_axes "[]"`, passed on) and measures, against the labels in
    each image's grid: Dice per case, the QC flags (Dice of flagged and unflagged cases), volume agreement (Pearson r
    and mean absolute % error per label and total), confidences and qc_score's rank correlation with Dice."""
    dataset_dir = os.path.abspath(dataset_dir)
    cases = split_cases(dataset_dir, split)
    masks = os.path.join(output_dir, "masks")
    overrides = ["--ensemble", str(ensemble).lower(), *as_flags(inference_flags)]
    overrides += ["--keep_largest", str(keep_largest).lower()] if keep_largest is not None else []
    segment_folder(link_images(cases, os.path.join(output_dir, "images")), masks, *overrides, check=False)
    results = score_masks(cases, masks)
    return {"split": split, "cases": len(results), **_summarise(results)}


def lower_thresholds(values, false_alarms: float) -> tuple[float, float]:
    """The review and fail thresholds of a signal that is low on bad cases, set on its `values` over good ones:
    review under the value that flags `false_alarms` of them, rounded down to 0.01; fail under the lowest, rounded
    down to 0.1 (the crops' `qc#crop` and the heads' `qc#head`)."""
    values = np.asarray(values, dtype=float)
    return math.floor(100 * np.quantile(values, false_alarms)) / 100, math.floor(10 * values.min()) / 10


def mean_dice(results: list[dict]) -> dict[str, float]:
    return {f"dice_{part}": round(float(np.mean([r[f"dice_{part}"] for r in results])), 4) for part in PARTS}


def lower_dice(result: dict) -> float:
    return min(result[f"dice_{part}"] for part in PARTS)


def spearman(results: list[dict], signal: str) -> dict[str, float]:
    """Spearman's rank correlation of `signal` with each label's Dice and with the lower label's, over the cases that
    have it."""
    from scipy.stats import spearmanr

    results = [r for r in results if r[signal] is not None and not math.isnan(r[signal])]
    values = [r[signal] for r in results]
    targets = {"lower": [lower_dice(r) for r in results]}
    targets.update({part: [r[f"dice_{part}"] for r in results] for part in PARTS})
    return {name: round(float(spearmanr(values, target)[0]), 3) for name, target in targets.items()}


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
    if any(r["qc_score"] is not None for r in results):
        summary["qc_score_spearman"] = spearman(results, "qc_score")
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
