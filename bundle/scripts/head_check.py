"""Whole-head checks. There are no labelled heads here, so `check` measures what can be measured: the agreement of the
masks of moved, reoriented, resampled and degraded copies of the MNI152 template with the template's own mask once
each change is undone, and the time of each step. `compare` scores head masks against another tool's segmentations
(FreeSurfer's or FastSurfer's aseg by default), for whoever has them.

    python -m scripts.head_check check --output_dir /tmp/head_check
    python -m scripts.head_check compare --masks OUT --reference REF --reference_suffix /aseg.mgz
"""

from __future__ import annotations

import os
import time

import nibabel as nib
import numpy as np
from scipy import ndimage

from scripts import BUNDLE_DIR
from scripts.head import HEAD_LABELS, configured_segmenter
from scripts.qc import dice

TEMPLATE = os.path.join(BUNDLE_DIR, "atlas", "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")


def rigid(angles_deg, translation) -> np.ndarray:
    """A 4x4 world (RAS mm) rotation about the template's centre, then translation."""
    rotation = np.eye(3)
    for axis, angle in enumerate(np.deg2rad(angles_deg)):
        c, s = np.cos(angle), np.sin(angle)
        i, j = [a for a in range(3) if a != axis]
        turn = np.eye(3)
        turn[i, i], turn[i, j], turn[j, i], turn[j, j] = c, -s, s, c
        rotation = turn @ rotation
    centre = np.array([0.0, -18.0, 18.0])
    matrix = np.eye(4)
    matrix[:3, :3] = rotation
    matrix[:3, 3] = centre - rotation @ centre + np.asarray(translation, dtype=float)
    return matrix


def resampled(image: nib.Nifti1Image, spacing) -> nib.Nifti1Image:
    """`image` on a grid of `spacing` mm over the same field of view (trilinear, anti-aliased)."""
    data = np.asarray(image.dataobj, dtype=np.float32)
    zoom = np.asarray(image.header.get_zooms()[:3]) / np.asarray(spacing, dtype=float)
    smoothed = ndimage.gaussian_filter(data, sigma=np.maximum(1 / zoom - 1, 0) / 2)
    affine = image.affine.copy()
    affine[:3, :3] = image.affine[:3, :3] @ np.diag(1 / zoom)
    affine[:3, 3] = nib.affines.apply_affine(image.affine, (1 / zoom - 1) / 2)  # keep the field of view centred
    return nib.Nifti1Image(ndimage.zoom(smoothed, zoom, order=1).astype(np.float32), affine)


def make_heads(folder: str, seed: int = 0) -> dict[str, str]:
    """Writes the template and its copies to `folder`: two under random rotations (up to 15 degrees) and translations
    (up to 20 mm) of the header, one in LPS voxel order, one anisotropic, one at 2 mm. Returns {name: the change}."""
    os.makedirs(folder, exist_ok=True)
    template = nib.load(TEMPLATE)
    data = np.asarray(template.dataobj, dtype=np.float32)
    rng = np.random.default_rng(seed)
    heads = {"template": (data, template.affine, "the template itself")}
    for i in range(2):
        angles, shift = rng.uniform(-15, 15, 3), rng.uniform(-20, 20, 3)
        heads[f"moved{i}"] = (data, rigid(angles, shift) @ template.affine,
                              f"rotated {np.round(angles, 1).tolist()} deg, moved {np.round(shift, 1).tolist()} mm")
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    lps[:2, 3] = np.array(data.shape[:2]) - 1
    heads["lps"] = (data[::-1, ::-1], template.affine @ lps, "stored in LPS voxel order")
    for name, spacing in (("aniso", (0.9, 1.0, 1.6)), ("2mm", (2.0, 2.0, 2.0))):
        image = resampled(template, spacing)
        heads[name] = (image.get_fdata(dtype=np.float32), image.affine, f"resampled to {list(spacing)} mm")
    for name, (array, affine, _) in heads.items():
        nib.save(nib.Nifti1Image(np.ascontiguousarray(array), affine), os.path.join(folder, f"{name}.nii.gz"))
    return {name: description for name, (_, _, description) in heads.items()}


NECK_MM = 120
TOP_KEPT_MM = 150


def make_harder_heads(folder: str, seed: int = 0) -> dict[str, str]:
    """Copies with what real scans add: a bias field, other contrast and noise, a neck, a cut-off top, smaller and
    larger heads, a large tilt far from the scanner's origin; and two that must fail: noise, inverted contrast."""
    template = nib.load(TEMPLATE)
    data = np.asarray(template.dataobj, dtype=np.float32)
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in data.shape], indexing="ij")
    bias = np.exp(0.35 * (0.8 * grids[0] + 0.5 * grids[1] - 0.7 * grids[2] + 0.4 * grids[0] * grids[2]))
    below = data[:, :, NECK_MM // 2:0:-1]
    mask = nib.load(os.path.join(BUNDLE_DIR, "atlas", "mni_icbm152_brain_mask_2mm.nii.gz"))
    to_mask = np.linalg.inv(mask.affine) @ template.affine
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in data.shape], indexing="ij"), 0).reshape(3, -1)
    brain = ndimage.map_coordinates((np.asarray(mask.dataobj) > 0).astype(np.float32),
                                    to_mask[:3, :3] @ grid + to_mask[:3, 3:], order=1).reshape(data.shape) > 0.5
    brain = ndimage.binary_fill_holes(ndimage.binary_dilation(brain, iterations=2))
    neck_affine = template.affine.copy()
    neck_affine[2, 3] -= NECK_MM
    heads = {
        "bias": (data * bias, template.affine, "bias field, up to x2 across the head"),
        "contrast": ((data / 255) ** 1.5 * 1000 + np.abs(rng.normal(0, 25, data.shape)), template.affine,
                     "gamma 1.5 and noise"),
        "neck": (np.concatenate([below * 0.9, below * 0.8, data], 2), neck_affine, f"{NECK_MM} mm of 'neck' below"),
        "cut_top": (data[:, :, :TOP_KEPT_MM], template.affine, f"only the lowest {TOP_KEPT_MM} mm"),
        "tilted_far": (data, rigid([25, -10, 5], [40, -60, 80]) @ template.affine, "rotated 25 deg, 110 mm away"),
        "pitched35": (data, rigid([35, 0, 0], [0, 0, 0]) @ template.affine, "nodded 35 deg"),
        "turned40": (data, rigid([0, 0, 40], [0, 0, 0]) @ template.affine, "turned 40 deg"),
        "skull_stripped": (data * brain, template.affine, "brain only, skull and scalp removed"),
    }
    for scale in (0.88, 1.08):
        scaled = template.affine.copy()
        scaled[:3] *= scale
        heads[f"scaled{scale}"] = (data, scaled, f"head scaled x{scale}")
    axial = resampled(template, (0.5, 0.5, 5.0))
    heads["axial_5mm"] = (axial.get_fdata(dtype=np.float32), axial.affine, "clinical axial, 0.5x0.5x5 mm")
    heads["noise"] = (rng.random((160, 192, 160)).astype(np.float32) * 100, np.eye(4), "noise (must fail)")
    heads["inverted"] = (255 - data, template.affine, "inverted contrast, T2-like (must fail)")
    for name, (array, affine, _) in heads.items():
        nib.save(nib.Nifti1Image(np.ascontiguousarray(array, dtype=np.float32), affine),
                 os.path.join(folder, f"{name}.nii.gz"))
    return {name: description for name, (_, _, description) in heads.items()}


def in_template_grid(mask_file: str, name: str) -> np.ndarray:
    """A copy's mask on the template's voxel grid with its change undone (nearest neighbour in world space for
    resampled copies)."""
    mask = nib.load(mask_file)
    labels = np.asarray(mask.dataobj)
    if name in ("template", "bias", "contrast", "tilted_far", "pitched35", "turned40", "skull_stripped") or \
            name.startswith(("moved", "scaled")):
        return labels  # the template's voxels: only the header moved them
    if name == "lps":
        return labels[::-1, ::-1]
    if name == "neck":
        return labels[:, :, NECK_MM:]
    if name == "cut_top":
        return np.pad(labels, [(0, 0), (0, 0), (0, nib.load(TEMPLATE).shape[2] - labels.shape[2])])
    template = nib.load(TEMPLATE)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in template.shape], indexing="ij"), 0).reshape(3, -1)
    to_mask = np.linalg.inv(mask.affine) @ template.affine
    points = to_mask[:3, :3] @ grid + to_mask[:3, 3:]
    return ndimage.map_coordinates(labels, points, order=0, mode="constant").reshape(template.shape)


def check(output_dir: str, config_file: str = "configs/inference.yaml", seed: int = 0) -> list[dict]:
    """Segments the template and its copies with the configured head segmenter; prints and returns one row each."""
    inputs, masks = os.path.join(output_dir, "heads"), os.path.join(output_dir, "masks")
    descriptions = make_heads(inputs, seed)
    descriptions.update(make_harder_heads(inputs, seed))
    segmenter = configured_segmenter(config_file, masks)
    rows = []
    for name, description in descriptions.items():
        start = time.perf_counter()
        try:
            result = segmenter(os.path.join(inputs, f"{name}.nii.gz"))
        except ValueError as e:
            result = {"failed": str(e)}
        rows.append({"name": name, "change": description, "total_s": time.perf_counter() - start, **result})
    reference = in_template_grid(os.path.join(masks, "template_seg.nii.gz"), "template")
    print("| copy | change | Dice left / right | eTIV cm3 | read / registration / segmentation / writing s | total s |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        if "failed" in row:
            print(f"| {row['name']} | {row['change']} | failed: {row['failed']} | | | {row['total_s']:.2f} |")
            continue
        labels = in_template_grid(os.path.join(masks, f"{row['name']}_seg.nii.gz"), row["name"])
        for side, side_labels in HEAD_LABELS.items():
            row[f"dice_{side}"] = dice(np.isin(labels, side_labels), np.isin(reference, side_labels))
        steps = " / ".join(f"{row[k]:.2f}" for k in ("read_s", "registration_s", "segmentation_s", "writing_s"))
        print(f"| {row['name']} | {row['change']} | {row['dice_left']:.3f} / {row['dice_right']:.3f} | "
              f"{row['etiv_mm3'] / 1000:.0f} | {steps} | {row['total_s']:.2f} |")
    return rows


def compare(masks: str, reference: str, reference_suffix: str = ".nii.gz", left_labels=(17,),
            right_labels=(53,)) -> list[dict]:
    """Dice per side (whole hippocampus) and volumes of each head mask `masks/<case>_seg.nii.gz` against
    `reference/<case><reference_suffix>`, whose `left_labels` and `right_labels` mark the hippocampi (FreeSurfer's and
    FastSurfer's aseg: 17 and 53). The reference is resampled to the mask's grid (nearest neighbour, world space)."""
    left_labels, right_labels = (np.atleast_1d(labels).astype(int).tolist() for labels in (left_labels, right_labels))
    rows = []
    for folder, _, files in sorted(os.walk(masks)):
        for name in sorted(f for f in files if f.endswith("_seg.nii.gz")):
            mask_file = os.path.join(folder, name)
            case = os.path.relpath(mask_file, masks)[: -len("_seg.nii.gz")]
            reference_file = os.path.join(reference, case + reference_suffix)
            if not os.path.isfile(reference_file):
                continue
            mask, truth = nib.load(mask_file), nib.load(reference_file)
            labels = np.asarray(mask.dataobj)
            if labels.max() <= 2:
                continue  # a crop's mask has no sides
            truth_labels = np.asarray(truth.dataobj)
            row = {"case": case}
            for side, ours, theirs in (("left", [1, 2], left_labels), ("right", [3, 4], right_labels)):
                inside = np.isin(truth_labels, theirs)
                mapped = _nearest_on_grid(inside, truth.affine, mask.affine, labels.shape)
                predicted = np.isin(labels, ours)
                voxel = abs(np.linalg.det(mask.affine[:3, :3]))
                row.update({f"dice_{side}": dice(predicted, mapped), f"{side}_mm3": float(predicted.sum() * voxel),
                            f"{side}_reference_mm3": float(inside.sum() * abs(np.linalg.det(truth.affine[:3, :3])))})
            rows.append(row)
    print("| case | Dice left / right | volume left / right mm3 | reference left / right mm3 |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['case']} | {row['dice_left']:.3f} / {row['dice_right']:.3f} | {row['left_mm3']:.0f} / "
              f"{row['right_mm3']:.0f} | {row['left_reference_mm3']:.0f} / {row['right_reference_mm3']:.0f} |")
    if rows:
        print(f"mean Dice left / right: {np.mean([r['dice_left'] for r in rows]):.3f} / "
              f"{np.mean([r['dice_right'] for r in rows]):.3f} over {len(rows)} heads")
    return rows


def _nearest_on_grid(inside: np.ndarray, affine: np.ndarray, target_affine: np.ndarray, shape) -> np.ndarray:
    """`inside` (a boolean image with `affine`) on the grid of `target_affine` and `shape`, nearest neighbour, computed
    only in the target box that holds it."""
    result = np.zeros(shape, dtype=bool)
    points = np.argwhere(inside)
    if not len(points):
        return result
    to_target = np.linalg.inv(target_affine) @ affine
    corners = nib.affines.apply_affine(to_target, np.array([points.min(0), points.max(0)]))
    start = np.clip(np.floor(corners.min(0)).astype(int) - 1, 0, shape)
    stop = np.clip(np.ceil(corners.max(0)).astype(int) + 2, 0, shape)
    grid = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(start, stop)], indexing="ij"), -1).reshape(-1, 3)
    source = np.rint(nib.affines.apply_affine(np.linalg.inv(to_target), grid)).astype(int)
    valid = np.all((source >= 0) & (source < inside.shape), axis=1)
    values = np.zeros(len(grid), dtype=bool)
    values[valid] = inside[tuple(source[valid].T)]
    result[tuple(slice(a, b) for a, b in zip(start, stop))] = values.reshape(*(stop - start))
    return result


def _check_cli(output_dir: str, config_file: str = "configs/inference.yaml", seed: int = 0) -> None:
    check(output_dir, config_file, seed)  # prints the table once (fire would echo the rows again)


def _compare_cli(masks: str, reference: str, reference_suffix: str = ".nii.gz", left_labels=(17,),
                 right_labels=(53,)) -> None:
    compare(masks, reference, reference_suffix, left_labels, right_labels)


if __name__ == "__main__":
    import fire

    fire.Fire({"check": _check_cli, "compare": _compare_cli})
