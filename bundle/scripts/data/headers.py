"""A scan's header checked before any voxel is read, which neither MONAI's readers nor nibabel do: a header alone
must not decide how much memory a run takes (a file that claims 1500^3 voxels and holds 4 KB had a run allocate
14 GB before it failed)."""

from __future__ import annotations

import os
import struct

import nibabel as nib
import numpy as np
import SimpleITK as sitk  # noqa: N813 (SimpleITK's own convention)

MAX_VOXELS = 150_000_000  # a 0.5 mm head (512 x 512 x 400 voxels) and a 7 T 0.3 mm slab fit; a 720^3 volume does not


class HeaderError(ValueError):
    """A scan whose header cannot describe a readable 3D image, or one larger than the run allows."""


def _gzip_size(path: str) -> int | None:
    """The uncompressed size a gzip file's trailer records (modulo 2^32), None for a file that is not gzip."""
    with open(path, "rb") as f:
        if f.read(2) != b"\x1f\x8b":
            return None
        f.seek(0, os.SEEK_END)
        if f.tell() < 18:
            raise HeaderError("the gzip file is shorter than a gzip header and trailer")
        f.seek(-4, os.SEEK_END)
        return struct.unpack("<I", f.read(4))[0]


def _check_geometry(shape, zooms, affine: np.ndarray, max_voxels: int) -> None:
    """The checks that every format's header gets: dimensions, voxel sizes, affine and the number of voxels."""
    shape = tuple(int(n) for n in shape)
    if len(shape) < 3 or any(n < 1 for n in shape):
        raise HeaderError(f"the header's shape {shape} is no 3D image")
    if any(n > 1 for n in shape[3:]) and len(shape) > 4:
        raise HeaderError(f"the header's shape {shape} has more than 4 dimensions")
    voxels = int(np.prod(shape, dtype=np.float64))
    if voxels > max_voxels:
        raise HeaderError(
            f"the header claims {'x'.join(map(str, shape))} = {voxels:,} voxels, more than --max_voxels "
            f"{max_voxels:,} (raise it for a larger legitimate scan)"
        )
    zooms = np.asarray(zooms[:3], dtype=np.float64)
    if not np.all(np.isfinite(zooms)) or np.any(zooms <= 0):
        raise HeaderError(f"the header's voxel sizes {np.round(zooms, 4).tolist()} mm are not all positive and finite")
    affine = np.asarray(affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)):
        raise HeaderError("the header's affine (voxel-to-world map) is not finite")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-6 * float(np.prod(zooms)):
        raise HeaderError("the header's affine (voxel-to-world map) is singular: its axes are not independent")


def _check_nibabel(path: str, max_voxels: int) -> None:
    try:
        image = nib.load(path)
    except Exception as e:  # nibabel's many header errors, named by their message
        raise HeaderError(f"unreadable header ({type(e).__name__}: {e})") from None
    header = image.header
    dtype = header.get_data_dtype()
    if dtype.fields is not None or dtype.kind not in "biuf":
        raise HeaderError(f"data type {dtype} is no scalar image (complex or RGB)")
    shape = header.get_data_shape()
    _check_geometry(shape, header.get_zooms(), image.affine, max_voxels)
    offset = int(header.get_data_offset()) if hasattr(header, "get_data_offset") else 0
    needed = offset + int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
    stored = _gzip_size(path)
    if stored is None:
        stored = os.path.getsize(path)
    elif needed >= 2**32:
        return  # the trailer holds the size modulo 2^32
    if stored < needed:
        raise HeaderError(f"the file holds {stored:,} bytes of image, its header says {needed:,}: truncated or damaged")


def _check_dicom_series(folder: str, max_voxels: int) -> None:
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder)
    if not files:
        raise HeaderError("no DICOM series found")
    reader = sitk.ImageFileReader()
    reader.SetFileName(files[0])
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise HeaderError(f"unreadable DICOM header ({str(e).strip().splitlines()[-1]})") from None
    if reader.GetNumberOfComponents() != 1:
        raise HeaderError(f"{reader.GetNumberOfComponents()} components per voxel: no scalar image (RGB?)")
    size = (*reader.GetSize()[:2], len(files) * max(1, reader.GetSize()[2] if reader.GetDimension() > 2 else 1))
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(reader.GetDirection()).reshape(3, 3) * np.asarray(reader.GetSpacing())
    _check_geometry(size, reader.GetSpacing(), affine, max_voxels)


def check_header(path: str, max_voxels: int = MAX_VOXELS) -> None:
    """Raises `HeaderError` naming the problem for a NIfTI or FreeSurfer file or DICOM series folder whose header
    describes no readable 3D scalar image (shape, data type, voxel sizes, affine), more than `max_voxels` voxels, or
    more bytes than the file holds (for gzip, as its trailer records them), before any voxel is read."""
    if os.path.isdir(path):
        _check_dicom_series(path, int(max_voxels))
    elif not os.path.isfile(path):
        raise HeaderError("no such file (a dangling link?)")
    elif os.path.getsize(path) == 0:
        raise HeaderError("the file is empty")
    else:
        _check_nibabel(path, int(max_voxels))
