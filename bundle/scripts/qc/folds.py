"""The native recipe's cross-validation out of fold, and the crops' qc_score calibrated on pairs of models that never
trained on a case (`qc#crop`). Run from the bundle folder:

    python -m scripts.qc folds --dataset_dir D --output_dir OUT --pair_with models/model.pt
"""

from __future__ import annotations

import csv
import os

import numpy as np
from scripts import BUNDLE_DIR
from scripts.qc.calibration import (
    as_flags,
    link_images,
    lower_dice,
    lower_thresholds,
    mean_dice,
    score_masks,
    segment_folder,
    spearman,
    split_cases,
)
from scripts.qc.robustness import chosen_degradations, write_degraded
from scripts.recipe import load

ACCURATE_DICE = 0.8  # a crop whose lower label's Dice reaches this needs no second look
FALSE_ALARMS = 0.05  # the share of accurate crops the review threshold may flag


def folds(
    dataset_dir: str,
    output_dir: str = "eval/folds",
    weights_dir: str = "models/folds",
    pair_with: str | None = None,
    pair_fold: int | None = None,
    degradations: str | None = None,
    **inference_flags,
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
    what averaging two models adds. With `pair_fold` k, `pair_with` trained on fold k's training cases instead
    (configs/fold.yaml with another `--seed`), and the pairs are fold k's validation cases. With `degradations`
    (comma-separated names of `scripts.qc.robustness.DEGRADATIONS`) the pairs also segment degraded copies of their
    cases: the agreement's rank correlation with Dice where the acquisition varies and Dice with it. Any other flag
    (`--tta_flip_axes "[]"`) goes to every inference run."""
    dataset_dir, weights_dir = os.path.abspath(dataset_dir), os.path.abspath(weights_dir)
    flags = as_flags(inference_flags)
    num_folds = load(BUNDLE_DIR, ["configs/fold.yaml"]).get_parsed_content("num_folds")
    summary: dict = {"folds": {}}
    results = []
    for fold in range(num_folds):
        cases = split_cases(dataset_dir, "validation", fold)
        images = link_images(cases, os.path.join(output_dir, f"fold{fold}", "images"))
        masks = os.path.join(output_dir, f"fold{fold}", "masks")
        weights = os.path.join(weights_dir, f"fold{fold}.pt")
        segment_folder(images, masks, "--ensemble", "false", "--ckpt_file", weights, *flags)
        fold_results = [{"fold": fold, **r} for r in score_masks(cases, masks)]
        summary["folds"][fold] = mean_dice(fold_results)
        results += fold_results
    with open(os.path.join(output_dir, "out_of_fold.csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(results[0]))
        writer.writeheader()
        writer.writerows(results)
    summary["cases"] = len(results)
    summary["mean"] = mean_dice(results)
    summary["confidence_spearman"] = spearman(results, "confidence")
    if pair_with:
        other = os.path.abspath(pair_with)
        chosen = chosen_degradations(degradations) if degradations else []
        cases = split_cases(dataset_dir, "validation", pair_fold)
        summary["pair"] = _pairs(cases, output_dir, weights_dir, other, results, chosen, flags)
    return summary


def _by_fold(cases: list[dict[str, str]], out_of_fold: list[dict]) -> dict[int, list[dict]]:
    """`cases` grouped by the fold that validated on them."""
    fold_of = {r["case"]: r["fold"] for r in out_of_fold}
    groups: dict[int, list[dict]] = {}
    for case in cases:
        groups.setdefault(fold_of[os.path.basename(case["image"])], []).append(case)
    return dict(sorted(groups.items()))


def _pair(other: str, weights_dir: str, fold: int) -> str:
    """`--fold_files` of the pair: `other` and the fold's model."""
    return repr([other, os.path.join(weights_dir, f"fold{fold}.pt")])


def _pairs(
    cases: list[dict[str, str]],
    output_dir: str,
    weights_dir: str,
    other: str,
    out_of_fold: list[dict],
    degradations: list[str],
    flags: list[str],
) -> dict:
    """`cases`, which `other` never trained on, segmented by `other` alone and by the ensemble of `other` and the
    case's fold model: Dice of each, the pair's agreement against its Dice, and the thresholds it gives; with
    `degradations`, the pair also on copies of the cases degraded by each (in the same run)."""
    folder = os.path.join(output_dir, "pair")
    alone = os.path.join(folder, "alone")
    segment_folder(
        link_images(cases, os.path.join(folder, "images")), alone, "--ensemble", "false", "--ckpt_file", other, *flags
    )
    paired, degraded = [], []
    for fold, fold_cases in _by_fold(cases, out_of_fold).items():
        images = link_images(fold_cases, os.path.join(folder, f"fold{fold}", "images"))
        write_degraded(fold_cases, degradations, images)  # in a folder per degradation
        masks = os.path.join(folder, f"fold{fold}", "masks")
        pair = _pair(other, weights_dir, fold)
        segment_folder(images, masks, "--recursive", "true", "--fold_files", pair, *flags)
        paired += score_masks(fold_cases, masks)
        degraded += [{"degradation": d, **r} for d in degradations for r in score_masks(fold_cases, masks, d)]
    names = {os.path.basename(case["image"]) for case in cases}
    summary = {
        "cases": len(cases),
        "fold model": mean_dice([r for r in out_of_fold if r["case"] in names]),
        "other alone": mean_dice(score_masks(cases, alone)),
        "both": mean_dice(paired),
        "qc_score_spearman": spearman(paired, "qc_score"),
        **({"degraded": _summarise_degraded(degraded, degradations)} if degradations else {}),
    }
    accurate = np.array([r["qc_score"] for r in paired if lower_dice(r) >= ACCURATE_DICE])
    if not len(accurate):
        return {**summary, "thresholds": f"none: no case reaches Dice {ACCURATE_DICE}"}
    thresholds = dict(zip(("min_agreement", "fail_agreement"), lower_thresholds(accurate, FALSE_ALARMS)))

    def brief(cases: list[dict]) -> list[tuple]:
        return [(r["case"], round(r["qc_score"], 3), round(lower_dice(r), 3)) for r in cases]

    return {
        **summary,
        "thresholds": thresholds,
        "flagged": brief([r for r in paired if r["qc_score"] < thresholds["min_agreement"]]),
        "inaccurate": brief([r for r in paired if lower_dice(r) < ACCURATE_DICE]),
    }


def _summarise_degraded(rows: list[dict], degradations: list[str]) -> dict:
    """Over the degraded copies: the pair's Dice, its agreement's rank correlation with their Dice, and each
    degradation's mean agreement and lower label's Dice."""
    by_degradation = {}
    for name in degradations:
        group = [r for r in rows if r["degradation"] == name]
        by_degradation[name] = {
            "qc_score": round(float(np.mean([r["qc_score"] for r in group])), 3),
            "lower_dice": round(float(np.mean([lower_dice(r) for r in group])), 3),
        }
    summary = {"copies": len(rows), **mean_dice(rows), "qc_score_spearman": spearman(rows, "qc_score")}
    return {**summary, "by_degradation": by_degradation}
