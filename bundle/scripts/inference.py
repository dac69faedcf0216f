"""Cohort inference that survives bad cases and any folder size: MONAI's datasets stop at the first unreadable file,
and its bundle CLI neither finds nested inputs, nor shards them across processes, nor tabulates volumes."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence

import torch.distributed as dist
from monai.data import DataLoader, Dataset, list_data_collate
from monai.utils import look_up_option

from scripts import BundleError
from scripts.head import input_kind
from scripts.qc import QualityCheck, draw_qc_png, write_volumes
from scripts.transforms import FREESURFER_SUFFIXES

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".nii", ".nii.gz", *FREESURFER_SUFFIXES)


def case_name(path: str) -> str:
    """`<case>` of `<case>_seg.nii.gz`: the file name without its extension, or the series folder's name."""
    name = os.path.basename(os.path.normpath(path))
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _is_dicom_series(folder: str) -> bool:
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
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
        raise BundleError(f"Output folder {output_dir} is not writable: {e.strerror or e}.") from None
    return output_dir


class Inputs:
    """The NIfTI and FreeSurfer (`.mgz`, `.mgh`) files and DICOM series folders of `dataset_dir` (its `imagesTs/`
    for an MSD task folder), at any depth with `recursive`; each one's mask goes to the same relative folder under
    `output_dir`.

    Args:
        dataset_dir: the input folder.
        output_dir: where masks, `volumes.csv` and QC pictures go (created when the run starts).
        recursive: also look in sub-folders (a folder of DICOM files is one series and is not searched further).
    """

    def __init__(self, dataset_dir: str, output_dir: str, recursive: bool = False) -> None:
        if not os.path.isdir(dataset_dir):
            problem = "is a file: --dataset_dir takes the folder that holds it" if os.path.isfile(dataset_dir) else "does not exist"
            raise BundleError(f"Input folder {dataset_dir} {problem}.")
        self.dataset_dir = dataset_dir
        msd = os.path.isfile(os.path.join(dataset_dir, "dataset.json")) and os.path.isdir(os.path.join(dataset_dir, "imagesTs"))
        self.root = os.path.join(dataset_dir, "imagesTs") if msd else dataset_dir
        self.output_dir = output_dir
        self.paths = self._find(recursive)
        if not self.paths:
            raise BundleError(f"No NIfTI, FreeSurfer (.mgz, .mgh) files or DICOM series to segment in {self.root}.")

    def _find(self, recursive: bool) -> list[str]:
        found = []
        output = os.path.realpath(self.output_dir)
        for folder, subfolders, files in os.walk(self.root):
            # hidden folders and the output folder (which may lie inside the input folder) hold no inputs
            subfolders[:] = sorted(d for d in subfolders if not d.startswith(".")
                                   and os.path.realpath(os.path.join(folder, d)) != output)
            for name in list(subfolders):
                path = os.path.join(folder, name)
                if _is_dicom_series(path):
                    found.append(path)
                    subfolders.remove(name)
            found += [os.path.join(folder, f) for f in files if f.endswith(IMAGE_SUFFIXES) and not f.startswith(".")]
            if not recursive:
                break
        return sorted(found)

    def case(self, path: str) -> str:
        """The input's path relative to `dataset_dir`: the `case` column of `volumes.csv`."""
        return os.path.relpath(path, self.dataset_dir)

    def _relative_folder(self, path: str) -> str:
        return os.path.dirname(os.path.relpath(path, self.root))

    def mask_path(self, path: str) -> str:
        return os.path.join(self.output_dir, self._relative_folder(path), f"{case_name(path)}_seg.nii.gz")

    def qc_png_path(self, path: str) -> str:
        return os.path.join(self.output_dir, "qc", self._relative_folder(path), f"{case_name(path)}.png")

    def pending(self, overwrite: bool = False) -> list[dict[str, str]]:
        """Inputs still to segment: those whose mask exists are skipped (and logged) unless `overwrite`."""
        cases = []
        for path in self.paths:
            if os.path.exists(self.mask_path(path)) and not overwrite:
                logger.warning(f"{self.case(path)}: skipped, {self.mask_path(path)} exists (use --overwrite true).")
                continue
            cases.append({"image": path})
        return cases


def split_by_kind(cases: Sequence[dict], kind: str = "auto") -> dict[str, list[dict]]:
    """Crop and head cases: by field of view (`scripts.head.input_kind`) for `auto`, or all of one `kind`."""
    kind = look_up_option(str(kind), ("auto", "crop", "head"))
    split: dict[str, list[dict]] = {"crop": [], "head": []}
    for case in cases:
        split[input_kind(case["image"]) if kind == "auto" else kind].append(case)
    return split


class SafeCases(Dataset):
    """Each case preprocessed on demand; a case that fails becomes `{"image": path, "failure": reason}`."""

    def _transform(self, index: int) -> dict:
        case = self.data[index]
        try:
            return self.transform(dict(case))
        except Exception as e:  # any reader or transform error belongs to this case only
            return {"image": case["image"], "failure": _reason(e)}


def _as_list(items: list) -> list:
    return items


class CaseStream:
    """Crop cases read and preprocessed as the model consumes them, `num_workers` DataLoader processes reading
    ahead, so memory does not grow with the folder. Cases that fail are kept in `failures`, not raised. It has no
    length: an Ignite engine runs one epoch over it until it is exhausted.

    Args:
        dataset: the cases (dicts with an `image` path) and their deterministic preprocessing.
        batch_size: cases per batch (same-shaped inputs only).
        num_workers: DataLoader worker processes.
    """

    def __init__(self, dataset: SafeCases, batch_size: int = 1, num_workers: int = 0) -> None:
        self.dataset = dataset
        self.cases = list(dataset.data)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.failures: list[tuple[str, str]] = []

    def __iter__(self) -> Iterator[dict]:
        loader = DataLoader(self.dataset, batch_size=self.batch_size, shuffle=False,
                            num_workers=self.num_workers, collate_fn=_as_list)
        for items in loader:
            good = []
            for item in items:
                if "failure" in item:
                    self.failures.append((item["image"], item["failure"]))
                    logger.error(f"{item['image']}: FAILED, {item['failure']}")
                else:
                    good.append(item)
            if good:
                yield list_data_collate(good)


def _reason(error: BaseException) -> str:
    """The innermost message of a (possibly MONAI-wrapped) exception."""
    while error.__cause__ is not None:
        error = error.__cause__
    message = str(error).strip().splitlines()
    return f"{type(error).__name__}: {message[-1] if message else 'no message'}"


class HeadCases:
    """Whole-head cases, segmented one at a time by `segmenter` (`scripts.head.HeadSegmenter`); a case that fails
    is kept in `failures` with its reason, and the others go on."""

    def __init__(self, data: Sequence[dict], segmenter: Callable[[str], dict]) -> None:
        self.cases = list(data)
        self.segmenter = segmenter
        self.failures: list[tuple[str, str]] = []
        self.results: dict[str, dict] = {}

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


class ConfidenceRecorder:
    """A post-processing step on softmax probabilities (`key`, channel first, before argmax): records each case's
    mean top-class probability inside its predicted hippocampus, for the low-confidence QC flag."""

    def __init__(self, key: str = "pred") -> None:
        self.key = key
        self.values: dict[str, float] = {}

    def __call__(self, data: dict) -> dict:
        probabilities = data[self.key]
        top, label = probabilities.max(0)
        inside = label > 0
        image = str(probabilities.meta["filename_or_obj"])
        self.values[image] = float(top[inside].mean()) if bool(inside.any()) else float("nan")
        return data


def run(inputs: Inputs, evaluator, crops: CaseStream, heads: HeadCases) -> None:
    """Checks that the output folder can be written, then segments the crops through `evaluator` and the heads (the
    evaluator's checkpoint loader has loaded the weights)."""
    check_output_dir(inputs.output_dir)
    if crops.cases:
        evaluator.run()
    if heads.cases:
        heads.run()


def report(inputs: Inputs, crops: CaseStream, heads: HeadCases, confidence: ConfidenceRecorder, quality: QualityCheck,
           qc_png: bool = False, dicom_seg_metadata: str | None = None) -> None:
    """Writes `volumes.csv`, QC pictures with `qc_png` and, with `dicom_seg_metadata` (the bundle's metadata.json),
    a DICOM SEG beside the mask of each DICOM series; logs one summary line covering every process's cases, and
    exits non-zero when any case failed or its mask (or SEG) is missing."""
    failed = crops.failures + heads.failures
    failed_images = {image for image, _ in failed}
    rows = []
    for case in crops.cases + heads.cases:
        image = case["image"]
        if image in failed_images:
            continue
        mask = inputs.mask_path(image)
        if not os.path.isfile(mask):
            failed.append((image, "no mask was written"))
            continue
        head = heads.results.get(image)
        rows.append(quality.row(inputs.case(image), mask, head, head["confidence"] if head else confidence.values.get(image)))
        if qc_png:
            draw_qc_png(image, mask, inputs.qc_png_path(image))
        if dicom_seg_metadata and os.path.isdir(image):
            from scripts.dicom_seg import write_dicom_seg

            try:
                write_dicom_seg(image, mask, mask[: -len(".nii.gz")] + ".dcm", rows[-1]["kind"], dicom_seg_metadata)
            except Exception as e:  # the mask stands; the series is reported
                failed.append((image, f"no DICOM SEG: {_reason(e)}"))
                logger.error(f"{image}: no DICOM SEG, {_reason(e)}")
    if dist.is_initialized():
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (rows, failed))
        rows = [row for part, _ in gathered for row in part]
        failed = [failure for _, part in gathered for failure in part]
        if dist.get_rank() != 0:
            if failed:
                raise BundleError(f"{len(failed)} case(s) failed; rank 0 lists them.")
            return
    write_volumes(inputs, rows, quality)
    flagged = sum(row["qc"] == "review" for row in rows)
    logger.info(f"Inference finished: {len(rows)} written, {len(failed)} failed, {flagged} flagged for review "
                f"in volumes.csv, output in {inputs.output_dir}.")
    if failed:
        lines = "\n".join(f"  {image}: {reason}" for image, reason in failed)
        raise BundleError(f"{len(failed)} case(s) failed:\n{lines}")

