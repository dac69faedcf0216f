"""Input checks MONAI's transforms lack: a bad scan must fail with a reason, never yield a silently wrong mask."""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.data import ImageReader, MetaTensor, NibabelReader
from monai.transforms import MapTransform
from scripts.data.headers import MAX_VOXELS, check_header
from scripts.labels import FREESURFER_SUFFIXES


def image_reader(path: str) -> ImageReader | None:
    """The reader for `path` at run time: nibabel for FreeSurfer's `.mgz`/`.mgh` (MONAI chooses readers by suffix and
    knows only NIfTI's for nibabel), else None (MONAI's choice)."""
    return NibabelReader() if str(path).lower().endswith(FREESURFER_SUFFIXES) else None


class CheckHeaderd(MapTransform):
    """Checks the header of each key's file before LoadImaged reads a voxel (`scripts.data.headers.check_header`):
    a file whose header lies is refused by name, and no header allocates more than `max_voxels` voxels. Images
    already in memory (MONAI Deploy's) pass as they are."""

    def __init__(self, keys: KeysCollection, max_voxels: int = MAX_VOXELS, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.max_voxels = int(max_voxels)

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            if isinstance(d[key], (str, os.PathLike)):
                check_header(os.fspath(d[key]), self.max_voxels)
        return d


class RejectInvalidImaged(MapTransform):
    """Raises ValueError for an image that is not one 3D volume, has NaN or infinite voxels, or is constant, and
    with `max_field_of_view_mm`, for one with a side at least that long (a whole head where a crop is expected).

    Place it after EnsureChannelFirstd: a 4D file with one volume passes as one channel, with more it fails.
    """

    def __init__(
        self, keys: KeysCollection, max_field_of_view_mm: float | None = None, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.max_field_of_view_mm = max_field_of_view_mm

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            if image.ndim != 4 or image.shape[0] != 1:
                raise ValueError(
                    f"expected one 3D volume, got an image of shape {tuple(image.shape)} "
                    f"(channel first: {image.shape[0]} volume(s))."
                )
            if self.max_field_of_view_mm is not None and isinstance(image, MetaTensor):
                extent = [float(n * s) for n, s in zip(image.shape[1:], image.pixdim)]
                if max(extent) >= self.max_field_of_view_mm:
                    raise ValueError(
                        f"a field of view of {[round(e) for e in extent]} mm is no hippocampus crop (every side under "
                        f"{self.max_field_of_view_mm:g} mm): a whole head is segmented by the bundle's command line, "
                        "which finds each hippocampus first."
                    )
            finite = torch.isfinite(image)
            if not finite.all():
                raise ValueError(f"{int((~finite).sum())} voxel(s) are NaN or infinite.")
            if image.amax() == image.amin():
                raise ValueError(f"the image is constant ({float(image.amax())}): there is nothing to segment.")
        return d


class EmptyPaddingLabeld(MapTransform):
    """Empties the label of a case marked `padding` (`scripts.engine.distributed.shard`), so MONAI's Dice ignores it: an
    empty ground truth gives NaN, which the metrics' mean leaves out."""

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        if bool(d.get("padding", False)):
            for key in self.key_iterator(d):
                d[key] = torch.zeros_like(d[key])
        return d
