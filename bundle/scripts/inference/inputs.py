"""The inputs of an inference run and where each one's outputs go, which MONAI's bundle CLI does not find: nested
folders, single scans, DICOM series and BIDS datasets (participant and session selection, BIDS-Derivatives names)."""

from __future__ import annotations

import logging
import os
import tempfile

from monai.data import FolderLayoutBase
from monai.utils import look_up_option
from scripts import BundleError
from scripts.inference import bids
from scripts.labels import IMAGE_SUFFIXES, case_name, mask_name

logger = logging.getLogger(__name__)


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


class Inputs(FolderLayoutBase):
    """The inputs of a run and where each one's outputs go (the masks' `folder_layout` for MONAI's SaveImaged).

    Inputs are the NIfTI and FreeSurfer (`.mgz`, `.mgh`) files and DICOM series folders of `dataset_dir` (its
    `imagesTs/` for an MSD task folder; at any depth with `recursive`), or the one scan `dataset_dir` names; in a BIDS
    dataset (`dataset_description.json`), its `sub-*/[ses-*/]anat/*_T1w.nii[.gz]` images of the given participants and
    sessions.

    Args:
        dataset_dir: the input folder, or one scan.
        output_dir: where masks, the volumes table, QC pictures and the report go (created when the run starts).
        recursive: also look in sub-folders (a folder of DICOM files is one series and is not searched further).
        output_layout: `mirror`: `<case>_seg.nii.gz` in each input's relative folder, `volumes.csv`; `bids`:
            BIDS-Derivatives, `sub-X/[ses-Y/]anat/sub-X[_ses-Y]_..._desc-hippocampus_dseg.nii.gz`, `volumes.tsv`;
            `auto`: `bids` for an input in a BIDS dataset.
        participant_label, session_label: the BIDS participants and sessions to segment (all by default).
    """

    def __init__(
        self,
        dataset_dir: str,
        output_dir: str,
        recursive: bool = False,
        output_layout: str = "auto",
        participant_label=None,
        session_label=None,
    ) -> None:
        layout = look_up_option(str(output_layout), ("auto", "mirror", "bids"))
        self.output_dir = output_dir
        self.bids, self.dataset_dir, self.root, self.paths = False, dataset_dir, dataset_dir, []
        self.problem: BundleError | None = None
        try:
            self._find_inputs(dataset_dir, recursive, layout, participant_label, session_label)
        except BundleError as e:
            self.problem = e  # raised by `check` when the run starts: a config with its default paths still loads

    def check(self) -> None:
        """Raises what is wrong with the inputs (a missing folder, nothing to segment), when the run starts."""
        if self.problem is not None:
            raise self.problem

    def _find_inputs(self, dataset_dir: str, recursive: bool, layout: str, participant_label, session_label) -> None:
        if not os.path.exists(dataset_dir):
            raise BundleError(f"Input {dataset_dir} does not exist.")
        bids_root = bids.dataset_root(dataset_dir)
        self.bids = layout == "bids" or (layout == "auto" and bids_root is not None)
        if (participant_label or session_label) and not self.bids:
            raise BundleError(
                f"--participant_label and --session_label select in a BIDS dataset; {dataset_dir} is "
                f"not in one (no {bids.DESCRIPTION})."
            )
        single = os.path.isfile(dataset_dir) or (os.path.isdir(dataset_dir) and _is_dicom_series(dataset_dir))
        if self.bids:
            self.dataset_dir = self.root = bids_root or (os.path.dirname(dataset_dir) if single else dataset_dir)
        else:
            self.dataset_dir = os.path.dirname(os.path.abspath(dataset_dir)) if single else dataset_dir
            msd = os.path.isfile(os.path.join(dataset_dir, "dataset.json")) and os.path.isdir(
                os.path.join(dataset_dir, "imagesTs")
            )
            self.root = os.path.join(dataset_dir, "imagesTs") if msd else self.dataset_dir
        if single:
            if self.bids:
                self._bids_name(dataset_dir)
            self.paths = [dataset_dir]
        elif self.bids:
            inside = os.path.abspath(dataset_dir)
            self.paths = [
                path
                for path in bids.find_t1w(self.root, participant_label, session_label)
                if os.path.commonpath([os.path.abspath(path), inside]) == inside
            ]
        else:
            self.paths = self._find(recursive)
        if not self.paths:
            kinds = (
                "sub-*/[ses-*/]anat/*_T1w.nii[.gz] images"
                if self.bids
                else "NIfTI, FreeSurfer (.mgz, .mgh) files or DICOM series"
            )
            hint = (
                f" (read as BIDS, from {self.root}; --output_layout mirror reads it as a plain folder)"
                if self.bids
                else ""
            )
            raise BundleError(f"No {kinds} to segment in {dataset_dir}{hint}.")

    def _find(self, recursive: bool) -> list[str]:
        found = []
        output = os.path.realpath(self.output_dir)
        for folder, subfolders, files in os.walk(self.root):
            # hidden folders and the output folder (which may lie inside the input folder) hold no inputs
            subfolders[:] = sorted(
                d for d in subfolders if not d.startswith(".") and os.path.realpath(os.path.join(folder, d)) != output
            )
            for name in list(subfolders):
                path = os.path.join(folder, name)
                if _is_dicom_series(path):
                    found.append(path)
                    subfolders.remove(name)
            found += [os.path.join(folder, f) for f in files if f.endswith(IMAGE_SUFFIXES) and not f.startswith(".")]
            if not recursive:
                break
        return sorted(found)

    @staticmethod
    def _bids_name(path: str) -> str:
        try:
            return bids.derivative_name(path)
        except ValueError as e:
            raise BundleError(f"{e}: --output_layout bids names its outputs after it.") from None

    def case(self, path: str) -> str:
        """The input's path relative to `dataset_dir`: the `case` column of the volumes table."""
        return os.path.relpath(path, self.dataset_dir)

    def _relative_folder(self, path: str) -> str:
        return os.path.dirname(os.path.relpath(path, self.root))

    def mask_path(self, path: str) -> str:
        if self.bids:
            return os.path.join(self.output_dir, self._relative_folder(path), f"{self._bids_name(path)}.nii.gz")
        return os.path.join(self.output_dir, self._relative_folder(path), mask_name(path))

    def filename(self, subject: str, idx=None, **kwargs) -> str:
        """The mask of the input `subject` (SaveImaged's image path), its folder created: MONAI's FolderLayoutBase."""
        path = self.mask_path(subject)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return path

    def qc_png_path(self, path: str) -> str:
        if self.bids:
            subject = os.path.relpath(path, self.root).split(os.sep)[0]
            return os.path.join(self.output_dir, subject, "figures", f"{self._bids_name(path)}.png")
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
