"""Folder inference that survives bad cases: MONAI's datasets stop at the first unreadable file."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Sequence

from monai.data import Dataset

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def case_name(path: str) -> str:
    """`<case>` of `<case>_seg.nii.gz`: the file name without its extension, or the series folder's name."""
    name = os.path.basename(os.path.normpath(path))
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def output_path(output_dir: str, path: str) -> str:
    return os.path.join(output_dir, f"{case_name(path)}_seg.nii.gz")


def _is_dicom_series(folder: str) -> bool:
    files = [f for f in os.listdir(folder) if os.path.isfile(os.path.join(folder, f))]
    for name in files:
        with open(os.path.join(folder, name), "rb") as f:
            header = f.read(132)
        if header[128:132] == b"DICM" or name.lower().endswith(".dcm"):
            return True
    return False


def check_output_dir(output_dir: str) -> str:
    """Create `output_dir` and make sure it is writable, before any work is done."""
    try:
        os.makedirs(output_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as e:
        raise SystemExit(f"Output folder {output_dir} is not writable: {e.strerror or e}.") from None
    return output_dir


def find_cases(dataset_dir: str, output_dir: str, overwrite: bool = False) -> list[dict[str, str]]:
    """Every NIfTI file and DICOM series folder in `dataset_dir` (or its `imagesTs/` for an MSD task folder).

    Cases whose output already exists are skipped (and logged) unless `overwrite`.
    """
    if not os.path.isdir(dataset_dir):
        raise SystemExit(f"Input folder {dataset_dir} does not exist.")
    if os.path.isfile(os.path.join(dataset_dir, "dataset.json")) and os.path.isdir(os.path.join(dataset_dir, "imagesTs")):
        dataset_dir = os.path.join(dataset_dir, "imagesTs")
    check_output_dir(output_dir)
    cases = []
    for name in sorted(os.listdir(dataset_dir)):
        path = os.path.join(dataset_dir, name)
        if name.startswith("."):
            continue
        if (os.path.isfile(path) and name.endswith(NIFTI_SUFFIXES)) or (os.path.isdir(path) and _is_dicom_series(path)):
            if os.path.exists(output_path(output_dir, path)) and not overwrite:
                logger.warning(f"{name}: skipped, {output_path(output_dir, path)} exists (use --overwrite true).")
                continue
            cases.append({"image": path})
    if not cases:
        logger.warning(f"No NIfTI files or DICOM series to segment in {dataset_dir}.")
    return cases


class PreprocessedCases(Dataset):
    """Applies `transform` to every case up front; a case that fails is kept in `failures`, not raised.

    Args:
        data: case dicts with an `image` path.
        transform: the deterministic preprocessing.
    """

    def __init__(self, data: Sequence[dict], transform: Callable) -> None:
        self.failures: list[tuple[str, str]] = []
        ready = []
        for case in data:
            try:
                ready.append(transform(dict(case)))
            except Exception as e:  # any reader or transform error belongs to this case only
                self.failures.append((case["image"], _reason(e)))
                logger.error(f"{case['image']}: FAILED, {_reason(e)}")
        self.cases = list(data)
        super().__init__(data=ready, transform=None)


def _reason(error: BaseException) -> str:
    """The innermost message of a (possibly MONAI-wrapped) exception."""
    while error.__cause__ is not None:
        error = error.__cause__
    message = str(error).strip().splitlines()
    return f"{type(error).__name__}: {message[-1] if message else 'no message'}"


def run(evaluator, dataset: PreprocessedCases, ckpt_file: str) -> None:
    """Segments the readable cases; weights that do not fit the network end the run naming the mismatched keys."""
    if not len(dataset):
        return
    try:
        evaluator.run()
    except RuntimeError as e:
        if "Error(s) in loading state_dict" not in str(e):
            raise
        raise SystemExit(f"{ckpt_file} does not fit the configured network: {e}") from None


def report(dataset: PreprocessedCases, output_dir: str) -> None:
    """Log one summary line; exit non-zero when any case failed or its mask is missing."""
    failed = list(dataset.failures)
    failed_images = {image for image, _ in failed}
    written = 0
    for case in dataset.cases:
        if case["image"] in failed_images:
            continue
        if os.path.isfile(output_path(output_dir, case["image"])):
            written += 1
        else:
            failed.append((case["image"], "no mask was written"))
    logger.info(f"Inference finished: {written} written, {len(failed)} failed, output in {output_dir}.")
    if failed:
        lines = "\n".join(f"  {image}: {reason}" for image, reason in failed)
        raise SystemExit(f"{len(failed)} case(s) failed:\n{lines}")
