"""Whole-head consistency check: there are no labelled heads to score against, so this measures what can be measured,
the agreement of the masks of moved, reoriented and resampled copies of the MNI152 template with the template's own
mask once each change is undone, and the time of each step.

    python -m scripts.head_check --output_dir /tmp/head_check

writes the copies and their masks under `output_dir` and prints one table row per copy.
"""

from __future__ import annotations

import os
import time

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

BUNDLE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATE = os.path.join(BUNDLE_DIR, "atlas", "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
SIDE_LABELS = {"left": [1, 2], "right": [3, 4]}


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
    mask = nib.load(os.path.join(BUNDLE_DIR, "atlas", "mni_icbm152_head_mask_2mm.nii.gz"))
    to_mask = np.linalg.inv(mask.affine) @ template.affine
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in data.shape], indexing="ij"), 0).reshape(3, -1)
    brain = ndimage.map_coordinates((np.asarray(mask.dataobj) == 2).astype(np.float32),
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


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


def check(output_dir: str, config_file: str = "configs/inference.yaml", seed: int = 0) -> list[dict]:
    """Segments the template and its copies with the configured head segmenter; prints and returns one row each."""
    from monai.bundle import ConfigParser

    inputs, masks = os.path.join(output_dir, "heads"), os.path.join(output_dir, "masks")
    descriptions = make_heads(inputs, seed)
    descriptions.update(make_harder_heads(inputs, seed))
    parser = ConfigParser()
    parser.read_config(config_file)
    parser["output_dir"] = masks
    parser["head#segmenter#data_root_dir"] = ""  # no input folder to mirror
    network = parser.get_parsed_content("network")
    network.load_state_dict(torch.load(parser.get_parsed_content("ckpt_file"), map_location="cpu"))
    segmenter = parser.get_parsed_content("head#segmenter")
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
        for side, side_labels in SIDE_LABELS.items():
            row[f"dice_{side}"] = dice(np.isin(labels, side_labels), np.isin(reference, side_labels))
        steps = " / ".join(f"{row[k]:.2f}" for k in ("read_s", "registration_s", "segmentation_s", "writing_s"))
        print(f"| {row['name']} | {row['change']} | {row['dice_left']:.3f} / {row['dice_right']:.3f} | "
              f"{row['etiv_mm3'] / 1000:.0f} | {steps} | {row['total_s']:.2f} |")
    return rows


def _cli(output_dir: str, config_file: str = "configs/inference.yaml", seed: int = 0) -> None:
    check(output_dir, config_file, seed)  # prints the table once (fire would echo the rows again)


if __name__ == "__main__":
    import fire

    fire.Fire(_cli)
