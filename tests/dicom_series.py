"""Writes a synthetic volume as a DICOM MR series with pydicom, for the inference tests."""

import os

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid


def write_dicom_series(volume: np.ndarray, folder: str, spacing=(1.0, 1.0, 1.2), origin=(-10.0, 20.0, 5.0)) -> str:
    """Writes `volume` (rows, cols, slices) as one uint16 slice per file; returns `folder`."""
    os.makedirs(folder, exist_ok=True)
    scaled = np.clip(volume, 0, None)
    scaled = (scaled / max(float(scaled.max()), 1e-6) * 4000).astype(np.uint16)
    series_uid, study_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    for k in range(volume.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientID, ds.PatientName = "MR", "SYNTHETIC", "Synthetic^Case"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [origin[0], origin[1], origin[2] + k * spacing[2]]
        ds.PixelSpacing = [spacing[0], spacing[1]]
        ds.SliceThickness = spacing[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = volume.shape[0], volume.shape[1]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = np.ascontiguousarray(scaled[:, :, k]).tobytes()
        ds.save_as(os.path.join(folder, f"slice_{k:03d}.dcm"), enforce_file_format=True)
    return folder
