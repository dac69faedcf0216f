"""A failure set for head QC with ground truth, which no public data set gives: damaged and harmless copies of a
folder of heads, each scored by the Dice of its mask against its clean head's mask, beside the signals QC could read.
Its images are cut from the heads given, so it is made again where they are, never committed.

    python -m tools.failure_set make --images ../../shared/data/real_heads/images --output_dir /tmp/failure_set
    python -m tools.failure_set score --output_dir /tmp/failure_set
"""

from __future__ import annotations

import csv
import math
import os
import shutil

import nibabel as nib
import numpy as np
from scipy import ndimage
from scripts import BUNDLE_DIR
from scripts.labels import HEAD_LABELS, SIDES, mask_name
from scripts.qc.calibration import lower_thresholds
from scripts.qc.check import asymmetry
from tools.head_check import TEMPLATE, configured_segmenter, label_sides, resampled, rigid, segment_timed, side_dice

BAD_DICE = 0.8  # a side below it against the clean head's mask is a failure QC should catch
CASE_COLUMNS = ("case", "head", "variant", "group", "description")
THICK_PLANES = {"sagittal": "left-right", "coronal": "anterior-posterior", "axial": "superior-inferior"}  # x, y, z
# the thick-slice copies: the world axis whose nearest voxel axis gets the slices, and their thickness (mm)
SLICE_COPIES = {"slices6mm": (2, 6.0), **{f"slices5mm_{plane}": (axis, 5.0) for axis, plane in enumerate(THICK_PLANES)}}
# (group, description) of each copy: harmless (good), damaged, or harmless thick-slice (thick); the registration
# copies are the clean image, segmented with the registration's map pushed off
VARIANTS = {
    "clean": ("good", "as acquired"),
    "moved": ("good", "header rotated 10-15 degrees and moved 15-20 mm"),
    "reoriented": ("good", "stored in another voxel order"),
    "resampled": ("good", "resampled to 1.3 mm"),
    "ghosting": ("damaged", "motion: 30% of k-space lines along one axis from a head moved 3-6 mm"),
    "noise": ("damaged", "Rician noise at 20% of the 99th percentile"),
    "slices6mm": ("damaged", "6 mm slices along the axis nearest superior-inferior"),
    **{
        f"slices5mm_{plane}": ("thick", f"5 mm slices along the axis nearest {direction}")
        for plane, direction in THICK_PLANES.items()
    },
    "bias": ("damaged", "bias field x8 across the head"),
    "grazing": ("damaged", "field of view ending at the right hippocampus's centre"),
    "inverted": ("damaged", "inverted contrast (T2-like)"),
    "flair_like": ("damaged", "FLAIR-like contrast: grey matter brighter than white"),
    "atrophy": ("damaged", "both hippocampi thinned by one voxel, CSF around them widened"),
    "one_side": ("damaged", "left hippocampus and 8 mm around it replaced by smooth noise"),
    "registration_shifted": ("damaged", "registration pushed 10 mm right and 8 mm up"),
    "registration_turned": ("damaged", "registration turned 15 degrees about each axis"),
}
REGISTRATION_OFFSETS = {
    "registration_shifted": ([0.0, 0.0, 0.0], [10.0, 0.0, 8.0]),
    "registration_turned": ([15.0, 15.0, 15.0], [0.0, 0.0, 0.0]),
}


def _axis_nearest(affine: np.ndarray, world_axis: int) -> int:
    """The voxel axis of `affine` most aligned with the world (RAS) axis `world_axis`."""
    return int(np.argmax(np.abs(affine[world_axis, :3]) / np.linalg.norm(affine[:3, :3], axis=0)))


def _brain_percentile(data: np.ndarray, q: float) -> float:
    return float(np.percentile(data[data > np.percentile(data, 50)], q))


def damaged(
    name: str, data: np.ndarray, affine: np.ndarray, mask: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """The copy `name` of a head (`data`, `affine`), `mask` its clean head mask (labels 1-4) on the same grid."""
    high = _brain_percentile(data, 99)
    if name == "clean":
        return data, affine
    if name == "moved":
        return data, rigid(rng.uniform(10, 15, 3) * rng.choice([-1, 1], 3), rng.uniform(15, 20, 3)) @ affine
    if name == "reoriented":
        flip = np.diag([-1.0, -1.0, 1.0, 1.0])
        flip[:2, 3] = np.array(data.shape[:2]) - 1
        return data[::-1, ::-1].copy(), affine @ flip
    if name == "resampled" or name in SLICE_COPIES:
        if name == "resampled":
            spacing = np.full(3, 1.3)
        else:
            world_axis, slice_mm = SLICE_COPIES[name]
            spacing = np.linalg.norm(affine[:3, :3], axis=0)
            spacing[_axis_nearest(affine, world_axis)] = slice_mm
        image = resampled(nib.Nifti1Image(data, affine), spacing)
        return image.get_fdata(dtype=np.float32), image.affine
    if name == "ghosting":
        readout, phase = _axis_nearest(affine, 0), _axis_nearest(affine, 1)
        spectrum = np.fft.fftn(data)
        frequencies = np.fft.fftfreq(data.shape[readout]).reshape([-1 if a == readout else 1 for a in range(3)])
        moved = spectrum * np.exp(-2j * np.pi * frequencies * rng.uniform(3, 6))
        lines = rng.random(data.shape[phase]) < 0.3
        chosen = tuple(lines if a == phase else slice(None) for a in range(3))
        spectrum[chosen] = moved[chosen]
        return np.abs(np.fft.ifftn(spectrum)).astype(np.float32), affine
    if name == "noise":
        sigma = 0.2 * high
        return (
            np.hypot(data + rng.normal(0, sigma, data.shape), rng.normal(0, sigma, data.shape)).astype(np.float32),
            affine,
        )
    if name == "bias":
        grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in data.shape], indexing="ij")
        return (data * np.exp(np.log(8) / 2 * (0.6 * grids[0] - 0.5 * grids[1] + 0.6 * grids[2]))).astype(
            np.float32
        ), affine
    if name == "grazing":
        axis = _axis_nearest(affine, 0)
        centre = int(round(np.argwhere(np.isin(mask, HEAD_LABELS["right"])).mean(0)[axis]))
        towards_right = affine[0, axis] > 0  # larger voxel indices lie to the subject's right
        kept = slice(0, centre + 1) if towards_right else slice(centre, None)
        start = np.zeros(3)
        start[axis] = kept.start or 0
        cut_affine = affine.copy()
        cut_affine[:3, 3] = nib.affines.apply_affine(affine, start)
        return np.ascontiguousarray(data[tuple(kept if a == axis else slice(None) for a in range(3))]), cut_affine
    if name == "inverted":
        return np.clip(high - data, 0, None).astype(np.float32), affine
    if name == "flair_like":
        x = np.clip(data / high, 0, 1.2)
        return (high * np.where(x < 0.35, 0.3 * x, 1.25 - x)).astype(np.float32), affine
    if name == "atrophy":
        hippocampus = mask > 0
        lost = hippocampus & ~ndimage.binary_erosion(hippocampus)
        widened = (
            ndimage.binary_dilation(hippocampus, iterations=2) & ~hippocampus & (data < _brain_percentile(data, 40))
        )
        csf = _brain_percentile(data, 2)
        return np.where(lost | ndimage.binary_dilation(widened), csf, data).astype(np.float32), affine
    if name == "one_side":
        spacing = np.linalg.norm(affine[:3, :3], axis=0)
        region = ndimage.binary_dilation(
            np.isin(mask, HEAD_LABELS["left"]), iterations=max(1, int(round(8 / spacing.min())))
        )
        noise = ndimage.gaussian_filter(rng.random(data.shape).astype(np.float32), 2) * high
        return np.where(region, noise, data).astype(np.float32), affine
    raise ValueError(f"unknown copy {name!r}")


class ShiftedRegistration:
    """A registration whose template-to-scan map first turns template points by `angles_deg` about the template's
    centre and moves them by `shift_mm`: boxes placed off the hippocampi, as a failed registration places them."""

    def __init__(self, registration, angles_deg, shift_mm) -> None:
        self.registration = registration
        self.change = rigid(angles_deg, shift_mm)

    def __call__(self, head, mask):
        result = self.registration(head, mask)
        result.offset = result.matrix @ self.change[:3, 3] + result.offset
        result.matrix = result.matrix @ self.change[:3, :3]
        return result


def _head_files(images: str) -> dict[str, str]:
    files = {
        name.split(".")[0]: os.path.join(images, name)
        for name in sorted(os.listdir(images))
        if name.endswith((".nii", ".nii.gz", ".mgz"))
    }
    return {**files, "mni152_template": TEMPLATE}


def make(images: str, output_dir: str, config_file: str = "configs/inference.yaml", seed: int = 0) -> list[dict]:
    """Segments each head of `images` and the MNI152 template as acquired (`output_dir/clean_masks`), then writes
    every copy of `VARIANTS` to `output_dir/images` and the list of cases to `cases.csv`."""
    clean_masks, copies = os.path.join(output_dir, "clean_masks"), os.path.join(output_dir, "images")
    os.makedirs(copies, exist_ok=True)
    segmenter = configured_segmenter(config_file, clean_masks)
    rng = np.random.default_rng(seed)
    rows = []
    for head, path in _head_files(images).items():
        source = nib.load(path)
        data, affine = np.asarray(source.dataobj, dtype=np.float32), source.affine
        clean = os.path.join(copies, f"{head}__clean.nii.gz")
        nib.save(nib.Nifti1Image(data, affine), clean)
        result = segment_timed(segmenter, clean)
        if "failed" in result:
            print(f"{head}: the clean head failed ({result['failed']}); left out")
            continue
        mask = np.asarray(nib.load(os.path.join(clean_masks, mask_name(f"{head}__clean"))).dataobj)
        for variant, (group, description) in VARIANTS.items():
            if variant in REGISTRATION_OFFSETS:
                shutil.copy(clean, os.path.join(copies, f"{head}__{variant}.nii.gz"))
            elif variant != "clean":
                copy, copy_affine = damaged(variant, data, affine, mask, rng)
                nib.save(
                    nib.Nifti1Image(np.ascontiguousarray(copy, dtype=np.float32), copy_affine),
                    os.path.join(copies, f"{head}__{variant}.nii.gz"),
                )
            rows.append(
                {
                    "case": f"{head}__{variant}",
                    "head": head,
                    "variant": variant,
                    "group": group,
                    "description": description,
                }
            )
    with open(os.path.join(output_dir, "cases.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CASE_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    print(f"{len(rows)} cases from {len({r['head'] for r in rows})} heads in {output_dir}")
    return rows


def _clean_on_grid(output_dir: str, head: str, variant: str, mask_file: str) -> dict[str, float]:
    """Dice of each side of a copy's mask against its clean head's mask, on the copy's grid: voxel by voxel for
    copies whose header moved (their voxels are the clean head's), in world space for the others."""
    ours, affine = label_sides(mask_file, *HEAD_LABELS.values())
    clean, clean_affine = label_sides(
        os.path.join(output_dir, "clean_masks", mask_name(f"{head}__clean")), *HEAD_LABELS.values()
    )
    if variant == "moved":
        clean_affine = affine
    return side_dice(ours, affine, clean, clean_affine)


def score(output_dir: str, config_file: str = "configs/inference.yaml") -> list[dict]:
    """Segments every case of `output_dir/cases.csv` and writes `scores.csv`: each side's Dice against the clean
    head's mask and the signals QC could read (each side's confidence and test-time agreement, registration
    similarity, left/right asymmetry, QC's reasons). Prints each case, the heads' thresholds its harmless copies give
    (`thresholds`), each signal's sensitivity and false alarms at them, `qc_score` against Dice, and the volumes'
    repeatability over the harmless copies."""
    from scripts.recipe import load

    with open(os.path.join(output_dir, "cases.csv"), newline="") as f:
        cases = list(csv.DictReader(f))
    masks = os.path.join(output_dir, "masks")
    if os.path.isdir(masks):
        shutil.rmtree(masks)
    segmenter = configured_segmenter(config_file, masks)
    registration = segmenter.registration
    quality = load(BUNDLE_DIR, [config_file], {}).get_parsed_content("qc")
    rows = []
    for case in cases:
        image = os.path.join(output_dir, "images", f"{case['case']}.nii.gz")
        if case["variant"] in REGISTRATION_OFFSETS:
            segmenter.registration = ShiftedRegistration(registration, *REGISTRATION_OFFSETS[case["variant"]])
        result = segment_timed(segmenter, image)
        segmenter.registration = registration
        row = {**case, "failed": result.get("failed", "")}
        if not row["failed"]:
            mask_file = os.path.join(masks, mask_name(case["case"]))
            dice = _clean_on_grid(output_dir, case["head"], case["variant"], mask_file)
            volumes = quality.row(case["case"], mask_file, result, result["confidence"])
            left, right = (volumes.volume(side) for side in SIDES)
            row.update(
                {
                    "dice_left": dice["left"],
                    "dice_right": dice["right"],
                    "left_mm3": left,
                    "right_mm3": right,
                    "confidence": result["confidence"],
                    **{
                        f"{signal}_{side}": result[f"side_{signal}"][side]
                        for signal in ("confidence", "agreement")
                        for side in SIDES
                    },
                    "mutual_information": result["mutual_information"],
                    "correlation": result["correlation"],
                    "asymmetry": abs(asymmetry(left, right)),
                    "qc": volumes.qc,
                    "qc_reasons": volumes.qc_reasons,
                }
            )
        rows.append(row)
    columns = [
        *CASE_COLUMNS,
        "failed",
        "dice_left",
        "dice_right",
        "confidence",
        "confidence_left",
        "confidence_right",
        "agreement_left",
        "agreement_right",
        "left_mm3",
        "right_mm3",
        "mutual_information",
        "correlation",
        "asymmetry",
        "qc",
        "qc_reasons",
    ]
    with open(os.path.join(output_dir, "scores.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    _print_scores(rows)
    return rows


def is_bad(row: dict) -> bool:
    """A case QC should catch: no mask, or a side under `BAD_DICE` against the clean head's mask."""
    return bool(row["failed"]) or min(row["dice_left"], row["dice_right"]) < BAD_DICE


def thresholds(rows: list[dict], false_alarms: float = 0.025, group: str = "good") -> dict[str, float]:
    """The heads' QC thresholds from a scored failure set, set on its harmless copies of `group` (`good`: `qc#head`
    in configs/inference.yaml; `thick`, the 5 mm copies: `qc#head_thick_slices`): the lower side's confidence and
    agreement each flag at most `false_alarms` of them (rounded down to 0.01), the asymmetry too (rounded up to 0.01);
    a side fails under the lowest agreement of any of them rounded down to 0.1."""
    harmless = [row for row in rows if row["group"] == group and not row["failed"]]

    def lowest(signal: str) -> np.ndarray:
        return np.array([min(row[f"{signal}_left"], row[f"{signal}_right"]) for row in harmless])

    min_agreement, fail_agreement = lower_thresholds(lowest("agreement"), false_alarms)
    return {
        "min_confidence": lower_thresholds(lowest("confidence"), false_alarms)[0],
        "min_agreement": min_agreement,
        "fail_agreement": fail_agreement,
        "max_asymmetry": math.ceil(100 * np.quantile([row["asymmetry"] for row in harmless], 1 - false_alarms)) / 100,
    }


SIGNALS = {  # each signal's flag at the thresholds: (a scored row, the thresholds) -> flagged
    "failure (named, no mask)": lambda row, t: bool(row["failed"]),
    "confidence": lambda row, t: (
        not row["failed"] and min(row["confidence_left"], row["confidence_right"]) < t["min_confidence"]
    ),
    "test-time agreement": lambda row, t: (
        not row["failed"] and min(row["agreement_left"], row["agreement_right"]) < t["min_agreement"]
    ),
    "left/right asymmetry": lambda row, t: not row["failed"] and row["asymmetry"] > t["max_asymmetry"],
    "volume range or pieces": lambda row, t: not row["failed"]
    and any(word in row["qc_reasons"] for word in ("outside", "pieces", "absent")),
}


def _print_scores(rows: list[dict]) -> None:
    print(
        "| case | group | Dice left / right vs clean | confidence left / right | agreement left / right | "
        "mutual information | correlation | asymmetry | failure |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        if row["failed"]:
            print(f"| {row['case']} | {row['group']} | failed | | | | | | {row['failed']} |")
            continue
        print(
            f"| {row['case']} | {row['group']} | {row['dice_left']:.3f} / {row['dice_right']:.3f} | "
            f"{row['confidence_left']:.3f} / {row['confidence_right']:.3f} | "
            f"{row['agreement_left']:.3f} / {row['agreement_right']:.3f} | {row['mutual_information']:.2f} | "
            f"{row['correlation']:.2f} | {row['asymmetry']:.2f} | |"
        )
    thick = [row for row in rows if row["group"] == "thick"]
    rows = [row for row in rows if row["group"] != "thick"]
    bad = [row for row in rows if is_bad(row)]
    harmless = [row for row in rows if row["group"] == "good"]
    chosen = thresholds(rows)
    print(
        f"\n{len(bad)} cases with a side under Dice {BAD_DICE} against the clean head's mask or no mask; "
        f"{len(harmless)} harmless copies. Thresholds (qc#head): {chosen}\n"
    )
    print("| signal | flags of the bad cases (sensitivity) | flags of the harmless copies (false alarms) |")
    print("|---|---|---|")
    for name, flag in [*SIGNALS.items(), ("any of them", lambda row, t: any(f(row, t) for f in SIGNALS.values()))]:
        caught = sum(flag(row, chosen) for row in bad)
        alarms = sum(flag(row, chosen) for row in harmless)
        print(
            f"| {name} | {caught} of {len(bad)} ({caught / max(len(bad), 1):.0%}) | "
            f"{alarms} of {len(harmless)} ({alarms / max(len(harmless), 1):.0%}) |"
        )
    scored = [row for row in rows if not row["failed"]]
    estimate = [min(row["agreement_left"], row["agreement_right"]) for row in scored]
    actual = [min(row["dice_left"], row["dice_right"]) for row in scored]
    difference = np.mean(np.abs(np.subtract(estimate, actual)))
    print(
        f"\nqc_score (the lower side's agreement) against the lower side's Dice: Pearson r "
        f"{np.corrcoef(estimate, actual)[0, 1]:.2f}, mean absolute difference {difference:.3f}"
    )
    _print_repeatability(rows)
    if thick:
        _print_thick(thick, chosen)


def _print_thick(thick: list[dict], chosen: dict[str, float]) -> None:
    """The thick-slice copies (5 mm, a plane each): their own thresholds by the same rule (`qc#head_thick_slices`),
    and the false alarms of each signal at the heads' thresholds and at theirs. Their Dice against the clean head's
    mask is left out: on a 5 mm grid it measures the grid more than the segmentation."""
    own = thresholds(thick, group="thick")
    print(f"\n{len(thick)} thick-slice copies (5 mm). Thresholds (qc#head_thick_slices): {own}\n")
    print("| signal | false alarms at qc#head's thresholds | at qc#head_thick_slices' |")
    print("|---|---|---|")
    for name, flag in [*SIGNALS.items(), ("any of them", lambda row, t: any(f(row, t) for f in SIGNALS.values()))]:
        counts = [sum(flag(row, t) for row in thick) for t in (chosen, own)]
        print(f"| {name} | " + " | ".join(f"{n} of {len(thick)} ({n / len(thick):.0%})" for n in counts) + " |")


def _print_repeatability(rows: list[dict]) -> None:
    """Each side's volume over a head's harmless copies (as acquired, moved, reoriented, resampled): the coefficient
    of variation, as between rescans."""
    volumes: dict[str, dict[str, list[float]]] = {}
    for row in rows:
        if row["group"] == "good" and not row["failed"] and "registration" not in row["variant"]:
            for side in SIDES:
                volumes.setdefault(row["head"], {}).setdefault(side, []).append(row[f"{side}_mm3"])
    variation = [np.std(v) / np.mean(v) for sides in volumes.values() for v in sides.values() if len(v) > 1]
    if variation:
        print(
            f"repeatability over harmless copies: coefficient of variation of a side's volume {100 * np.mean(variation):.2f}% "
            f"on average, at most {100 * np.max(variation):.2f}% ({len(variation)} sides)"
        )


def _score_cli(output_dir: str, config_file: str = "configs/inference.yaml") -> None:
    score(output_dir, config_file)


def _make_cli(images: str, output_dir: str, config_file: str = "configs/inference.yaml", seed: int = 0) -> None:
    make(images, output_dir, config_file, seed)


if __name__ == "__main__":
    import fire

    fire.Fire({"make": _make_cli, "score": _score_cli})
