"""Synthetic hippocampus-like MSD Task04 data, so the bundle can be demoed and tested offline without the real data."""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
from scripts.labels import CLASS_NAMES

# per-axis size ranges of the real Task04_Hippocampus volumes (inclusive)
SHAPE_MIN = (31, 40, 24)
SHAPE_MAX = (43, 59, 47)
# dataset.json's label names, as MSD writes them
LABELS = {str(label): name if label == 0 else name.capitalize() for label, name in enumerate(CLASS_NAMES)}


def _smooth_field(rng: np.random.Generator, grids, shape, n_waves: int = 4) -> np.ndarray:
    """Sum of a few random low-frequency cosines: a smooth field with values roughly in [-1, 1]."""
    field = np.zeros(shape, dtype=np.float32)
    for _ in range(n_waves):
        freq = rng.uniform(0.5, 2.0, size=3) * 2 * np.pi / np.asarray(shape)
        phase = rng.uniform(0, 2 * np.pi)
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        arg = sum(float(freq[a] * direction[a]) * grids[a] for a in range(3)) + phase
        field += np.cos(arg).astype(np.float32)
    return field / n_waves


def _centre_line(rng: np.random.Generator, s: np.ndarray, s_line: np.ndarray, n: int, margin: float) -> np.ndarray:
    """Random tilted + curved centre-line coordinate along one axis, placed so the tube stays inside [0, n)."""
    tilt, bend = rng.uniform(-3.0, 3.0), rng.uniform(-5.0, 5.0)
    dev_line = tilt * s_line + bend * (s_line**2 - 1.0 / 3.0)
    room = n - 2 * margin
    spread = dev_line.max() - dev_line.min()
    scale = 1.0 if spread <= room else max(room, 0.0) / spread
    lo, hi = margin - scale * dev_line.min(), n - margin - scale * dev_line.max()
    c0 = rng.uniform(lo, hi) if hi > lo else n / 2.0
    return c0 + scale * (tilt * s + bend * (s**2 - 1.0 / 3.0))


def _make_case(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One case: (float32 image, uint8 label, 4x4 affine)."""
    shape = tuple(int(rng.integers(lo, hi + 1)) for lo, hi in zip(SHAPE_MIN, SHAPE_MAX))
    grids = np.meshgrid(*(np.arange(s, dtype=np.float32) for s in shape), indexing="ij")
    x, y, z = grids
    nx, ny, nz = shape

    # --- background tissue: base level, smooth bias field, a dark CSF-like band, a brighter blob
    base = rng.uniform(300.0, 800.0)
    image = base * (1.0 + 0.25 * _smooth_field(rng, grids, shape))
    normal = rng.normal(size=3)
    normal /= np.linalg.norm(normal)
    offset = rng.uniform(-0.5, 0.5) * min(shape)
    dist = normal[0] * (x - nx / 2) + normal[1] * (y - ny / 2) + normal[2] * (z - nz / 2) - offset
    band = np.exp(-(dist**2) / (2 * rng.uniform(1.5, 3.5) ** 2))
    image *= 1.0 - rng.uniform(0.4, 0.8) * band
    blob_c = rng.uniform(0, 1, size=3) * np.asarray(shape)
    blob_r = rng.uniform(4, 9)
    blob = np.exp(-((x - blob_c[0]) ** 2 + (y - blob_c[1]) ** 2 + (z - blob_c[2]) ** 2) / (2 * blob_r**2))
    image *= 1.0 + rng.uniform(0.1, 0.4) * blob

    # --- the structure: a curved, tapering elliptical tube running along axis 1 (y)
    length = rng.uniform(0.65, 0.85) * ny
    y0 = rng.uniform(2.0, ny - 2.0 - length)
    s = np.clip((y - y0) / length, -0.2, 1.2) * 2.0 - 1.0  # -1 (front end) .. 1 (back end) inside the tube
    r_head = rng.uniform(5.0, 7.5)  # anterior end (hippocampal head) is thicker
    r_tail = r_head * rng.uniform(0.55, 0.9)
    radius = r_head + (r_tail - r_head) * (s + 1.0) / 2.0
    flat = rng.uniform(0.65, 1.0)  # elliptical cross-section
    ang = rng.uniform(0, np.pi)
    s_line = np.linspace(-1.0, 1.0, 41)
    cx = _centre_line(rng, s, s_line, nx, r_head + 1.0)
    cz = _centre_line(rng, s, s_line, nz, r_head + 1.0)
    dx, dz = x - cx, z - cz
    u = dx * np.cos(ang) + dz * np.sin(ang)
    v = -dx * np.sin(ang) + dz * np.cos(ang)
    rho = np.sqrt((u / radius) ** 2 + (v / (radius * flat)) ** 2)  # 1 on the tube surface
    ends = np.abs((y - y0) / length * 2.0 - 1.0)  # 1 at the tube's ends
    d = (rho**4 + ends**4) ** 0.25  # tube with rounded ends
    inside = d < 1.0
    split = y0 + length * rng.uniform(0.35, 0.55)
    label = np.zeros(shape, dtype=np.uint8)
    label[inside & (y < split)] = 1
    label[inside & (y >= split)] = 2

    # structure intensity: darker than surrounding tissue, slightly different front/back, soft edges
    contrast = rng.uniform(0.55, 0.85)
    front_back = np.where(y < split, 1.0, rng.uniform(0.93, 1.07))
    soft = 1.0 / (1.0 + np.exp((d - 1.0) / 0.12))
    image = (
        image * (1.0 - soft) + base * contrast * front_back * (1.0 + 0.1 * _smooth_field(rng, grids, shape, 2)) * soft
    )

    # --- noise
    image += rng.normal(0.0, rng.uniform(0.03, 0.1) * base, size=shape)
    image = np.clip(image, 0.0, None).astype(np.float32)

    affine = np.eye(4)
    affine[:3, 3] = np.round(rng.uniform(-20.0, 20.0, size=3), 1)  # 1 mm spacing, per-case origin
    return image, label, affine


def _save(arr: np.ndarray, affine: np.ndarray, path: str) -> None:
    img = nib.Nifti1Image(arr, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, path)


def make_synthetic_dataset(output_dir: str, num_cases: int = 24, seed: int = 0) -> str:
    """Write an MSD-format Task04_Hippocampus-like folder with `num_cases` training cases (plus a few test images).

    Each case is drawn from its own generator seeded by (seed, case index), so a case does not depend on num_cases.
    Returns the output directory.
    """
    num_cases = int(num_cases)
    if num_cases < 1:
        raise ValueError(f"num_cases must be >= 1, got {num_cases}")
    output_dir = os.path.abspath(os.path.expanduser(str(output_dir)))
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        os.makedirs(os.path.join(output_dir, sub), exist_ok=True)
    num_test = max(2, num_cases // 8)
    training, test = [], []
    for idx in range(1, num_cases + num_test + 1):
        image, label, affine = _make_case(np.random.default_rng([int(seed), idx]))
        name = f"hippocampus_{idx:03d}.nii.gz"
        if idx <= num_cases:
            _save(image, affine, os.path.join(output_dir, "imagesTr", name))
            _save(label, affine, os.path.join(output_dir, "labelsTr", name))
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        else:
            _save(image, affine, os.path.join(output_dir, "imagesTs", name))
            test.append(f"./imagesTs/{name}")
    meta = {
        "name": "Hippocampus",
        "description": "Synthetic hippocampus-like volumes (anterior/posterior) for offline demos and tests",
        "reference": "Synthetic, generated by scripts/data/synthetic.py",
        "licence": "CC0 (synthetic data)",
        "release": f"synthetic seed={int(seed)}",
        "tensorImageSize": "3D",
        "modality": {"0": "MRI"},
        "labels": LABELS,
        "numTraining": len(training),
        "numTest": len(test),
        "training": training,
        "test": test,
    }
    with open(os.path.join(output_dir, "dataset.json"), "w") as f:
        json.dump(meta, f, indent=4)
    return output_dir


if __name__ == "__main__":
    import fire

    fire.Fire(make_synthetic_dataset)
