"""Whole heads made from the bundle's MNI152 template: moved, reoriented and resampled copies whose masks must agree
with the template's own once the change is undone."""

import os

import nibabel as nib
import numpy as np
from scipy import ndimage

from conftest import BUNDLE_DIR

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
    """Writes the template and its variants to `folder`; returns {name: how it was changed}."""
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
        heads[name] = (image.get_fdata(dtype=np.float32), image.affine, f"resampled to {spacing} mm")
    for name, (array, affine, _) in heads.items():
        nib.save(nib.Nifti1Image(np.ascontiguousarray(array), affine), os.path.join(folder, f"{name}.nii.gz"))
    return {name: description for name, (_, _, description) in heads.items()}


def in_template_grid(mask_file: str, name: str, seed: int = 0) -> np.ndarray:
    """A variant's mask on the template's voxel grid, its change undone (nearest neighbour)."""
    mask = nib.load(mask_file)
    labels = np.asarray(mask.dataobj)
    template = nib.load(TEMPLATE)
    if name.startswith("moved") or name == "template":
        return labels  # same voxels as the template, only the header moved them
    if name == "lps":
        return labels[::-1, ::-1]
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in template.shape], indexing="ij"), 0).reshape(3, -1)
    to_mask = np.linalg.inv(mask.affine) @ template.affine
    points = to_mask[:3, :3] @ grid + to_mask[:3, 3:]
    return ndimage.map_coordinates(labels, points, order=0, mode="constant").reshape(template.shape)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)
