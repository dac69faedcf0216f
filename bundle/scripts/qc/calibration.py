"""QC calibration on the user's own labelled MSD task: the volume range of the training labels, the crops'
agreement thresholds, and how the flags fare against Dice. Run from the bundle folder:

    python -m scripts.qc reference --dataset_dir D           # volume range of each label in the training split
    python -m scripts.qc folds --dataset_dir D --output_dir OUT   # out of fold: qc_score against Dice, thresholds
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


def split_cases(dataset_dir: str, split: str, fold: int | None = None) -> list[dict[str, str]]:
    """The MSD task's `training` (the model's 187 cases), `validation` (21) or `development` (47 of the training
    cases) cases, as configs/train.yaml (and configs/dev_split.yaml for `development`) split them; with `fold`, that
    fold's (configs/fold.yaml)."""
    from scripts.recipe import load

    configs = ["configs/train.yaml", *(["configs/dev_split.yaml"] if split == "development" else [])]
    configs += ["configs/train_native.yaml", "configs/fold.yaml"] if fold is not None else []
    # the task's list as it is: the training run's check of every case is not needed to name them
    overrides = {"dataset_dir": dataset_dir, "cases": "$scripts.data.msd.load_training_list(@dataset_dir)"}
    parser = load(BUNDLE_DIR, configs, {**overrides, **({"fold": fold} if fold is not None else {})})
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


def link_images(cases: list[dict[str, str]], folder: str) -> str:
    """`folder` with a link to each case's image: the folder inference runs on."""
    os.makedirs(folder, exist_ok=True)
    for case in cases:
        link = os.path.join(folder, os.path.basename(case["image"]))
        if not os.path.lexists(link):
            os.symlink(case["image"], link)
    return folder


def score_masks(cases: list[dict[str, str]], masks: str) -> list[dict]:
    """Each case's Dice per label against its label (its own grid), true and predicted volumes, and the QC of the
    run's volumes table in `masks`."""
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
) -> dict:
    """Runs configs/inference.yaml on a split's images (with `--keep_largest` when given; the single model with
    `ensemble` False) and measures, against the labels in each image's grid: Dice per case, the QC flags (Dice of
    flagged and unflagged cases), volume agreement (Pearson r and mean absolute % error per label and total),
    confidences and qc_score's rank correlation with Dice."""
    dataset_dir = os.path.abspath(dataset_dir)
    cases = split_cases(dataset_dir, split)
    masks = os.path.join(output_dir, "masks")
    overrides = ["--ensemble", str(ensemble).lower()]
    overrides += ["--keep_largest", str(keep_largest).lower()] if keep_largest is not None else []
    segment_folder(link_images(cases, os.path.join(output_dir, "images")), masks, *overrides, check=False)
    results = score_masks(cases, masks)
    return {"split": split, "cases": len(results), **_summarise(results)}


ACCURATE_DICE = 0.8  # a crop whose lower label's Dice reaches this needs no second look
FALSE_ALARMS = 0.05  # the share of accurate crops the review threshold may flag


def folds(
    dataset_dir: str, output_dir: str = "eval/folds", weights_dir: str = "models", pair_with: str | None = None
) -> dict:
    """The cross-validation out of fold: each fold's validation cases segmented by that fold's model alone
    (`weights_dir/fold<k>.pt`, `--ensemble false`), so no case is segmented by a model that trained on it. Prints
    and returns the Dice of the folds and their mean, the rank correlation (Spearman) of `qc_score` and of the
    confidence with each case's Dice, and the crops' agreement thresholds (`qc#crop`) by the rule: review under the
    agreement that flags `FALSE_ALARMS` of the accurate cases (lower label's Dice at least `ACCURATE_DICE`), fail under
    the lowest agreement of any accurate case, each rounded down to 0.01.

    Every fold but one trained on each case, so the ensemble itself has no out-of-fold score. With `pair_with` (the
    weights trained on configs/train.yaml's training split, e.g. models/model.pt), the validation split's cases,
    which neither it nor the case's fold trained on, are also segmented by it alone and by the ensemble of the two:
    what averaging two models adds, out of fold."""
    from scipy.stats import spearmanr
    from scripts.recipe import load

    dataset_dir, weights_dir = os.path.abspath(dataset_dir), os.path.abspath(weights_dir)
    num_folds = load(BUNDLE_DIR, ["configs/fold.yaml"]).get_parsed_content("num_folds")
    summary: dict = {"folds": {}}
    results = []
    for fold in range(num_folds):
        cases = split_cases(dataset_dir, "validation", fold)
        images = link_images(cases, os.path.join(output_dir, f"fold{fold}", "images"))
        masks = os.path.join(output_dir, f"fold{fold}", "masks")
        weights = os.path.join(weights_dir, f"fold{fold}.pt")
        segment_folder(images, masks, "--ensemble", "false", "--ckpt_file", weights)
        fold_results = [{"fold": fold, **r} for r in score_masks(cases, masks)]
        summary["folds"][fold] = {
            f"dice_{p}": round(float(np.mean([r[f"dice_{p}"] for r in fold_results])), 4) for p in PARTS
        }
        results += fold_results
    if pair_with:
        summary["pair"] = _pair_out_of_fold(dataset_dir, output_dir, weights_dir, os.path.abspath(pair_with), results)
    for r in results:
        r["dice_lower"] = min(r[f"dice_{part}"] for part in PARTS)
    with open(os.path.join(output_dir, "out_of_fold.csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(results[0]))
        writer.writeheader()
        writer.writerows(results)
    summary["cases"] = len(results)
    summary["mean"] = {f"dice_{part}": round(float(np.mean([r[f"dice_{part}"] for r in results])), 4) for part in PARTS}
    summary["spearman"] = {
        signal: {
            target: round(float(spearmanr([r[signal] for r in results], [r[target] for r in results])[0]), 3)
            for target in ("dice_lower", *(f"dice_{part}" for part in PARTS))
        }
        for signal in ("qc_score", "confidence")
    }
    accurate = np.array([r["qc_score"] for r in results if r["dice_lower"] >= ACCURATE_DICE])
    if not len(accurate):
        summary["thresholds"] = f"none: no case reaches Dice {ACCURATE_DICE}"
        return summary
    summary["thresholds"] = {
        "min_agreement": math.floor(100 * float(np.quantile(accurate, FALSE_ALARMS))) / 100,
        "fail_agreement": math.floor(100 * float(accurate.min())) / 100,
    }
    flagged = [r for r in results if r["qc_score"] < summary["thresholds"]["min_agreement"]]
    summary["flagged"] = {
        "cases": len(flagged),
        "inaccurate_cases": sum(r["dice_lower"] < ACCURATE_DICE for r in results),
        "inaccurate_flagged": sum(r["dice_lower"] < ACCURATE_DICE for r in flagged),
        "dice_lower_flagged": round(float(np.mean([r["dice_lower"] for r in flagged])), 4) if flagged else math.nan,
        "dice_lower_passed": round(float(np.mean([r["dice_lower"] for r in results if r not in flagged])), 4),
    }
    return summary


def _pair_out_of_fold(dataset_dir: str, output_dir: str, weights_dir: str, other: str, out_of_fold: list[dict]) -> dict:
    """Dice on the validation split's cases of: their fold's model (from `out_of_fold`), `other` alone, and the
    ensemble of the two."""
    cases = split_cases(dataset_dir, "validation")
    names = {os.path.basename(case["image"]) for case in cases}
    fold_of = {r["case"]: r["fold"] for r in out_of_fold}
    folder = os.path.join(output_dir, "pair")
    segment_folder(
        link_images(cases, os.path.join(folder, "images")),
        os.path.join(folder, "alone"),
        "--ensemble",
        "false",
        "--ckpt_file",
        other,
    )
    groups: dict[int, list[dict]] = {}
    for case in cases:
        groups.setdefault(fold_of[os.path.basename(case["image"])], []).append(case)
    paired = []
    for fold, fold_cases in sorted(groups.items()):
        images = link_images(fold_cases, os.path.join(folder, f"fold{fold}", "images"))
        masks = os.path.join(folder, f"fold{fold}", "masks")
        files = repr([other, os.path.join(weights_dir, f"fold{fold}.pt")])
        segment_folder(images, masks, "--fold_files", files)
        paired += score_masks(fold_cases, masks)
    rows = {
        "fold model": [r for r in out_of_fold if r["case"] in names],
        "other alone": score_masks(cases, os.path.join(folder, "alone")),
        "both": paired,
    }
    return {
        name: {f"dice_{p}": round(float(np.mean([r[f"dice_{p}"] for r in group])), 4) for p in PARTS}
        for name, group in rows.items()
    } | {"cases": len(cases)}


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
    scores = [r["qc_score"] for r in results]
    if None not in scores and len(results) > 2:
        from scipy.stats import spearmanr

        lower = [min(r[f"dice_{part}"] for part in PARTS) for r in results]
        summary["qc_score_spearman_lower_dice"] = round(float(spearmanr(scores, lower)[0]), 3)
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
