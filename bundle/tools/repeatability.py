"""Repeatability of a head's volumes under clinical 2D acquisitions: each head of a folder resliced to 5 mm slices
sagittal, coronal and axial on its own grid, and acquired again as a patient lying supine, on the left or right side
or prone would be (the scanner's axes turned 90 or 180 degrees about the head's superior-inferior axis, a few degrees
of tilt, another slice position; 1 x 1 x 4.8 mm sagittal slices, the header giving the head's true orientation as a
scanner's does). Each copy's per-side volumes and eTIV are compared with the head's as acquired. The copies are cut
from the heads given, so they are made again where the heads are, never committed.

    python -m tools.repeatability --images ../../shared/data/real_heads/images --output_dir /tmp/repeatability
"""

from __future__ import annotations

import csv
import os

import nibabel as nib
import numpy as np
import SimpleITK as sitk  # noqa: N813 (SimpleITK's own convention)
from scripts import BUNDLE_DIR
from scripts.imaging import resample
from scripts.labels import HEAD_LABELS, SIDES, mask_name
from scripts.recipe import load
from tools.head_check import configured_segmenter, rigid, segment_timed

RESLICED_MM = 5.0
POSITION_SLICE_MM = 4.8
PLANES = {"sagittal": 0, "coronal": 1, "axial": 2}  # the world axis across the slices
POSITIONS = {"supine": 0.0, "left_side": 90.0, "right_side": -90.0, "prone": 180.0}  # about superior-inferior
COLUMNS = (
    "head",
    "copy",
    "failed",
    "left_mm3",
    "right_mm3",
    "total_mm3",
    "left_mask_mm3",
    "right_mask_mm3",
    "total_mask_mm3",
    "etiv_mm3",
    "qc",
    "qc_reasons",
)


def _axis_along(direction: np.ndarray, world_axis: int) -> int:
    """The voxel axis of a direction matrix most aligned with the world axis `world_axis` (0 left-right, 1 front-back,
    2 up)."""
    return int(np.argmax(np.abs(direction[world_axis])))


def thick_slices(image: sitk.Image, world_axis: int, slice_mm: float) -> sitk.Image:
    """`image` with `slice_mm` slices across `world_axis` (anti-aliased, `scripts.imaging.resample`), in-plane as
    acquired."""
    spacing = list(image.GetSpacing())
    spacing[_axis_along(np.asarray(image.GetDirection()).reshape(3, 3), world_axis)] = slice_mm
    return resample(image, spacing)


def acquired_again(
    image: sitk.Image, turn_deg: float, tilt_deg, phase_mm: float, slice_mm: float = POSITION_SLICE_MM
) -> sitk.Image:
    """`image` acquired on a scanner whose axes are turned by `turn_deg` about the head's superior-inferior axis and
    tilted by `tilt_deg` (about x, y, z): sampled at 1 mm along the scanner's axes, the slice grid moved by
    `phase_mm`, then `slice_mm` sagittal slices. The header keeps the head where it is in world space."""
    turn = rigid([*tilt_deg[:2], tilt_deg[2] + turn_deg], np.zeros(3))[:3, :3]  # about x, then y, then z
    direction = turn @ np.asarray(image.GetDirection()).reshape(3, 3)
    corners = np.array(
        [
            image.TransformIndexToPhysicalPoint([int(i * (n - 1)) for i, n in zip(corner, image.GetSize())])
            for corner in np.ndindex(2, 2, 2)
        ]
    )
    along = corners @ direction  # each corner's coordinate along the new axes
    low, high = along.min(0), along.max(0)
    low[_axis_along(direction, 0)] += phase_mm
    size = [int(np.ceil(h - lo)) + 1 for lo, h in zip(low, high)]
    fine = sitk.Resample(
        image,
        size,
        sitk.Transform(),
        sitk.sitkLinear,
        (direction @ low).tolist(),
        [1.0] * 3,
        direction.ravel().tolist(),
        0.0,
        sitk.sitkFloat32,
    )
    return thick_slices(fine, 0, slice_mm)


def copies(image: sitk.Image, rng: np.random.Generator) -> dict[str, sitk.Image]:
    """The head as acquired, resliced across each plane, and acquired again in each position."""
    result = {"acquired": image}
    result.update(
        {f"{plane}_{RESLICED_MM:g}mm": thick_slices(image, axis, RESLICED_MM) for plane, axis in PLANES.items()}
    )
    for position, turn in POSITIONS.items():
        tilt = rng.uniform(2.0, 6.0, 3) * rng.choice([-1, 1], 3)
        result[f"{position}_{POSITION_SLICE_MM:g}mm"] = acquired_again(
            image, turn, tilt, rng.uniform(0, POSITION_SLICE_MM)
        )
    return result


def _mask_volumes(mask_file: str) -> dict[str, float]:
    """Each side's volume counted on a written mask's voxels (on the scan's grid)."""
    mask = nib.load(mask_file)
    labels = np.asarray(mask.dataobj)
    voxel = abs(float(np.linalg.det(mask.affine[:3, :3])))
    return {f"{side}_mask_mm3": float(np.isin(labels, HEAD_LABELS[side]).sum()) * voxel for side in SIDES}


def change(value: float, reference: float) -> float:
    """The relative change of `value` from `reference`, percent."""
    return 100.0 * (value - reference) / reference


def spread(values) -> float:
    """(max - min) / median, percent: how far repeated measurements of one thing spread."""
    return 100.0 * (np.max(values) - np.min(values)) / np.median(values)


def run(images: str, output_dir: str, config_file: str = "configs/inference.yaml", seed: int = 0, **overrides) -> list:
    """Writes every head's copies to `output_dir/images`, segments them (`config_file`, config `overrides` such as
    `ckpt_file`), writes `repeatability.csv` and prints the change of each copy from the head as acquired and the
    spread over the four positions."""
    copies_dir, masks = os.path.join(output_dir, "images"), os.path.join(output_dir, "masks")
    os.makedirs(copies_dir, exist_ok=True)
    segmenter = configured_segmenter(config_file, masks, overrides)
    quality = load(BUNDLE_DIR, [config_file], overrides).get_parsed_content("qc")
    rng = np.random.default_rng(seed)
    rows = []
    for name in sorted(os.listdir(images)):
        if not name.endswith((".nii", ".nii.gz", ".mgz")):
            continue
        head = name.split(".")[0]
        for copy, image in copies(sitk.ReadImage(os.path.join(images, name), sitk.sitkFloat32), rng).items():
            case = f"{head}__{copy}"
            path = os.path.join(copies_dir, f"{case}.nii.gz")
            sitk.WriteImage(image, path)
            result = segment_timed(segmenter, path)
            row = {"head": head, "copy": copy, "failed": result.get("failed", "")}
            if not row["failed"]:
                volumes = quality.row(case, os.path.join(masks, mask_name(case)), result, result["confidence"])
                sides = {f"{side}_mm3": volumes.volume(side) for side in SIDES}
                row.update(sides, total_mm3=sum(sides.values()), etiv_mm3=result["etiv_mm3"])
                counted = _mask_volumes(os.path.join(masks, mask_name(case)))
                row.update(counted, total_mask_mm3=sum(counted.values()))
                row.update(qc=volumes.qc, qc_reasons=volumes.qc_reasons)
            rows.append(row)
    with open(os.path.join(output_dir, "repeatability.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    print("Volumes as volumes.csv gives them (a head's 1 mm boxes)")
    _print_table(rows, "")
    print("Volumes counted on the written masks' voxels, for comparison")
    _print_table(rows, "_mask")
    return rows


def _print_table(rows: list[dict], source) -> None:
    by_head: dict[str, dict[str, dict]] = {}
    for row in rows:
        by_head.setdefault(row["head"], {})[row["copy"]] = row
    copy_names = list(next(iter(by_head.values())))[1:]
    print("Change from the head as acquired, %: left / right volume, eTIV; QC")
    print("| head | " + " | ".join(copy_names) + " | positions' spread: total volume / eTIV |")
    print("|---|" + "---|" * (len(copy_names) + 1))
    worst = dict.fromkeys(copy_names, 0.0)
    for head, head_rows in by_head.items():
        reference = head_rows["acquired"]
        cells = []
        for name in copy_names:
            row = head_rows[name]
            if row["failed"] or reference["failed"]:
                cells.append(f"failed: {row['failed'] or reference['failed']}")
                continue
            sides = [change(row[f"{side}{source}_mm3"], reference[f"{side}{source}_mm3"]) for side in SIDES]
            worst[name] = max(worst[name], *np.abs(sides))
            etiv = change(row["etiv_mm3"], reference["etiv_mm3"])
            cells.append(f"{sides[0]:+.1f} / {sides[1]:+.1f}, {etiv:+.1f}; {row['qc']}")
        positions = [head_rows[f"{p}_{POSITION_SLICE_MM:g}mm"] for p in POSITIONS]
        if any(row["failed"] for row in positions):
            cells.append("a position failed")
        else:
            totals, etivs = [row[f"total{source}_mm3"] for row in positions], [row["etiv_mm3"] for row in positions]
            cells.append(f"{spread(totals):.1f} / {spread(etivs):.1f}")
        print(f"| {head} | " + " | ".join(cells) + " |")
    print("| largest per-side change | " + " | ".join(f"{worst[name]:.1f}" for name in copy_names) + " | |")


def _cli(images: str, output_dir: str, config_file: str = "configs/inference.yaml", seed: int = 0, **overrides) -> None:
    run(images, output_dir, config_file, seed, **overrides)  # fire would print the rows it returns


_cli.__doc__ = run.__doc__

if __name__ == "__main__":
    import fire

    fire.Fire(_cli)
