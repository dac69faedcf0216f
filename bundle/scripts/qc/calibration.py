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
    # the task's list as it is: the training run's check of every case is not needed to name them
    overrides = {"dataset_dir": dataset_dir, "cases": "$scripts.data.msd.load_training_list(@dataset_dir)"}
    if fold is not None:
        configs += ["configs/train_native.yaml", "configs/fold.yaml"]
        overrides["fold"] = fold
    parser = load(BUNDLE_DIR, configs, overrides)
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


def lower_thresholds(values, false_alarms: float) -> tuple[float, float]:
    """The review and fail thresholds of a signal that is low on bad cases, set on its `values` over good ones:
    review under the value that flags `false_alarms` of them, rounded down to 0.01; fail under the lowest, rounded
    down to 0.1 (the crops' `qc#crop` and the heads' `qc#head`)."""
    values = np.asarray(values, dtype=float)
    return math.floor(100 * np.quantile(values, false_alarms)) / 100, math.floor(10 * values.min()) / 10


def folds(
    dataset_dir: str, output_dir: str = "eval/folds", weights_dir: str = "models", pair_with: str | None = None
) -> dict:
    """The cross-validation out of fold: each fold's validation cases segmented by that fold's model alone
    (`weights_dir/fold<k>.pt`, `--ensemble false`), so no case is segmented by a model that trained on it; prints and
    returns the Dice of each fold and their mean, and the confidence's rank correlation (Spearman) with each case's
    Dice. Writes `output_dir/out_of_fold.csv`.

    A crop's `qc_score` is the agreement between the ensemble's members (`scripts.engine.inferers.EnsembleInferer`),
    and every fold but one trained on each case, so the folds' own ensemble cannot be scored out of fold. With
    `pair_with` (weights of the same recipe trained on configs/train.yaml's training split: models/model.pt), the
    validation split's cases, which neither it nor the case's fold trained on, are segmented by the ensemble of the
    two: the pair's agreement is the same measure (the mean over pairs of members) that five members give, out of
    fold. Then its rank correlation with the pair's Dice and the crops' thresholds (`qc#crop`) by the rule: review
    under the agreement that flags `FALSE_ALARMS` of the accurate cases (lower label's Dice at least
    `ACCURATE_DICE`; rounded down to 0.01), fail under the lowest agreement of any accurate case rounded down to 0.1
    (as the heads' thresholds are set); and the Dice of the case's fold model, of `pair_with` alone and of the pair,
    what averaging two models adds."""
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
        summary["folds"][fold] = _mean_dice(fold_results)
        results += fold_results
    with open(os.path.join(output_dir, "out_of_fold.csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(results[0]))
        writer.writeheader()
        writer.writerows(results)
    summary["cases"] = len(results)
    summary["mean"] = _mean_dice(results)
    summary["confidence_spearman"] = _spearman(results, "confidence")
    if pair_with:
        summary["pair"] = _pairs(dataset_dir, output_dir, weights_dir, os.path.abspath(pair_with), results)
    return summary


def _mean_dice(results: list[dict]) -> dict[str, float]:
    return {f"dice_{part}": round(float(np.mean([r[f"dice_{part}"] for r in results])), 4) for part in PARTS}


def _lower_dice(result: dict) -> float:
    return min(result[f"dice_{part}"] for part in PARTS)


def _spearman(results: list[dict], signal: str) -> dict[str, float]:
    """Spearman's rank correlation of `signal` with each label's Dice and with the lower label's, over the cases that
    have it."""
    from scipy.stats import spearmanr

    results = [r for r in results if r[signal] is not None and not math.isnan(r[signal])]
    values = [r[signal] for r in results]
    targets = {"lower": [_lower_dice(r) for r in results]}
    targets.update({part: [r[f"dice_{part}"] for r in results] for part in PARTS})
    return {name: round(float(spearmanr(values, target)[0]), 3) for name, target in targets.items()}


def _pairs(dataset_dir: str, output_dir: str, weights_dir: str, other: str, out_of_fold: list[dict]) -> dict:
    """The validation split's cases segmented by `other` alone and by the ensemble of `other` and the case's fold
    model: Dice of each, the pair's agreement against its Dice, and the thresholds it gives."""
    cases = split_cases(dataset_dir, "validation")
    fold_of = {r["case"]: r["fold"] for r in out_of_fold}
    folder = os.path.join(output_dir, "pair")
    alone = os.path.join(folder, "alone")
    segment_folder(
        link_images(cases, os.path.join(folder, "images")), alone, "--ensemble", "false", "--ckpt_file", other
    )
    groups: dict[int, list[dict]] = {}
    for case in cases:
        groups.setdefault(fold_of[os.path.basename(case["image"])], []).append(case)
    paired = []
    for fold, fold_cases in sorted(groups.items()):
        images = link_images(fold_cases, os.path.join(folder, f"fold{fold}", "images"))
        masks = os.path.join(folder, f"fold{fold}", "masks")
        segment_folder(images, masks, "--fold_files", repr([other, os.path.join(weights_dir, f"fold{fold}.pt")]))
        paired += score_masks(fold_cases, masks)
    names = {os.path.basename(case["image"]) for case in cases}
    summary = {
        "cases": len(cases),
        "fold model": _mean_dice([r for r in out_of_fold if r["case"] in names]),
        "other alone": _mean_dice(score_masks(cases, alone)),
        "both": _mean_dice(paired),
        "qc_score_spearman": _spearman(paired, "qc_score"),
    }
    accurate = np.array([r["qc_score"] for r in paired if _lower_dice(r) >= ACCURATE_DICE])
    if not len(accurate):
        return {**summary, "thresholds": f"none: no case reaches Dice {ACCURATE_DICE}"}
    thresholds = dict(zip(("min_agreement", "fail_agreement"), lower_thresholds(accurate, FALSE_ALARMS)))

    def brief(cases: list[dict]) -> list[tuple]:
        return [(r["case"], round(r["qc_score"], 3), round(_lower_dice(r), 3)) for r in cases]

    return {
        **summary,
        "thresholds": thresholds,
        "flagged": brief([r for r in paired if r["qc_score"] < thresholds["min_agreement"]]),
        "inaccurate": brief([r for r in paired if _lower_dice(r) < ACCURATE_DICE]),
    }


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
        summary["qc_score_spearman"] = _spearman(results, "qc_score")
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
