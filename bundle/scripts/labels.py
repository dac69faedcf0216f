"""The labels the bundle writes and the names of its cases and masks, once: QC, tables, BIDS and DICOM SEG read them
here, and tests/test_configs.py checks the configs and metadata.json against them."""

from __future__ import annotations

import os

PARTS = ("anterior", "posterior")
SIDES = ("left", "right")
CLASS_NAMES = ("background", *PARTS)  # the network's output channels; a crop's mask holds labels 1 and 2
CROP_LABELS = {part: label for label, part in enumerate(PARTS, start=1)}
HEAD_LABELS = {"left": (1, 2), "right": (3, 4)}  # (anterior, posterior) for each side of a head's mask
MASK_SUFFIX = "_seg.nii.gz"
FREESURFER_SUFFIXES = (".mgz", ".mgh")
IMAGE_SUFFIXES = (".nii", ".nii.gz", *FREESURFER_SUFFIXES)


def structures(kind: str) -> list[tuple[int, str | None, str]]:
    """(label, side or None, part) of each label a `kind` (`crop` or `head`) mask holds."""
    if kind == "crop":
        return [(label, None, part) for part, label in CROP_LABELS.items()]
    return [(label, side, part) for side, labels in HEAD_LABELS.items() for part, label in zip(PARTS, labels)]


def structure_name(side: str | None, part: str) -> str:
    """A structure's name in volumes and QC's reasons: `anterior` in a crop, `left anterior` in a head."""
    return f"{side} {part}" if side else part


def case_name(path: str) -> str:
    """`<case>` of `<case>_seg.nii.gz`: the file name without its extension, or the series folder's name."""
    name = os.path.basename(os.path.normpath(path))
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def mask_name(path: str) -> str:
    """The file name of the mask of the input `path` (a file, a series folder, or a case's name)."""
    return f"{case_name(path)}{MASK_SUFFIX}"
