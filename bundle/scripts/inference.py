"""Cohort inference that survives bad cases and any folder size: MONAI's datasets stop at the first unreadable file,
and its bundle CLI neither finds nested inputs, nor shards them across processes, nor tabulates volumes."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence

import torch.distributed as dist
from monai.data import DataLoader, Dataset, list_data_collate
from monai.utils import look_up_option

from scripts import BundleError, bids, distributed
from scripts.head import input_kind
from scripts.inputs import Inputs, check_output_dir
from scripts.qc import QualityCheck, draw_qc_png, write_volumes
from scripts.report import write_report

logger = logging.getLogger(__name__)

def split_by_kind(cases: Sequence[dict], kind: str = "auto", max_crop_mm: float = 100.0) -> dict[str, list[dict]]:
    """Crop and head cases: by field of view (`scripts.head.input_kind`) for `auto`, or all of one `kind`."""
    kind = look_up_option(str(kind), ("auto", "crop", "head"))
    split: dict[str, list[dict]] = {"crop": [], "head": []}
    for case in cases:
        split[input_kind(case["image"], max_crop_mm) if kind == "auto" else kind].append(case)
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


PARALLEL_PICTURES = 32  # from this many pictures on, one process per core draws them


def _drawn(image: str, mask: str, png: str) -> str | None:
    """Draws the QC picture of a case; returns why it could not be drawn, else None."""
    try:
        draw_qc_png(image, mask, png)
    except Exception as e:  # a picture is an aid, never a reason to lose the run's table
        return f"{image}: no QC picture, {_reason(e)}"
    return None


def _draw_pictures(cases: Sequence[tuple[str, str, str]]) -> None:
    """The QC pictures of (image, mask, picture) cases, drawn by one process per core of this process's share
    of the machine when there are many (a picture takes about a fifth of a crop's segmentation); one that cannot
    be drawn is logged, its mask and row stand."""
    if len(cases) < PARALLEL_PICTURES:
        problems = [_drawn(*case) for case in cases]
    else:
        import multiprocessing

        share = max(1, len(os.sched_getaffinity(0)) // (dist.get_world_size() if dist.is_initialized() else 1))
        with multiprocessing.get_context("fork").Pool(share) as pool:
            problems = pool.starmap(_drawn, cases, chunksize=16)
    for problem in filter(None, problems):
        logger.warning(problem)


def report(inputs: Inputs, crops: CaseStream, heads: HeadCases, confidence: ConfidenceRecorder, quality: QualityCheck,
           metadata_file: str, qc_png: bool = False, dicom_seg: bool = False, html_report: bool = True) -> None:
    """Writes the volumes table, QC pictures (with `qc_png` or `html_report`), for DICOM series with `dicom_seg` a
    DICOM SEG beside the mask, for the BIDS layout the derivative's dataset files and each mask's sidecar, and with
    `html_report` the cohort report; logs one summary line covering every process's cases, leaves the process group
    (under torchrun), and exits non-zero when any case failed or its mask (or SEG) is missing. `metadata_file` (the
    bundle's metadata.json) names the bundle."""
    with open(metadata_file, encoding="utf-8") as f:
        metadata = json.load(f)
    failed = crops.failures + heads.failures
    failed_images = {image for image, _ in failed}
    rows, pictures = [], []
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
        if qc_png or html_report:
            pictures.append((image, mask, inputs.qc_png_path(image)))
        if inputs.bids:
            bids.write_sidecar(mask, image, inputs.root, metadata["version"], rows[-1], head)
            if rows[-1]["kind"] == "crop":  # the dataset's look-up table is of heads' labels
                bids.write_look_up(mask[: -len(".nii.gz")] + ".tsv", "crop")
        if dicom_seg and os.path.isdir(image):
            from scripts.dicom_seg import write_dicom_seg

            try:
                write_dicom_seg(image, mask, mask[: -len(".nii.gz")] + ".dcm", rows[-1]["kind"], metadata_file)
            except Exception as e:  # the mask stands; the series is reported
                failed.append((image, f"no DICOM SEG: {_reason(e)}"))
                logger.error(f"{image}: no DICOM SEG, {_reason(e)}")
    _draw_pictures(pictures)
    if dist.is_initialized():
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (rows, failed))
        rows = [row for part, _ in gathered for row in part]
        failed = [failure for _, part in gathered for failure in part]
    main_process = distributed.is_main_process()
    if main_process:
        _write_run_files(inputs, rows, failed, quality, metadata, html_report)
    # under torchrun a process that exits non-zero gets the others stopped: none leaves before rank 0's table is written
    distributed.finalize()
    if failed and not main_process:
        raise BundleError(f"{len(failed)} case(s) failed; rank 0 lists them.")
    if failed:
        lines = "\n".join(f"  {image}: {reason}" for image, reason in failed)
        raise BundleError(f"{len(failed)} case(s) failed:\n{lines}")


def _write_run_files(inputs: Inputs, rows: list[dict], failed: list[tuple[str, str]], quality: QualityCheck,
                     metadata: dict, html_report: bool) -> None:
    """The run's volumes table, BIDS dataset files, cohort report and summary line, from every process's rows."""
    table_file, table = write_volumes(inputs, rows, quality)
    if inputs.bids:
        bids.write_dataset_files(inputs.output_dir, inputs.root, metadata)
    if html_report:
        # every case of the table; those segmented by an earlier run may have no picture yet
        earlier = [(image, inputs.mask_path(image), inputs.qc_png_path(image)) for image in inputs.paths]
        _draw_pictures([case for case in earlier if os.path.isfile(case[1]) and not os.path.isfile(case[2])])
        write_report(os.path.join(inputs.output_dir, "report.html"), table,
                     [(inputs.case(image), reason) for image, reason in failed],
                     {inputs.case(image): png for image, _, png in earlier},
                     f"{metadata['name']} {metadata['version']}: {inputs.dataset_dir}")
    if inputs.bids:  # a cohort outlier is known once the run's table is
        masks = {inputs.case(image): inputs.mask_path(image) for image in inputs.paths}
        for row in table:
            if row.get("cohort_outlier"):
                bids.update_qc(masks[row["case"]], row)
    flagged = sum(row["qc"] != "pass" for row in rows)
    logger.info(f"Inference finished: {len(rows)} written, {len(failed)} failed, {flagged} flagged for review "
                f"in {os.path.basename(table_file)}, output in {inputs.output_dir}.")
