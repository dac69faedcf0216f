"""Acquisitions simulated on a 1 mm scan (MONAI's RandSimulateLowResolution has one isotropic, aliased zoom only), and
measured: what an image's content tells of its slices when its header says 1 mm."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import GaussianSmooth, MapTransform, RandomizableTransform
from scripts.imaging import antialiasing_sigmas


def simulate_voxel_size(image: torch.Tensor, factors: Sequence[float]) -> torch.Tensor:
    """`image` (channel first, 3D) as if acquired with voxels `factors` times larger along each axis, on its own grid:
    anti-aliased (`scripts.imaging.antialiasing_sigmas`), sampled down, then trilinearly back up."""
    if all(f <= 1.0 for f in factors):
        return image
    sigma = antialiasing_sigmas([1.0] * len(factors), factors)  # in voxels
    blurred = torch.as_tensor(GaussianSmooth(sigma=sigma)(image), dtype=torch.float32)
    size = image.shape[1:]
    coarse = [max(round(n / max(float(f), 1.0)), 1) for n, f in zip(size, factors)]
    low = F.interpolate(blurred[None], size=coarse, mode="trilinear", align_corners=False)
    return F.interpolate(low, size=list(size), mode="trilinear", align_corners=False)[0].to(image.dtype)


class RandAcquisitiond(RandomizableTransform, MapTransform):
    """With probability `prob`, a lower resolution on 1 mm `keys`: one random axis (the slice axis) gets a voxel size
    uniform in [1, `max_slice_mm`], the other two share one uniform in [1, `max_in_plane_mm`]: from 2 mm 3D scans to
    clinical 5 mm slices. The image keeps its mean and standard deviation, as z-scoring the degraded scan would give."""

    def __init__(self, keys, prob: float = 0.4, max_slice_mm: float = 5.0, max_in_plane_mm: float = 2.5) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        self.max_slice_mm, self.max_in_plane_mm = max_slice_mm, max_in_plane_mm
        self.factors = [1.0, 1.0, 1.0]

    def randomize(self, data=None) -> None:
        super().randomize(None)
        if not self._do_transform:
            return
        in_plane = self.R.uniform(1.0, self.max_in_plane_mm)
        self.factors = [in_plane] * 3
        self.factors[self.R.randint(3)] = self.R.uniform(1.0, self.max_slice_mm)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            image = d[key]
            low = simulate_voxel_size(image, self.factors)
            d[key] = (low - low.mean()) / low.std().clamp_min(1e-6) * image.std() + image.mean()
        return d


def neighbour_differences(image) -> np.ndarray:
    """The mean squared difference between neighbouring voxels along each axis of a 3D `image`, z-scored: how much
    fine detail each axis holds; 0 along an axis where most neighbouring slices are identical (thick slices
    resampled by nearest neighbour)."""
    image = np.asarray(image, dtype=np.float64)
    image = (image - image.mean()) / max(float(image.std()), 1e-6)
    differences = []
    for axis in range(image.ndim):
        pairs = np.mean(np.diff(image, axis=axis) ** 2, axis=tuple(a for a in range(image.ndim) if a != axis))
        differences.append(float(pairs.mean()) if np.median(pairs) > 0 else 0.0)
    return np.array(differences)


def slice_sharpness(image, reference: Sequence[float]) -> tuple[float, int]:
    """The detail of a 3D 1 mm `image` along its least detailed axis over that along its most detailed one, each
    axis's `neighbour_differences` taken relative to `reference` (their medians over Task04's training crops, whose
    hippocampus is smoother along its long axis); and that axis. About 0.85 for a crop as acquired, as high for an
    isotropic loss of detail (2 mm voxels: 0.65-0.95), 0.2-0.45 for 5 mm slices resampled to 1 mm (0 by nearest
    neighbour)."""
    relative = neighbour_differences(image) / np.asarray(reference, dtype=np.float64)
    if relative.max() <= 0:  # a constant image: nothing to tell its slices by
        return 1.0, 0
    return float(relative.min() / relative.max()), int(relative.argmin())


class SliceSharpnessd(MapTransform):
    """Puts `slice_sharpness` (and `slice_axis`, its axis) of each key's channel-first 3D image, on its 1 mm grid,
    into the image's metadata, for QC (`scripts.inference.cases.SliceSharpnessRecorder`); the image is unchanged."""

    def __init__(self, keys, reference: Sequence[float]) -> None:
        super().__init__(keys)
        self.reference = [float(r) for r in reference]

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            sharpness, axis = slice_sharpness(np.asarray(d[key][0]), self.reference)
            d[key].meta["slice_sharpness"], d[key].meta["slice_axis"] = sharpness, axis
        return d
