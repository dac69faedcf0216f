"""Volumes and quality flags per case, which MONAI does not tabulate: a written mask's `CaseRow` (its volumes, the
head's signals, `qc` pass, review or fail and the reasons) and the flags that need the whole cohort."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import nibabel as nib
import numpy as np
from scipy import ndimage
from scripts.imaging import nonzero_box
from scripts.labels import PARTS, SIDES, structure_name, structures

SIDE_PARTS = [(side, part) for side in SIDES for part in (*PARTS, "total")]  # a head's per-side volumes
VOLUME_COLUMNS = [
    "case",
    "kind",
    "anterior_mm3",
    "posterior_mm3",
    "total_mm3",
    *(f"{side}_{part}_mm3" for side, part in SIDE_PARTS),
    "etiv_mm3",
    "confidence",
    *(f"{side}_{signal}" for signal in ("confidence", "agreement") for side in SIDES),
    "qc",
    "qc_score",
    "qc_reasons",
]
COHORT_MIN_CASES = 20  # cohort outliers are looked for in runs of at least this many heads
COHORT_MAX_Z = 3.5  # robust z-score (median, 1.4826 MAD) beyond which a head is a cohort outlier


def _number(text: str | None) -> float | None:
    return float(text) if text else None


@dataclass
class CaseRow:
    """One case of the volumes table, its numbers as numbers: the tables, the report and the sidecars read it, and
    `columns` formats it once, where a file is written.

    `volumes` holds mm3 per structure: `anterior` and `posterior` for a crop (its mask's voxels), `left anterior` ...
    `right posterior` for a head (its 1 mm boxes'). `reasons` are the QC's, failures first."""

    case: str
    kind: str
    volumes: dict[str, float]
    etiv_mm3: float | None = None
    confidence: float | None = None
    side_confidence: dict[str, float] = field(default_factory=dict)
    side_agreement: dict[str, float] = field(default_factory=dict)
    qc: str = "pass"
    qc_score: float | None = None
    reasons: list[str] = field(default_factory=list)
    cohort_outlier: bool = False

    def volume(self, side: str | None = None, part: str | None = None) -> float:
        """mm3 of one side (None: both) and one part (None: both)."""
        return sum(
            value
            for name, value in self.volumes.items()
            if (side is None or name.startswith(side)) and (part is None or name.endswith(part))
        )

    @property
    def qc_reasons(self) -> str:
        return "; ".join(self.reasons)

    def side_volumes(self) -> dict[str, float]:
        """A head's mm3 per side and part, and per side in total: `left_anterior` ... `right_total` (none for a crop)."""
        if self.kind != "head":
            return {}
        return {f"{side}_{part}": self.volume(side, None if part == "total" else part) for side, part in SIDE_PARTS}

    def columns(self) -> dict[str, str]:
        """The row as the volumes table writes it (`VOLUME_COLUMNS`; those that do not apply are left out)."""
        columns = {"case": self.case, "kind": self.kind}
        columns.update({f"{name}_mm3": f"{value:.1f}" for name, value in self.side_volumes().items()})
        if self.etiv_mm3 is not None:
            columns["etiv_mm3"] = f"{self.etiv_mm3:.0f}"
        for side in self.side_agreement:
            columns[f"{side}_confidence"] = f"{self.side_confidence[side]:.4f}"
            columns[f"{side}_agreement"] = f"{self.side_agreement[side]:.4f}"
        if self.qc_score is not None:
            columns["qc_score"] = f"{self.qc_score:.3f}"
        columns.update({f"{part}_mm3": f"{self.volume(part=part):.1f}" for part in PARTS})
        known = self.confidence is not None and not math.isnan(self.confidence)
        columns.update(
            total_mm3=f"{self.volume():.1f}",
            confidence=f"{self.confidence:.4f}" if known else "",
            qc=self.qc,
            qc_reasons=self.qc_reasons,
        )
        return columns

    @classmethod
    def from_columns(cls, columns: Mapping[str, str]) -> CaseRow:
        """A row read back from a volumes table (`columns`' inverse, to the precision written)."""
        kind = columns["kind"]
        names = {
            structure_name(side, part): f"{structure_name(side, part).replace(' ', '_')}_mm3"
            for _, side, part in structures(kind)
        }
        signals = [side for side in SIDES if _number(columns.get(f"{side}_agreement")) is not None]
        return cls(
            case=columns["case"],
            kind=kind,
            volumes={name: float(columns[column]) for name, column in names.items()},
            etiv_mm3=_number(columns.get("etiv_mm3")),
            confidence=_number(columns.get("confidence")),
            side_confidence={side: float(columns[f"{side}_confidence"]) for side in signals},
            side_agreement={side: float(columns[f"{side}_agreement"]) for side in signals},
            qc=columns["qc"],
            qc_score=_number(columns.get("qc_score")),
            reasons=[reason for reason in columns["qc_reasons"].split("; ") if reason],
        )


class QualityCheck:
    """The `qc` of a written mask: `pass`, `review` or `fail`, its reasons in words (`qc_reasons`, `;`-separated) and
    its `qc_score`, an estimate of its Dice: the agreement of the ensemble's models on a crop
    (`scripts.engine.inferers.EnsembleInferer`), the lower of a head's sides' test-time agreements
    (`scripts.head.segmenter`).

    Any case is flagged for review when its voxels are thicker than `max_slice_mm` along some axis (slices thicker
    than the model was checked on), a label is absent, its volume lies outside the range of the training labels
    (scaled by a head's eTIV), or it is split into connected pieces. A crop is flagged for review when its models'
    agreement is below `crop["min_agreement"]` or its content looks like thick slices whatever its header says
    (`crop["min_slice_sharpness"]`), and fails below `crop["fail_agreement"]`. A head's side is flagged for
    review when its confidence is below `head["min_confidence"]` or its test-time agreement (`scripts.head.segmenter`) below
    `head["min_agreement"]`, and the head when its left and right hippocampi differ by more than
    `head["max_asymmetry"]` of their mean; it fails when a side's agreement is below `head["fail_agreement"]`. A head
    whose voxels are at least `head_thick_slices["min_slice_mm"]` thick is held to `head_thick_slices` instead.

    Args:
        volume_range: {"anterior": [low, high], "posterior": [low, high]} in mm3 (`python -m scripts.qc reference`),
            for one hippocampus (a crop, or one side of a head) of a head with eTIV `reference_etiv_mm3`.
        crop: the crops' thresholds, `min_agreement` and `fail_agreement` (set on pairs of models that never saw
            the case: `python -m scripts.qc folds`) and `min_slice_sharpness` (under it a crop looks like thick
            slices resampled to 1 mm: `scripts.data.acquisition.slice_sharpness`, `python -m scripts.qc
            reference`); None: no such flags.
        reference_etiv_mm3: a head's ranges are scaled by its eTIV over this, so a large head is not flagged for
            its size (crops have no eTIV and keep the ranges as they are).
        head: the heads' thresholds, `min_confidence`, `min_agreement`, `fail_agreement` and `max_asymmetry` (set
            on the failure set: `python -m tools.failure_set score`); None: no head signal flags.
        head_thick_slices: the same thresholds for heads whose voxels are at least `min_slice_mm` thick along some
            axis (clinical 2D series; set on the failure set's 5 mm copies); None: `head`'s for every head.
        max_slice_mm: the thickest voxels (mm, along any axis) on which the model's accuracy and volumes were shown
            to hold.
    """

    def __init__(
        self,
        volume_range: Mapping[str, Sequence[float]],
        crop: Mapping[str, float] | None = None,
        reference_etiv_mm3: float = 1_500_000.0,
        head: Mapping[str, float] | None = None,
        max_slice_mm: float = 5.0,
        head_thick_slices: Mapping[str, float] | None = None,
    ) -> None:
        self.volume_range = {part: tuple(float(v) for v in volume_range[part]) for part in PARTS}
        self.max_slice_mm = float(max_slice_mm)
        self.crop = {key: float(value) for key, value in (crop or {}).items()}
        self.reference_etiv_mm3 = float(reference_etiv_mm3)
        self.head = {key: float(value) for key, value in (head or {}).items()}
        self.head_thick_slices = {key: float(value) for key, value in (head_thick_slices or {}).items()}

    def row(
        self,
        case: str,
        mask_file: str,
        head: dict | None = None,
        confidence: float | None = None,
        agreement: float | None = None,
        slice_sharpness: tuple[float, int] | None = None,
    ) -> CaseRow:
        """The `CaseRow` of one written mask; `head` is the head segmenter's result, None for a crop, whose
        `confidence`, models' `agreement` and (`slice_sharpness`, its axis) come from its inference."""
        mask = nib.load(mask_file)
        labels = np.asarray(mask.dataobj, dtype=np.uint8)
        if labels.any():
            labels = labels[nonzero_box(labels)]  # counting all of a head's mask took 0.1 s
        voxel = abs(float(np.linalg.det(mask.affine[:3, :3])))
        kind = "head" if head is not None or labels.max() > 2 else "crop"
        named = {structure_name(side, part): label for label, side, part in structures(kind)}
        counts = np.bincount(labels.ravel(), minlength=5)
        volumes = {name: float(counts[label]) * voxel for name, label in named.items()}
        if head is not None and "box_volumes_mm3" in head:
            # a head's volumes as its 1 mm boxes hold them: a count of the scan's thick voxels moves with the slices'
            # position (docs/quality_control.md, "Repeatability on clinical slices")
            volumes = {name: float(head["box_volumes_mm3"][name]) for name in named}
        row = CaseRow(
            case, kind, volumes, etiv_mm3=head["etiv_mm3"] if head is not None else None, confidence=confidence
        )
        # each label's bounding box, where its pieces are counted (heads are large)
        boxes = ndimage.find_objects(labels)
        review, fail = [], []
        slice_mm = round(float(np.linalg.norm(mask.affine[:3, :3], axis=0).max()), 2)
        if slice_mm > self.max_slice_mm:
            review.append(f"{slice_mm:g} mm slices: volumes move on slices over {self.max_slice_mm:g} mm")
        if head is not None and head.get("cut_faces"):
            review.append(_field_of_view_reason(head))
        # a head's ranges scale with its eTIV; a head whose eTIV is withheld (a cut field of view) is not range-checked
        scaled = head is None or head["etiv_mm3"] is not None
        scale = head["etiv_mm3"] / self.reference_etiv_mm3 if head is not None and scaled else 1.0
        for name, label in named.items():
            low, high = (scale * v for v in self.volume_range[name.split()[-1]])
            volume = row.volumes[name]
            if volume == 0:
                review.append(f"{name} absent")
                continue
            if scaled and not low <= volume <= high:
                review.append(f"{name} {volume:.0f} mm3 outside {low:.0f}-{high:.0f}")
            box = boxes[label - 1] if label <= len(boxes) else None  # None: too small to reach the scan's voxels
            pieces = ndimage.label(labels[box] == label, structure=np.ones((3, 3, 3)))[1] if box else 1
            if pieces > 1:
                review.append(f"{name} in {pieces} pieces")
        thick = self.head_thick_slices and slice_mm >= self.head_thick_slices["min_slice_mm"]
        thresholds = self.head_thick_slices if thick else self.head
        if kind == "head" and head is not None and thresholds:
            self._head_signals(head, row, review, fail, thresholds)
        if kind == "crop" and agreement is not None:
            row.qc_score = agreement
            if "fail_agreement" in self.crop and agreement < self.crop["fail_agreement"]:
                fail.append(f"the ensemble's models agree at {agreement:.3f}")
            elif "min_agreement" in self.crop and agreement < self.crop["min_agreement"]:
                review.append(f"the ensemble's models agree at {agreement:.3f}")
        if kind == "crop" and slice_sharpness is not None and "min_slice_sharpness" in self.crop:
            sharpness, axis = slice_sharpness
            if sharpness < self.crop["min_slice_sharpness"]:
                review.append(
                    f"looks like thick slices along its {'xyz'[axis]} axis, resampled to 1 mm: sharpness {sharpness:.2f}"
                    f" (under {self.crop['min_slice_sharpness']:g})"
                )
        row.qc = "fail" if fail else "review" if review else "pass"
        row.reasons = fail + review
        return row

    @staticmethod
    def _head_signals(head: dict, row: CaseRow, review: list[str], fail: list[str], thresholds: dict) -> None:
        """A head's per-side confidence and test-time agreement and its `qc_score` into `row`, and the reasons they
        give at `thresholds`."""
        for side in SIDES:
            confidence, agreement = head["side_confidence"][side], head["side_agreement"][side]
            row.side_confidence[side], row.side_agreement[side] = confidence, agreement
            if agreement < thresholds["fail_agreement"]:
                fail.append(f"{side} hippocampus: test-time augmentations agree at {agreement:.3f}")
            elif agreement < thresholds["min_agreement"]:
                review.append(f"{side} hippocampus: test-time augmentations agree at {agreement:.3f}")
            if confidence < thresholds["min_confidence"]:
                review.append(f"{side} hippocampus: confidence {confidence:.3f}")
        difference = abs(asymmetry(*(row.volume(side) for side in SIDES)))
        if difference > thresholds["max_asymmetry"]:
            review.append(f"left and right hippocampi differ by {100 * difference:.0f}%")
        row.qc_score = min(head["side_agreement"].values())


def _field_of_view_reason(head: dict) -> str:
    """The reason that names where a head's field of view cuts its brain (`scripts.head.localisation`)."""
    faces = sorted(head["cut_faces"].items(), key=lambda item: -item[1])
    shares = len(faces) > 1  # each face's share where there are several
    where = " and ".join(f"its {name}" + (f" ({100 * share:.0f}%)" if shares else "") for name, share in faces)
    return (
        f"the field of view cuts the brain at {where}: {100 * head['brain_outside_fov']:.0f}% of the registered "
        f"template brain outside it, eTIV withheld"
    )


def asymmetry(left, right):
    """(left - right) over their mean, of volumes or arrays of them."""
    return (left - right) / np.maximum((left + right) / 2, 1.0)


def flag_cohort_outliers(rows: Sequence[CaseRow]) -> None:
    """In a run of at least `COHORT_MIN_CASES` heads with eTIV, flags for review (in place) each head whose side's
    volume over eTIV, or whose left/right asymmetry, lies more than `COHORT_MAX_Z` robust standard deviations from
    the run's median, as HippMapp3r flags its cohort's outliers."""
    heads = [row for row in rows if row.kind == "head" and row.etiv_mm3]
    if len(heads) < COHORT_MIN_CASES:
        return
    measures = {
        f"{side} hippocampus's volume over eTIV": [r.volume(side) / r.etiv_mm3 for r in heads] for side in SIDES
    }
    left, right = (np.array([r.volume(side) for r in heads]) for side in SIDES)
    measures["left/right asymmetry"] = list(asymmetry(left, right))
    for name, values in measures.items():
        values = np.asarray(values)
        spread = 1.4826 * np.median(np.abs(values - np.median(values)))
        if spread == 0:
            continue
        for row, z in zip(heads, (values - np.median(values)) / spread):
            if abs(z) > COHORT_MAX_Z:
                row.reasons.append(f"{name} a cohort outlier ({z:+.1f} robust SD)")
                row.qc = "fail" if row.qc == "fail" else "review"
                row.cohort_outlier = True
