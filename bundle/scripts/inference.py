"""Folder inference that survives bad cases: MONAI's datasets stop at the first unreadable file."""

from __future__ import annotations

import csv
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence

import nibabel as nib
import numpy as np
from monai.data import Dataset
from monai.handlers import CheckpointLoader
from monai.utils import look_up_option

from scripts import atomic_write
from scripts.head import HEAD_LABELS, input_kind

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


def split_by_kind(cases: Sequence[dict], kind: str = "auto") -> dict[str, list[dict]]:
    """Crop and head cases: by field of view (`scripts.head.input_kind`) for `auto`, or all of one `kind`."""
    kind = look_up_option(str(kind), ("auto", "crop", "head"))
    split: dict[str, list[dict]] = {"crop": [], "head": []}
    for case in cases:
        split[input_kind(case["image"]) if kind == "auto" else kind].append(case)
    return split


class HeadCases:
    """Whole-head cases, segmented one at a time by `segmenter` (`scripts.head.HeadSegmenter`); a case that fails
    is kept in `failures` with its reason, and the others go on."""

    def __init__(self, data: Sequence[dict], segmenter: Callable[[str], dict]) -> None:
        self.cases = list(data)
        self.segmenter = segmenter
        self.failures: list[tuple[str, str]] = []
        self.results: dict[str, dict] = {}

    def __len__(self) -> int:
        return len(self.cases)

    def run(self) -> None:
        for case in self.cases:
            image = case["image"]
            try:
                start = time.perf_counter()
                result = self.segmenter(image)
            except Exception as e:  # any reader, registration or segmentation error belongs to this case only
                self.failures.append((image, _reason(e)))
                logger.error(f"{image}: FAILED, {_reason(e)}")
                continue
            self.results[image] = result
            split = ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in result.items() if k.endswith("_s"))
            logger.info(f"{image}: head segmented in {time.perf_counter() - start:.1f} s ({split}), "
                        f"eTIV {result['etiv_mm3'] / 1000:.0f} cm3, mutual information {result['mutual_information']:.2f}, "
                        f"correlation {result['correlation']:.2f}")


def run(evaluator, dataset: PreprocessedCases, ckpt_file: str, heads: HeadCases | None = None,
        handlers: Sequence = ()) -> None:
    """Segments the readable crops through `evaluator`, then the heads; weights that do not fit the network end the
    run naming the mismatched keys. `handlers`' checkpoint loaders load the weights when no crop ran."""
    try:
        if len(dataset):
            evaluator.run()
        if heads is not None and len(heads):
            if not len(dataset):
                for handler in handlers:
                    if isinstance(handler, CheckpointLoader):
                        handler(evaluator)
            heads.run()
    except RuntimeError as e:
        if "Error(s) in loading state_dict" not in str(e):
            raise
        raise SystemExit(f"{ckpt_file} does not fit the configured network: {e}") from None


def report(dataset: PreprocessedCases, output_dir: str, heads: HeadCases | None = None, dataset_dir: str = "") -> None:
    """Write `volumes.csv`, log one summary line; exit non-zero when any case failed or its mask is missing."""
    heads = heads if heads is not None else HeadCases([], lambda image: {})
    failed = list(dataset.failures) + list(heads.failures)
    failed_images = {image for image, _ in failed}
    written = []
    for case in dataset.cases + heads.cases:
        if case["image"] in failed_images:
            continue
        if os.path.isfile(output_path(output_dir, case["image"])):
            written.append(case["image"])
        else:
            failed.append((case["image"], "no mask was written"))
    write_volumes(output_dir, dataset_dir, written, heads.results)
    logger.info(f"Inference finished: {len(written)} written, {len(failed)} failed, output in {output_dir}.")
    if failed:
        lines = "\n".join(f"  {image}: {reason}" for image, reason in failed)
        raise SystemExit(f"{len(failed)} case(s) failed:\n{lines}")


VOLUME_COLUMNS = ["case", "kind", "anterior_mm3", "posterior_mm3", "total_mm3",
                  *(f"{side}_{part}_mm3" for side in HEAD_LABELS for part in ("anterior", "posterior", "total")),
                  "etiv_mm3"]


def mask_volumes(mask_file: str) -> dict[str, float]:
    """Volumes (mm3) of each label of a written mask: voxel count times the voxel volume of its affine.
    Labels 3 and 4 (right side) make it a head mask; a crop mask has 1 anterior and 2 posterior only."""
    mask = nib.load(mask_file)
    counts = np.bincount(np.asarray(mask.dataobj, dtype=np.uint8).ravel(), minlength=5)
    voxel = abs(float(np.linalg.det(mask.affine[:3, :3])))
    return {label: float(counts[label]) * voxel for label in range(1, 5)}


def volume_row(case: str, mask_file: str, head: dict | None) -> dict[str, str]:
    """One `volumes.csv` row; `head` is the head segmenter's result, None for a crop."""
    volumes = mask_volumes(mask_file)
    row = {"case": case, "kind": "head" if head is not None else "crop"}
    if head is None:
        anterior, posterior = volumes[1], volumes[2]
    else:
        for side, (anterior_label, posterior_label) in HEAD_LABELS.items():
            row[f"{side}_anterior_mm3"] = f"{volumes[anterior_label]:.1f}"
            row[f"{side}_posterior_mm3"] = f"{volumes[posterior_label]:.1f}"
            row[f"{side}_total_mm3"] = f"{volumes[anterior_label] + volumes[posterior_label]:.1f}"
        anterior, posterior = volumes[1] + volumes[3], volumes[2] + volumes[4]
        row["etiv_mm3"] = f"{head['etiv_mm3']:.0f}"
    row.update(anterior_mm3=f"{anterior:.1f}", posterior_mm3=f"{posterior:.1f}", total_mm3=f"{anterior + posterior:.1f}")
    return row


def write_volumes(output_dir: str, dataset_dir: str, written: Sequence[str], head_results: dict[str, dict]) -> None:
    """`output_dir/volumes.csv`, written atomically: a row for each mask written now, and the earlier rows of cases
    whose mask is still on disk (skipped because it existed)."""
    path = os.path.join(output_dir, "volumes.csv")
    root = dataset_dir if os.path.isdir(dataset_dir) else os.path.commonpath(written) if written else ""
    rows = {}
    if os.path.isfile(path):
        with open(path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                if os.path.isfile(output_path(output_dir, row["case"])):
                    rows[row["case"]] = row
    for image in written:
        case = os.path.relpath(image, root) if root else image
        rows[case] = volume_row(case, output_path(output_dir, image), head_results.get(image))
    if not rows:
        return
    with atomic_write(path, "w") as f:
        table = csv.DictWriter(f, fieldnames=VOLUME_COLUMNS, restval="", extrasaction="ignore", lineterminator="\n")
        table.writeheader()
        table.writerows(rows[case] for case in sorted(rows))
