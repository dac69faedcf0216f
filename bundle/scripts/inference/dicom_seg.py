"""DICOM SEG output: MONAI writes NIfTI only, so highdicom encodes a series' mask as a Segmentation object that
references the source series, for PACS and DICOM viewers."""

from __future__ import annotations

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import SimpleITK as sitk  # noqa: N813 (SimpleITK's own convention)
from pydicom.sr.codedict import codes
from scripts import read_metadata
from scripts.labels import structures

TYPE_2_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


def write_dicom_seg(series_dir: str, mask_file: str, seg_file: str, kind: str, metadata_file: str) -> None:
    """Writes `seg_file`, the mask of the DICOM series in `series_dir` (as written to `mask_file` on the grid that
    MONAI's ITK reader gives the series: x along the columns, y along the rows, z along ITK's slice order), with one
    segment per label of `kind` (crop or head) and the bundle's name and version from `metadata_file`."""
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(series_dir)  # the slice order of MONAI's ITK reader
    sources = [pydicom.dcmread(f) for f in files]
    for source in sources:  # type 2 patient and study attributes that the SEG copies may be empty, not missing
        for keyword in TYPE_2_COPIED:
            if keyword not in source:
                setattr(source, keyword, "")
    labels = np.asarray(nib.load(mask_file).dataobj, dtype=np.uint8)
    if labels.shape != (sources[0].Columns, sources[0].Rows, len(sources)):
        raise ValueError(
            f"the mask's shape {labels.shape} does not match the series "
            f"({sources[0].Columns} columns, {sources[0].Rows} rows, {len(sources)} slices)"
        )
    metadata = read_metadata(metadata_file)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=metadata["name"], version=metadata["version"], family=codes.cid7162.ArtificialIntelligence
    )
    segments = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=f"{side.capitalize()} {part} hippocampus" if side else f"{part.capitalize()} hippocampus",
            segmented_property_category=codes.cid7150.AnatomicalStructure,
            segmented_property_type=codes.SCT.Hippocampus,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for number, side, part in structures(kind)
    ]
    segmentation = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=labels.transpose(2, 1, 0),  # (slices, rows, columns)
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments,
        series_instance_uid=hd.UID(),
        series_number=int(getattr(sources[0], "SeriesNumber", 0) or 0) + 1000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=metadata["authors"][:64],  # a DICOM Long String holds at most 64 characters
        manufacturer_model_name=metadata["name"],
        software_versions=metadata["version"],
        device_serial_number="none",
        series_description="Hippocampus segmentation",
    )
    segmentation.save_as(seg_file)
