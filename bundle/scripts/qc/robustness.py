"""The robustness benchmark: Dice of a split's scans under fixed, seeded acquisitions that Task04's single sequence lacks."""

from __future__ import annotations

import csv
import os

import nibabel as nib
import numpy as np
import torch
from scripts import as_bool
from scripts.data.acquisition import simulate_voxel_size
from scripts.labels import PARTS
from scripts.qc.calibration import score_masks, segment_folder, split_cases


def _voxel_size(target_mm: float, axes: tuple[int, ...]):
    def degrade(image: np.ndarray, spacing: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        factors = [target_mm / spacing[a] if a in axes else 1.0 for a in range(3)]
        return simulate_voxel_size(torch.from_numpy(image)[None], factors)[0].numpy()

    return degrade


def slabs(image: np.ndarray, axis: int, width: int, upsampling: str = "linear") -> np.ndarray:
    """`image` as if acquired in slices `width` voxels thick along `axis`, on its own grid: each slab of `width`
    voxels averaged (the last may be thinner), then linearly interpolated between the slabs' centres (constant beyond
    the outer ones) or, with `upsampling` "nearest", repeated over the slab, as a nearest-neighbour reslice leaves a
    thick-slice scan."""
    slices = np.moveaxis(image, axis, 0)
    count = len(slices)
    starts = np.arange(0, count, width)
    means = np.stack([slices[start : start + width].mean(0) for start in starts])
    if upsampling == "nearest":
        resliced = means[np.arange(count) // width]
    else:
        centres = (starts + np.minimum(starts + width, count) - 1) / 2
        position = np.interp(np.arange(count), centres, np.arange(len(starts)))
        below = np.floor(position).astype(int)
        above = np.minimum(below + 1, len(starts) - 1)
        weight = (position - below).reshape(-1, *[1] * (image.ndim - 1))
        resliced = means[below] * (1 - weight) + means[above] * weight
    return np.moveaxis(resliced, 0, axis)


def _slabs(target_mm: float, axis: int, upsampling: str):
    def degrade(image: np.ndarray, spacing: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return slabs(image, axis, max(int(round(target_mm / spacing[axis])), 1), upsampling)

    return degrade


def _bias_field(image: np.ndarray, spacing: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """x0.7 to x1.3 along a random direction."""
    direction = rng.normal(size=3)
    coordinates = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in image.shape], indexing="ij"), -1)
    ramp = coordinates @ (direction / np.linalg.norm(direction))
    return image * (1.0 + 0.3 * ramp / max(np.abs(ramp).max(), 1e-6))


def _noise(image: np.ndarray, spacing: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise of 8% of the 99th percentile."""
    return image + rng.normal(scale=0.08 * np.percentile(image, 99), size=image.shape)


def _gamma(gamma: float):
    def degrade(image: np.ndarray, spacing: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        low, high = image.min(), image.max()
        return ((image - low) / max(high - low, 1e-6)) ** gamma * (high - low) + low

    return degrade


AXES = "xyz"
DEGRADATIONS = {
    "clean": lambda image, spacing, rng: image,
    "2mm": _voxel_size(2.0, (0, 1, 2)),
    **{f"{mm}mm_slices_{AXES[a]}": _voxel_size(float(mm), (a,)) for mm in (3, 5) for a in range(3)},
    "bias_field": _bias_field,
    "noise": _noise,
    "gamma_0.7": _gamma(0.7),
    "gamma_1.5": _gamma(1.5),
    # 5 mm slices as slabs of whole voxels, brought back linearly or by a nearest-neighbour reslice (last, so the
    # rows above keep their seeds)
    **{f"5mm_slabs_{AXES[a]}": _slabs(5.0, a, "linear") for a in range(3)},
    **{f"5mm_slabs_nearest_{AXES[a]}": _slabs(5.0, a, "nearest") for a in range(3)},
}


def chosen_degradations(degradations: str | list[str] | None) -> list[str]:
    """The names of a comma-separated subset of `DEGRADATIONS` (all of them for None); unknown names stop the run."""
    chosen = degradations.split(",") if isinstance(degradations, str) else list(degradations or DEGRADATIONS)
    unknown = sorted(set(chosen) - set(DEGRADATIONS))
    if unknown:
        raise SystemExit(f"unknown degradation(s) {unknown}: choose from {list(DEGRADATIONS)}")
    return chosen


def write_degraded(cases: list[dict[str, str]], degradations: list[str], folder: str, seed: int = 0) -> None:
    """Each case's image degraded by each of `degradations` on its own grid, seeded per case and degradation, as
    `folder/<degradation>/<image's file name>`."""
    for index, case in enumerate(cases):
        scan = nib.load(case["image"])
        image = np.asarray(scan.dataobj, dtype=np.float32)
        spacing = np.asarray(scan.header.get_zooms()[:3], dtype=float)
        for name in degradations:
            rng = np.random.default_rng([seed, index, list(DEGRADATIONS).index(name)])
            degraded = DEGRADATIONS[name](image, spacing, rng).astype(np.float32)
            os.makedirs(os.path.join(folder, name), exist_ok=True)
            nib.save(
                nib.Nifti1Image(degraded, scan.affine), os.path.join(folder, name, os.path.basename(case["image"]))
            )


def robustness(
    dataset_dir: str,
    split: str = "validation",
    output_dir: str = "eval/robustness",
    cases: int | None = None,
    degradations: str | list[str] | None = None,
    ckpt_file: str | None = None,
    ensemble: bool = True,
    seed: int = 0,
) -> None:
    """Degrades each of a split's scans on its own grid (`DEGRADATIONS`, seeded per case), segments them all with
    configs/inference.yaml (the crops' ensemble; the single model with `ensemble` False; `ckpt_file`'s weights alone
    when given) and prints Dice per class per degradation, against each case's own label; writes `robustness.csv`
    (the table) and `robustness_cases.csv` (per case) in `output_dir`.

    Args:
        cases: only the split's first `cases` scans.
        degradations: a comma-separated subset of `DEGRADATIONS` (all by default).
    """
    chosen = chosen_degradations(degradations)
    chosen_cases = split_cases(os.path.abspath(dataset_dir), split)[:cases]
    images, masks = os.path.join(output_dir, "images"), os.path.join(output_dir, "masks")
    write_degraded(chosen_cases, chosen, images, seed)
    segment_folder(
        images,
        masks,
        "--recursive",
        "true",
        "--ensemble",
        str(as_bool(ensemble) and not ckpt_file).lower(),  # other weights are one model's
        *(["--ckpt_file", os.path.abspath(ckpt_file)] if ckpt_file else []),
    )

    scored = {name: score_masks(chosen_cases, masks, name) for name in chosen}
    per_case = [
        {
            "degradation": name,
            "case": os.path.basename(case["image"]),
            **{f"dice_{part}": scored[name][index][f"dice_{part}"] for part in PARTS},
        }
        for index, case in enumerate(chosen_cases)
        for name in chosen
    ]
    table = []
    for name in chosen:
        rows = [r for r in per_case if r["degradation"] == name]
        table.append(
            {
                "degradation": name,
                "cases": len(rows),
                **{f"dice_{part}": round(float(np.mean([r[f"dice_{part}"] for r in rows])), 4) for part in PARTS},
            }
        )
    clean = next((row for row in table if row["degradation"] == "clean"), None)
    for row in table:
        for part in PARTS:
            row[f"change_{part}"] = round(row[f"dice_{part}"] - clean[f"dice_{part}"], 4) if clean else ""
    for file_name, rows in (("robustness.csv", table), ("robustness_cases.csv", per_case)):
        with open(os.path.join(output_dir, file_name), "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    print(f"{'degradation':<20} {'cases':>5} " + " ".join(f"{'dice_' + p:>15} {'change':>7}" for p in PARTS))
    for row in table:
        print(
            f"{row['degradation']:<20} {row['cases']:>5} "
            + " ".join(f"{row['dice_' + p]:>15.4f} {row['change_' + p]:>7}" for p in PARTS)
        )
