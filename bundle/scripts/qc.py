"""Volumes and quality flags per case, which MONAI does not tabulate: `volumes.csv` of inference, QC pictures, and the
commands that compute the flags' reference and measure them on a split of an MSD task folder.

    python -m scripts.qc reference --dataset_dir D           # volume range of each label in the training split
    python -m scripts.qc evaluate --dataset_dir D --split development --output_dir OUT   # confidences: threshold
    python -m scripts.qc evaluate --dataset_dir D --split validation --output_dir OUT    # flags against Dice
"""

from __future__ import annotations

import csv
import logging
import math
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

from scripts import atomic_write
from scripts.head import HEAD_LABELS
from scripts.localisation import nonzero_box

logger = logging.getLogger(__name__)
PARTS = ("anterior", "posterior")
VOLUME_COLUMNS = ["case", "kind", "anterior_mm3", "posterior_mm3", "total_mm3",
                  *(f"{side}_{part}_mm3" for side in HEAD_LABELS for part in (*PARTS, "total")),
                  "etiv_mm3", "confidence", *(f"{side}_{signal}" for signal in ("confidence", "agreement")
                                              for side in HEAD_LABELS),
                  "qc", "qc_score", "qc_reasons"]
COHORT_MIN_CASES = 20  # cohort outliers are looked for in runs of at least this many heads
COHORT_MAX_Z = 3.5  # robust z-score (median, 1.4826 MAD) beyond which a head is a cohort outlier


class QualityCheck:
    """The `qc` of a written mask: `pass`, `review` or `fail`, its reasons in words (`qc_reasons`, `;`-separated) and,
    for a head, `qc_score`, an estimate of its Dice (the lower of its sides' test-time agreements).

    Any case is flagged for review when a label is absent, its volume lies outside the range of the training labels
    (scaled by a head's eTIV), or it is split into connected pieces. A crop is flagged for review when the model's
    mean top-class probability inside its hippocampus is below `min_confidence`. A head's side is flagged for
    review when its confidence is below `head["min_confidence"]` or its test-time agreement (`scripts.head`) below
    `head["min_agreement"]`, and the head when its left and right hippocampi differ by more than
    `head["max_asymmetry"]` of their mean; it fails when a side's agreement is below `head["fail_agreement"]`.

    Args:
        volume_range: {"anterior": [low, high], "posterior": [low, high]} in mm3 (`python -m scripts.qc reference`),
            for one hippocampus (a crop, or one side of a head) of a head with eTIV `reference_etiv_mm3`.
        min_confidence: the crops' confidence threshold (set on the development split).
        reference_etiv_mm3: a head's ranges are scaled by its eTIV over this, so a large head is not flagged for
            its size (crops have no eTIV and keep the ranges as they are).
        head: the heads' thresholds, `min_confidence`, `min_agreement`, `fail_agreement` and `max_asymmetry` (set
            on the failure set: `python -m scripts.failure_set score`); None checks heads as crops.
    """

    def __init__(self, volume_range: Mapping[str, Sequence[float]], min_confidence: float,
                 reference_etiv_mm3: float = 1_500_000.0, head: Mapping[str, float] | None = None) -> None:
        self.volume_range = {part: tuple(float(v) for v in volume_range[part]) for part in PARTS}
        self.min_confidence = float(min_confidence)
        self.reference_etiv_mm3 = float(reference_etiv_mm3)
        self.head = {key: float(value) for key, value in (head or {}).items()}

    def row(self, case: str, mask_file: str, head: dict | None = None, confidence: float | None = None) -> dict:
        """The `volumes.csv` row of one written mask; `head` is the head segmenter's result, None for a crop."""
        mask = nib.load(mask_file)
        labels = np.asarray(mask.dataobj, dtype=np.uint8)
        if labels.any():
            labels = labels[nonzero_box(labels)]  # counting all of a head's mask took 0.1 s
        voxel = abs(float(np.linalg.det(mask.affine[:3, :3])))
        kind = "head" if head is not None or labels.max() > 2 else "crop"
        structures = ({f"{side} {part}": label for side, side_labels in HEAD_LABELS.items()
                       for part, label in zip(PARTS, side_labels)} if kind == "head" else {"anterior": 1, "posterior": 2})
        counts = np.bincount(labels.ravel(), minlength=5)
        volumes = {name: float(counts[label]) * voxel for name, label in structures.items()}
        boxes = ndimage.find_objects(labels)  # each label's bounding box, where its pieces are counted (heads are large)
        review, fail = [], []
        scale = head["etiv_mm3"] / self.reference_etiv_mm3 if head is not None else 1.0
        for name, label in structures.items():
            low, high = (scale * v for v in self.volume_range[name.split()[-1]])
            if volumes[name] == 0:
                review.append(f"{name} absent")
                continue
            if not low <= volumes[name] <= high:
                review.append(f"{name} {volumes[name]:.0f} mm3 outside {low:.0f}-{high:.0f}")
            pieces = ndimage.label(labels[boxes[label - 1]] == label, structure=np.ones((3, 3, 3)))[1]
            if pieces > 1:
                review.append(f"{name} in {pieces} pieces")
        row = {"case": case, "kind": kind}
        if kind == "head":
            for side in HEAD_LABELS:
                anterior, posterior = volumes[f"{side} anterior"], volumes[f"{side} posterior"]
                row.update({f"{side}_anterior_mm3": f"{anterior:.1f}", f"{side}_posterior_mm3": f"{posterior:.1f}",
                            f"{side}_total_mm3": f"{anterior + posterior:.1f}"})
            anterior = volumes["left anterior"] + volumes["right anterior"]
            posterior = volumes["left posterior"] + volumes["right posterior"]
            if head is not None:
                row["etiv_mm3"] = f"{head['etiv_mm3']:.0f}"
            if head is not None and self.head:
                row.update(self._head_signals(head, row, review, fail))
        else:
            anterior, posterior = volumes["anterior"], volumes["posterior"]
        if (kind == "crop" or not self.head) and confidence is not None and not confidence >= self.min_confidence:
            review.append(f"confidence {confidence:.3f} < {self.min_confidence}")
        row.update(anterior_mm3=f"{anterior:.1f}", posterior_mm3=f"{posterior:.1f}",
                   total_mm3=f"{anterior + posterior:.1f}",
                   confidence="" if confidence is None or math.isnan(confidence) else f"{confidence:.4f}",
                   qc="fail" if fail else "review" if review else "pass", qc_reasons="; ".join(fail + review))
        return row

    def _head_signals(self, head: dict, row: dict, review: list[str], fail: list[str]) -> dict:
        """A head's per-side confidence and test-time agreement, its `qc_score` and the reasons they give."""
        signals = {}
        for side in HEAD_LABELS:
            confidence, agreement = head["side_confidence"][side], head["side_agreement"][side]
            signals.update({f"{side}_confidence": f"{confidence:.4f}", f"{side}_agreement": f"{agreement:.4f}"})
            if agreement < self.head["fail_agreement"]:
                fail.append(f"{side} hippocampus: test-time augmentations agree at {agreement:.2f}")
            elif agreement < self.head["min_agreement"]:
                review.append(f"{side} hippocampus: test-time augmentations agree at {agreement:.2f}")
            if confidence < self.head["min_confidence"]:
                review.append(f"{side} hippocampus: confidence {confidence:.3f}")
        difference = abs(asymmetry(*(float(row[f"{side}_total_mm3"]) for side in HEAD_LABELS)))
        if difference > self.head["max_asymmetry"]:
            review.append(f"left and right hippocampi differ by {100 * difference:.0f}%")
        signals["qc_score"] = f"{min(head['side_agreement'].values()):.3f}"
        return signals


def asymmetry(left, right):
    """(left - right) over their mean, of volumes or arrays of them."""
    return (left - right) / np.maximum((left + right) / 2, 1.0)


def flag_cohort_outliers(rows: Sequence[dict]) -> None:
    """In a run of at least `COHORT_MIN_CASES` heads with eTIV, flags for review (in place) each head whose side's
    volume over eTIV, or whose left/right asymmetry, lies more than `COHORT_MAX_Z` robust standard deviations from
    the run's median, as HippMapp3r flags its cohort's outliers."""
    heads = [row for row in rows if row["kind"] == "head" and row.get("etiv_mm3")]
    if len(heads) < COHORT_MIN_CASES:
        return
    measures = {f"{side} hippocampus's volume over eTIV": [float(r[f"{side}_total_mm3"]) / float(r["etiv_mm3"])
                                                            for r in heads] for side in HEAD_LABELS}
    left, right = (np.array([float(r[f"{side}_total_mm3"]) for r in heads]) for side in HEAD_LABELS)
    measures["left/right asymmetry"] = list(asymmetry(left, right))
    for name, values in measures.items():
        values = np.asarray(values)
        spread = 1.4826 * np.median(np.abs(values - np.median(values)))
        if spread == 0:
            continue
        for row, z in zip(heads, (values - np.median(values)) / spread):
            if abs(z) > COHORT_MAX_Z:
                row["qc_reasons"] = "; ".join(filter(None, [row["qc_reasons"],
                                                            f"{name} a cohort outlier ({z:+.1f} robust SD)"]))
                row["qc"] = "fail" if row["qc"] == "fail" else "review"
                row["cohort_outlier"] = True


def _fraction_columns() -> list[str]:
    return [f"{side}_{part}_etiv_fraction" for side in HEAD_LABELS for part in (*PARTS, "total")]


def _bids_row(row: dict) -> dict:
    """A `volumes.tsv` row: the participant and session first, each side's volumes also as a fraction of eTIV, n/a
    for what does not apply."""
    from scripts.bids import entities

    labels = entities(row["case"])
    etiv = float(row["etiv_mm3"]) if row.get("etiv_mm3") else None
    fractions = {column: f"{float(row[column.replace('_etiv_fraction', '_mm3')]) / etiv:.6g}"
                 for column in _fraction_columns() if etiv and row.get(column.replace("_etiv_fraction", "_mm3"))}
    bids_row = {"participant_id": f"sub-{labels['sub']}", "session_id": f"ses-{labels['ses']}" if "ses" in labels else "",
                **row, **fractions}
    return {key: value if value != "" else "n/a" for key, value in bids_row.items()}


def write_volumes(inputs, rows: Sequence[dict], quality: QualityCheck) -> tuple[str, list[dict]]:
    """The volumes table in `inputs.output_dir`, `volumes.csv` (`volumes.tsv` in the BIDS layout), written atomically:
    one row per input whose mask is on disk, from `rows` (this run), else from the earlier file, else computed from
    the mask (a case skipped because its mask exists). Returns the file and its rows (as `QualityCheck.row`'s)."""
    path = os.path.join(inputs.output_dir, "volumes.tsv" if inputs.bids else "volumes.csv")
    delimiter = "\t" if inputs.bids else ","
    earlier = {}
    if os.path.isfile(path):
        with open(path, newline="", encoding="utf-8") as f:
            earlier = {row["case"]: {key: "" if value == "n/a" else value for key, value in row.items()}
                       for row in csv.DictReader(f, delimiter=delimiter)}
    now = {row["case"]: row for row in rows}
    table = []
    for image in inputs.paths:
        case, mask = inputs.case(image), inputs.mask_path(image)
        if case in now:
            table.append(now[case])
        elif case in earlier and os.path.isfile(mask):
            table.append(earlier[case])
        elif os.path.isfile(mask):
            try:
                table.append(quality.row(case, mask))
            except Exception as e:  # an unreadable old mask loses its row, not the table
                logger.warning(f"{mask}: no volumes ({type(e).__name__}: {e})")
    flag_cohort_outliers(table)
    columns = ["participant_id", "session_id", *VOLUME_COLUMNS, *_fraction_columns()] if inputs.bids else VOLUME_COLUMNS
    with atomic_write(path, "w") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="n/a" if inputs.bids else "", extrasaction="ignore",
                                delimiter=delimiter, lineterminator="\n")
        writer.writeheader()
        writer.writerows([_bids_row(row) for row in table] if inputs.bids else table)
    return path, table


OUTLINE_COLOURS = ((228, 26, 28), (255, 217, 47), (55, 126, 184), (77, 175, 74))  # labels 1-4


def draw_qc_png(image_file: str, mask_file: str, png_file: str, margin_mm: float = 10.0, height: int = 180) -> None:
    """Three orthogonal slices (RAS) with each label outlined, each the one holding most of the hippocampus: for a
    crop, of the whole crop; for a head, a row per side, each cut to its hippocampus's box and `margin_mm` around it,
    so that the hippocampus fills its picture. Each row is `height` pixels high, in millimetres' proportions. Drawn
    with Pillow (matplotlib took 0.13 s a picture, about as long as segmenting a crop)."""
    from monai.transforms import Compose, EnsureChannelFirst, LoadImage, Orientation
    from PIL import Image, ImageDraw

    from scripts.transforms import image_reader

    load = LoadImage(image_only=True)
    to_ras = Compose([EnsureChannelFirst(), Orientation("RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))])
    image, labels = (to_ras(load(f, image_reader(f))) for f in (image_file, mask_file))
    spacing = np.linalg.norm(np.asarray(labels.affine)[:3, :3], axis=0)
    image, labels = np.asarray(image[0], dtype=np.float32), np.asarray(labels[0], dtype=np.uint8)
    sides = ([(f"{side}, ", side_labels) for side, side_labels in HEAD_LABELS.items()] if labels.max() > 2
             else [("", (1, 2))])
    rows = []
    for name, side_labels in sides:
        inside = np.isin(labels, side_labels)
        box = (slice(None),) * 3
        if name and inside.any():
            margin = np.ceil(margin_mm / spacing).astype(int)
            corners = np.argwhere(inside)
            box = tuple(slice(max(a - m, 0), b + m + 1) for a, b, m in zip(corners.min(0), corners.max(0), margin))
        picture, outline = image[box], labels[box]
        counted = np.isin(outline, side_labels) if inside.any() else outline > 0
        centre = [int(np.argmax(counted.sum(axis=tuple(a for a in range(3) if a != axis)))) for axis in range(3)]
        low, high = np.percentile(picture, [1, 99.5])
        panels = []
        for axis, title in enumerate(("sagittal", "coronal", "axial")):
            # rows from the top (superior or anterior) down, columns from the subject's posterior or left
            plane = np.take(picture, centre[axis], axis).T[::-1]
            contour = np.take(outline, centre[axis], axis).T[::-1]
            across, up = (s for a, s in enumerate(spacing) if a != axis)
            size = (max(1, round(height * plane.shape[1] * across / (plane.shape[0] * up))), height)
            grey = np.clip((plane - low) / max(high - low, 1e-6) * 255, 0, 255).astype(np.uint8)
            pixels = np.asarray(Image.fromarray(grey).resize(size, Image.BILINEAR).convert("RGB")).copy()
            drawn = np.asarray(Image.fromarray(contour).resize(size, Image.NEAREST))
            edge = drawn > 0
            edge[1:-1, 1:-1] &= ~((drawn[1:-1, 1:-1] == drawn[:-2, 1:-1]) & (drawn[1:-1, 1:-1] == drawn[2:, 1:-1]) &
                                  (drawn[1:-1, 1:-1] == drawn[1:-1, :-2]) & (drawn[1:-1, 1:-1] == drawn[1:-1, 2:]))
            for label, colour in enumerate(OUTLINE_COLOURS, start=1):
                pixels[edge & (drawn == label)] = colour
            panel = Image.fromarray(pixels)
            ImageDraw.Draw(panel).text((4, 2), f"{name}{title} {centre[axis] + (box[axis].start or 0)}", fill="white")
            panels.append(panel)
        rows.append(panels)
    gap = 6
    width = max(sum(p.width for p in panels) + gap * (len(panels) - 1) for panels in rows)
    sheet = Image.new("RGB", (width, 18 + len(rows) * (height + gap)), "white")
    ImageDraw.Draw(sheet).text((4, 3), os.path.basename(mask_file), fill="black")
    for row, panels in enumerate(rows):
        x = 0
        for panel in panels:
            sheet.paste(panel, (x, 18 + row * (height + gap)))
            x += panel.width + gap
    os.makedirs(os.path.dirname(png_file), exist_ok=True)
    sheet.save(png_file, compress_level=1)  # zlib's default level took 60% of a picture's time


def _split_cases(dataset_dir: str, split: str) -> list[dict[str, str]]:
    """The MSD task's `training` (the model's 187 cases), `validation` (21) or `development` (47 of the training
    cases, configs/dev_split.yaml) cases, split_seed 0."""
    from scripts.data import load_training_list, split_dataset

    usual = split_dataset(load_training_list(dataset_dir), 0, 0.9)
    if split == "development":
        return split_dataset(usual["training"], 1, 0.75)["validation"]
    return usual[split]


def reference(dataset_dir: str) -> dict:
    """The range of each label's volume (mm3) over the training split's labels: `qc#volume_range`."""
    ranges = {}
    volumes = {part: [] for part in PARTS}
    for case in _split_cases(dataset_dir, "training"):
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
    subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.yaml",
                    "--dataset_dir", images, "--output_dir", masks, "--overwrite", "true", "--report", "false",
                    *overrides], check=check)


def evaluate(dataset_dir: str, split: str = "validation", output_dir: str = "eval/qc", keep_largest: bool | None = None) -> dict:
    """Runs configs/inference.yaml on a split's images (with `--keep_largest` when given)
    and measures, against the labels in each image's grid: Dice per case, the QC flags (Dice of flagged and
    unflagged cases), volume agreement (Pearson r and mean absolute % error per label and total) and confidences."""
    dataset_dir = os.path.abspath(dataset_dir)
    cases = _split_cases(dataset_dir, split)
    images = os.path.join(output_dir, "images")
    os.makedirs(images, exist_ok=True)
    for case in cases:
        link = os.path.join(images, os.path.basename(case["image"]))
        if not os.path.lexists(link):
            os.symlink(case["image"], link)
    masks = os.path.join(output_dir, "masks")
    segment_folder(images, masks, *(["--keep_largest", str(keep_largest).lower()] if keep_largest is not None else []),
                   check=False)
    with open(os.path.join(masks, "volumes.csv"), newline="", encoding="utf-8") as f:
        rows = {row["case"]: row for row in csv.DictReader(f)}
    results = []
    for case in cases:
        name = os.path.basename(case["image"])
        predicted = np.asarray(nib.load(os.path.join(masks, name.replace(".nii.gz", "_seg.nii.gz"))).dataobj)
        label = nib.load(case["label"])
        truth = np.asarray(label.dataobj)
        voxel = abs(float(np.linalg.det(label.affine[:3, :3])))
        row = rows[name]
        results.append({
            "case": name, "qc": row["qc"], "reasons": row["qc_reasons"], "confidence": float(row["confidence"]),
            **{f"dice_{part}": dice(predicted == i, truth == i) for i, part in enumerate(PARTS, start=1)},
            **{f"{part}_true": float((truth == i).sum()) * voxel for i, part in enumerate(PARTS, start=1)},
            **{f"{part}_pred": float(row[f"{part}_mm3"]) for part in PARTS},
        })
    return {"split": split, "cases": len(results), **_summarise(results)}


def _summarise(results: list[dict]) -> dict:
    summary: dict = {}
    for part in PARTS:
        summary[f"dice_{part}"] = round(float(np.mean([r[f"dice_{part}"] for r in results])), 4)
    for r in results:
        r["total_true"], r["total_pred"] = r["anterior_true"] + r["posterior_true"], r["anterior_pred"] + r["posterior_pred"]
    for part in (*PARTS, "total"):
        true = np.array([r[f"{part}_true"] for r in results])
        pred = np.array([r[f"{part}_pred"] for r in results])
        summary[f"volume_{part}"] = {"pearson_r": round(float(np.corrcoef(true, pred)[0, 1]), 3),
                                     "mean_abs_error_pct": round(float(np.mean(np.abs(pred - true) / true) * 100), 2)}
    confidences = np.array([r["confidence"] for r in results])
    summary["confidence"] = {"min": round(float(confidences.min()), 4),
                             "p5": round(float(np.percentile(confidences, 5)), 4),
                             "median": round(float(np.median(confidences)), 4)}
    for flag in ("review", "pass"):
        group = [r for r in results if r["qc"] == flag]
        mean = (lambda key: round(float(np.mean([r[key] for r in group])), 4)) if group else (lambda key: math.nan)
        summary[f"qc_{flag}"] = {"cases": len(group), "dice_anterior": mean("dice_anterior"),
                                 "dice_posterior": mean("dice_posterior")}
    summary["reasons"] = {r["case"]: r["reasons"] for r in results if r["qc"] != "pass"}
    return summary


if __name__ == "__main__":
    import fire

    from scripts.robustness import robustness

    fire.Fire({"reference": reference, "evaluate": evaluate, "robustness": robustness})
