"""What an inference run writes beside its masks, step by step: each case's row, QC picture, BIDS sidecar and DICOM
SEG on every process; then, on the first, the volumes table, the BIDS dataset files, the cohort report and the summary
line. MONAI's bundle CLI writes masks only. configs/inference.yaml wires the steps."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch.distributed as dist
from monai.utils import look_up_option
from scripts import BundleError, read_metadata
from scripts.engine import distributed
from scripts.engine.inferers import EnsembleInferer
from scripts.inference import bids
from scripts.inference.cases import ConfidenceRecorder, SliceSharpnessRecorder, failure_reason
from scripts.inference.inputs import Inputs
from scripts.inference.report import write_report
from scripts.inference.tables import read_rows, write_participant_volumes, write_volumes
from scripts.qc.check import CaseRow, QualityCheck
from scripts.qc.pictures import draw_qc_png

logger = logging.getLogger(__name__)
PARALLEL_PICTURES = 32  # from this many pictures on, one process per core draws them
Written = tuple[str, str, CaseRow, dict | None]  # a written case: image, mask, its row, the head segmenter's result


class CaseRows:
    """The volumes-table row of each case this process segmented (`QualityCheck.row`), and a failure for each
    whose mask is missing."""

    def __init__(
        self,
        inputs: Inputs,
        quality: QualityCheck,
        confidence: ConfidenceRecorder,
        inferer: EnsembleInferer,
        slices: SliceSharpnessRecorder | None = None,
    ) -> None:
        self.inputs, self.quality, self.confidence, self.inferer = inputs, quality, confidence, inferer
        self.slices = slices

    def __call__(self, segmented: Sequence) -> tuple[list[Written], list[tuple[str, str]]]:
        """(image, mask, row, head result) of each written case of `segmented` (the crops' `CaseStream`, the heads'
        `HeadCases`), and (image, reason) of each failed one."""
        failed = [failure for cases in segmented for failure in cases.failures]
        failed_images = {image for image, _ in failed}
        results = {image: result for cases in segmented for image, result in getattr(cases, "results", {}).items()}
        written = []
        for case in (case for cases in segmented for case in cases.cases):
            image = case["image"]
            if image in failed_images:
                continue
            mask = self.inputs.mask_path(image)
            if not os.path.isfile(mask):
                failed.append((image, "no mask was written"))
                continue
            head = results.get(image)
            if head:
                row = self.quality.row(self.inputs.case(image), mask, head, head["confidence"])
            else:
                confidence, agreement = self.confidence.values.get(image), self.inferer.agreement.get(image)
                sharpness = self.slices.values.get(image) if self.slices else None
                row = self.quality.row(self.inputs.case(image), mask, None, confidence, agreement, sharpness)
            written.append((image, mask, row, head))
        return written, failed


def _drawn(image: str, mask: str, png: str) -> str | None:
    """Draws the QC picture of a case; returns why it could not be drawn, else None."""
    try:
        draw_qc_png(image, mask, png)
    except Exception as e:  # a picture is an aid, never a reason to lose the run's table
        return f"{image}: no QC picture, {failure_reason(e)}"
    return None


def draw_pictures(cases: Sequence[tuple[str, str, str]]) -> None:
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


class QCPictures:
    """Each case's QC picture (`inputs.qc_png_path`), when `enabled`: gathered case by case, drawn together."""

    def __init__(self, inputs: Inputs, enabled: bool = False) -> None:
        self.inputs, self.enabled = inputs, enabled
        self.pending: list[tuple[str, str, str]] = []

    def __call__(self, image: str, mask: str, row: CaseRow, head: dict | None) -> None:
        if self.enabled:
            self.pending.append((image, mask, self.inputs.qc_png_path(image)))

    def close(self) -> None:
        draw_pictures(self.pending)


class BidsSidecars:
    """In the BIDS layout, each mask's sidecar (`<mask>.json`) and a crop's own look-up table."""

    def __init__(self, inputs: Inputs, metadata_file: str) -> None:
        self.inputs, self.version = inputs, read_metadata(metadata_file)["version"]

    def __call__(self, image: str, mask: str, row: CaseRow, head: dict | None) -> None:
        if not self.inputs.bids:
            return
        bids.write_sidecar(mask, image, self.inputs.root, self.version, row, head)
        if row.kind == "crop":  # the dataset's look-up table is of heads' labels
            bids.write_look_up(mask[: -len(".nii.gz")] + ".tsv", "crop")


class DicomSegs:
    """With `enabled`, a DICOM SEG beside the mask of each DICOM series; one that cannot be written fails its case."""

    def __init__(self, metadata_file: str, enabled: bool = False) -> None:
        self.metadata_file, self.enabled = metadata_file, enabled

    def __call__(self, image: str, mask: str, row: CaseRow, head: dict | None) -> str | None:
        if not (self.enabled and os.path.isdir(image)):
            return None
        from scripts.inference.dicom_seg import write_dicom_seg

        try:
            write_dicom_seg(image, mask, mask[: -len(".nii.gz")] + ".dcm", row.kind, self.metadata_file)
        except Exception as e:  # the mask stands; the series is reported
            logger.error(f"{image}: no DICOM SEG, {failure_reason(e)}")
            return f"no DICOM SEG: {failure_reason(e)}"
        return None


class RunFiles:
    """On the first process, from every process's rows: the volumes table, the BIDS dataset files, the cohort report
    (`html_report`; it draws the pictures of cases an earlier run segmented) and each cohort outlier's sidecar,
    then the run's summary line.

    `bids_level` is the BIDS App's (`scripts.inference.bids_app`): at `participant`, each participant's own volumes
    table and the dataset files where none are, instead, so that participant jobs can write into one output folder at
    once; the `group` method then writes the run files from those tables; `all` (the command line) does both at once."""

    def __init__(
        self,
        inputs: Inputs,
        quality: QualityCheck,
        metadata_file: str,
        html_report: bool = True,
        bids_level: str = "all",
    ) -> None:
        self.inputs, self.quality, self.metadata = inputs, quality, read_metadata(metadata_file)
        self.html_report = html_report
        self.bids_level = look_up_option(bids_level, ("all", "participant", "group"))

    def __call__(self, rows: list[CaseRow], failed: list[tuple[str, str]]) -> None:
        inputs = self.inputs
        if self.bids_level == "participant":
            bids.write_dataset_files(inputs.output_dir, inputs.root, self.metadata, exclusive=True)
            tables = write_participant_volumes(inputs, rows, self.quality)
            logger.info(
                f"Participant level finished: {len(rows)} written, {len(failed)} failed, volumes in "
                f"{', '.join(os.path.relpath(table, inputs.output_dir) for table in tables) or 'no table'}."
            )
            return
        table_file, table = write_volumes(inputs, rows, self.quality)
        if inputs.bids:
            bids.write_dataset_files(inputs.output_dir, inputs.root, self.metadata)
        if self.html_report:
            # every case of the table; those segmented by an earlier run may have no picture yet
            earlier = [(image, inputs.mask_path(image), inputs.qc_png_path(image)) for image in inputs.paths]
            draw_pictures([case for case in earlier if os.path.isfile(case[1]) and not os.path.isfile(case[2])])
            write_report(
                os.path.join(inputs.output_dir, "report.html"),
                table,
                [(inputs.case(image), reason) for image, reason in failed],
                {inputs.case(image): png for image, _, png in earlier},
                f"{self.metadata['name']} {self.metadata['version']}: {inputs.dataset_dir}",
            )
        if inputs.bids:  # a cohort outlier is known once the run's table is
            masks = {inputs.case(image): inputs.mask_path(image) for image in inputs.paths}
            for row in table:
                if row.cohort_outlier:
                    bids.update_qc(masks[row.case], row)
        flagged = sum(row.qc != "pass" for row in rows)
        logger.info(
            f"Inference finished: {len(rows)} written, {len(failed)} failed, {flagged} flagged for review "
            f"in {os.path.basename(table_file)}, output in {inputs.output_dir}."
        )

    def group(self) -> list[tuple[str, str]]:
        """The group level: the run files from the rows of the participants' tables, with no segmentation; each
        selected scan without a row is a failure (its participant job failed or has not run). Returns those."""
        inputs, tables = self.inputs, {}
        rows, failed = [], []
        for image in inputs.paths:
            subject = bids.entities(image)["sub"]
            if subject not in tables:
                tables[subject] = read_rows(bids.participant_table(inputs.output_dir, subject), "\t")
            columns = tables[subject].get(inputs.case(image))
            if columns is None or not os.path.isfile(inputs.mask_path(image)):
                failed.append((image, "no mask from the participant level (see its job's log)"))
            else:
                rows.append(CaseRow.from_columns(columns))
        self(rows, failed)
        return failed


def write_outputs(segmented: Sequence, rows: CaseRows, case_outputs: Sequence, run_files: RunFiles) -> None:
    """The run's outputs: each of `case_outputs` for every case this process wrote (a step that returns a reason
    fails its case), then `run_files` on the first process with every process's rows; every process then leaves the
    process group (under torchrun), and the run exits non-zero when any case failed."""
    written, failed = rows(segmented)
    for image, mask, row, head in written:
        for step in case_outputs:
            reason = step(image, mask, row, head)
            if reason:
                failed.append((image, reason))
    for step in case_outputs:
        getattr(step, "close", lambda: None)()
    table = [row for _, _, row, _ in written]
    if dist.is_initialized():
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (table, failed))
        table = [row for part, _ in gathered for row in part]
        failed = [failure for _, part in gathered for failure in part]
    main_process = distributed.is_main_process()
    if main_process:
        run_files(table, failed)
    # under torchrun a process that exits non-zero gets the others stopped: none leaves before rank 0's table is written
    distributed.finalize()
    if failed and not main_process:
        raise BundleError(f"{len(failed)} case(s) failed; rank 0 lists them.")
    if failed:
        lines = "\n".join(f"  {image}: {reason}" for image, reason in failed)
        raise BundleError(f"{len(failed)} case(s) failed:\n{lines}")
