"""Checks every case of an MSD task up front: MONAI loads cases lazily and fails mid-training on the first bad file.

Each image/label pair of dataset.json's `training` list is read once with nibabel and checked for: missing or
unreadable files (e.g. a truncated .nii.gz), non-3D volumes (a 4D volume with a single 3D volume is only a
warning), image/label shape or affine mismatch, label values that are not integers or not keys of dataset.json's
`labels`, NaN/infinite image voxels and constant images.

CLI (from the bundle folder): `python -m scripts.data.check_dataset --dataset_dir DIR` prints a report of every bad case
and exits with status 1 if there is one, else prints "all N cases OK".
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor

import nibabel as nib
import numpy as np
from scripts import BundleError, as_bool
from scripts.data.headers import MAX_VOXELS, HeaderError, check_header
from scripts.data.msd import load_training_list

logger = logging.getLogger(__name__)

AFFINE_ATOL = 1e-3
_MAX_WORKERS = 4  # decompression (zlib) releases the GIL, so threads overlap well


class BadDatasetError(ValueError):
    """dataset.json is missing or invalid, or some of its cases are bad; the message is the full report."""


def _fmt_values(values, limit: int = 8) -> str:
    values = [v.item() if hasattr(v, "item") else v for v in values]
    shown = ", ".join(str(int(v)) if float(v).is_integer() else repr(v) for v in values[:limit])
    return f"[{shown}{', ...' if len(values) > limit else ''}]"


def _read(
    path: str, what: str, errors: list[str], warnings: list[str], max_voxels: int = MAX_VOXELS
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Read one file once, its header checked first (`scripts.data.headers.check_header`); returns (data squeezed to
    3D, affine), or (None, None) when it is unusable as a volume.

    When the data is read but not 3D, returns (None, affine) so the caller can skip shape comparisons.
    """
    if not os.path.isfile(path):
        errors.append(f"{path}: {what} file not found")
        return None, None
    try:
        check_header(path, max_voxels)
    except HeaderError as e:
        errors.append(f"{path}: {what} refused before reading ({e})")
        return None, None
    try:
        img = nib.load(path, mmap=False)
        data = np.asanyarray(img.dataobj)  # the only read of the voxel data (with scl_slope/inter applied)
        affine = np.asarray(img.affine, dtype=float)
    except Exception as e:  # truncated gzip (EOFError, zlib.error), not NIfTI (ImageFileError), bad header, ...
        errors.append(f"{path}: {what} unreadable ({e.__class__.__name__}: {e})")
        return None, None
    shape = tuple(int(s) for s in data.shape)
    if data.ndim > 3 and all(s == 1 for s in shape[3:]):
        warnings.append(f"{path}: {what} is {data.ndim}D with one volume, squeezed (shape {shape})")
        data = data.reshape(shape[:3])
    elif data.ndim != 3:
        extra = " with more than one volume" if data.ndim > 3 else ""
        errors.append(f"{path}: {what} is {data.ndim}D{extra} (shape {shape}), expected 3D")
        return None, affine
    if data.size == 0:
        errors.append(f"{path}: {what} is empty (shape {shape})")
        return None, affine
    if data.dtype.kind not in "biuf":
        errors.append(f"{path}: {what} has unsupported voxel type {data.dtype}")
        return None, affine
    return data, affine


def _check_image(path: str, data: np.ndarray, errors: list[str]) -> None:
    if data.dtype.kind == "f":
        finite = np.isfinite(data)
        if not finite.all():
            n_nan = int(np.isnan(data).sum())
            n_inf = int(finite.size - finite.sum()) - n_nan
            parts = [f"{n} {kind} voxels" for n, kind in ((n_nan, "NaN"), (n_inf, "infinite")) if n]
            errors.append(f"{path}: image has {' and '.join(parts)}")
            data = data[finite]
            if data.size == 0:
                return
    lo, hi = data.min(), data.max()
    if lo == hi:
        errors.append(f"{path}: image is constant (every voxel is {lo.item()!r})")


def _check_label(path: str, data: np.ndarray, labels: set[int], errors: list[str]) -> None:
    if data.dtype.kind in "biu":
        values = np.unique(data)
    else:
        finite = np.isfinite(data)
        if not finite.all():
            errors.append(f"{path}: label has {int(finite.size - finite.sum())} NaN/infinite voxels")
            data = data[finite]
        values = np.unique(data)
        fractional = values[values != np.round(values)]
        if fractional.size:
            errors.append(f"{path}: label has non-integer values {_fmt_values(fractional)}")
            values = values[values == np.round(values)]
    unknown = [v for v in values.tolist() if int(v) not in labels]
    if unknown:
        errors.append(
            f"{path}: label values {_fmt_values(unknown)} are not in dataset.json labels {_fmt_values(sorted(labels))}"
        )


def check_case(case: dict, labels: set[int], max_voxels: int = MAX_VOXELS) -> tuple[list[str], list[str]]:
    """Check one {"image": path, "label": path} case; returns (errors, warnings), each "<file>: <reason>".

    `labels` is the set of allowed label values (the integer keys of dataset.json's `labels`).
    """
    errors: list[str] = []
    warnings: list[str] = []
    labels = {int(v) for v in labels}
    volumes = {}
    for key in ("image", "label"):
        path = case.get(key)
        if not isinstance(path, str) or not path:
            errors.append(f"{case.get('image') or case.get('label') or case!r}: case has no {key!r} path")
            volumes[key] = (None, None)
            continue
        data, affine = _read(path, key, errors, warnings, max_voxels)
        volumes[key] = (data, affine)
        if data is None:
            continue
        try:
            if key == "image":
                _check_image(path, data, errors)
            else:
                _check_label(path, data, labels, errors)
        except Exception as e:  # never let one odd file stop the whole check
            errors.append(f"{path}: {key} could not be checked ({e.__class__.__name__}: {e})")
    (image, image_affine), (label, label_affine) = volumes["image"], volumes["label"]
    if image is not None and label is not None and image.shape != label.shape:
        errors.append(f"{case['label']}: label shape {label.shape} differs from image shape {image.shape}")
    if image_affine is not None and label_affine is not None:
        if not np.allclose(image_affine, label_affine, atol=AFFINE_ATOL):
            diff = float(np.abs(image_affine - label_affine).max())
            errors.append(
                f"{case['label']}: label affine differs from image affine (max abs difference {diff:.4g}):\n"
                f"      image {np.round(image_affine, 4).tolist()}\n      label {np.round(label_affine, 4).tolist()}"
            )
    return errors, warnings


def _read_labels(dataset_dir: str) -> set[int]:
    """Validate dataset.json (exists, valid JSON, has `training` and `labels`); return the allowed label values."""
    path = os.path.join(dataset_dir, "dataset.json")
    if not os.path.isdir(dataset_dir):
        raise FileNotFoundError(f"dataset folder {dataset_dir} does not exist")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found: {dataset_dir} is not an MSD task folder (expected dataset.json, imagesTr/, labelsTr/)"
        )
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadDatasetError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise BadDatasetError(f"{path} must hold a JSON object, got {type(meta).__name__}")
    missing = [key for key in ("training", "labels") if key not in meta]
    if missing:
        raise BadDatasetError(f"{path} has no {' or '.join(repr(k) for k in missing)} entry")
    training, labels = meta["training"], meta["labels"]
    if not isinstance(training, list) or not training:
        raise BadDatasetError(f"{path}: 'training' must be a non-empty list of cases")
    for i, case in enumerate(training):
        if not (isinstance(case, dict) and all(isinstance(case.get(k), str) for k in ("image", "label"))):
            raise BadDatasetError(f'{path}: training[{i}] must be {{"image": path, "label": path}}, got {case!r}')
    if not isinstance(labels, dict) or not labels:
        raise BadDatasetError(f'{path}: \'labels\' must be a non-empty object like {{"0": "background", ...}}')
    try:
        return {int(k) for k in labels}
    except ValueError:
        raise BadDatasetError(f"{path}: 'labels' keys must be integers, got {list(labels)}") from None


def check_dataset(dataset_dir: str, skip_bad_cases: bool = False, max_voxels: int = MAX_VOXELS) -> list[dict]:
    """Check every case of `dataset_dir/dataset.json`'s `training` list; returns the good cases.

    The cases are returned as by `scripts.data.msd.load_training_list` (absolute paths). Warnings are logged. If any case
    is bad, raises `BadDatasetError` with a report of every bad file and why, or, with `skip_bad_cases`, logs the
    dropped cases and returns the others. A missing dataset.json raises FileNotFoundError; an invalid one, or no good
    case left, raises BadDatasetError.
    """
    skip_bad_cases = as_bool(skip_bad_cases)
    dataset_dir = os.path.abspath(os.path.expanduser(str(dataset_dir)))
    labels = _read_labels(dataset_dir)
    cases = load_training_list(dataset_dir)
    workers = max(1, min(_MAX_WORKERS, os.cpu_count() or 1, len(cases)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda case: check_case(case, labels, max_voxels), cases))
    good, bad = [], []
    for case, (errors, warnings) in zip(cases, results):
        for warning in warnings:
            logger.warning(warning)
        if errors:
            bad.append((case, errors))
        else:
            good.append(case)
    if not bad:
        return good
    lines = [f"{len(bad)} of {len(cases)} cases in {dataset_dir} are bad:"]
    lines += [f"  {error}" for _, case_errors in bad for error in case_errors]
    if skip_bad_cases:
        if not good:
            raise BadDatasetError("\n".join(lines + ["no good case left to use"]))
        logger.warning("\n".join(lines + [f"skip_bad_cases: dropped these {len(bad)}, using {len(good)} cases"]))
        return good
    raise BadDatasetError("\n".join(lines + ["fix them or pass --skip_bad_cases true to drop them"]))


def dataset_cases(dataset_dir: str, skip_bad_cases: bool = False, max_voxels: int = MAX_VOXELS) -> list[dict]:
    """`check_dataset` for the configs: a bad dataset ends the run with the report, not a traceback. A dataset folder
    that does not exist gives no cases, so that a config with its default paths loads (MONAI's `check_properties`):
    `require_dataset` stops the run when it starts."""
    if not os.path.exists(os.path.expanduser(str(dataset_dir))):
        return []
    try:
        return check_dataset(dataset_dir, skip_bad_cases, max_voxels)
    except (BadDatasetError, FileNotFoundError) as e:
        raise BundleError(str(e)) from None


def require_dataset(dataset_dir: str) -> None:
    """The first step of a run that reads the task: its folder must exist."""
    if not os.path.exists(os.path.expanduser(str(dataset_dir))):
        raise BundleError(f"dataset folder {os.path.abspath(os.path.expanduser(str(dataset_dir)))} does not exist")


def main(dataset_dir: str) -> None:
    """CLI: report every bad case of `dataset_dir` and exit with status 1 if any, else print "all N cases OK"."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    require_dataset(dataset_dir)
    good = dataset_cases(dataset_dir)
    print(f"all {len(good)} cases OK")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
