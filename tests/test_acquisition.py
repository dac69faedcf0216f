"""The simulated acquisitions: training's thick-slice augmentation and the robustness benchmark's slabs."""

import numpy as np
import pytest
import torch
from scripts.data.acquisition import RandAcquisitiond, neighbour_differences, simulate_voxel_size, slice_sharpness
from scripts.qc.robustness import DEGRADATIONS, slabs


def test_slabs_average_whole_voxels_and_interpolate_between_their_centres():
    # 7 voxels along axis 1: slabs of 3 are voxels 0-2, 3-5 and 6 (centres 1, 4, 6); a ramp along it comes back as it
    # was between the first and last centres and constant before the first; what does not vary along it stays
    pattern = np.random.default_rng(5).normal(size=(4, 1, 3))
    resliced = slabs(pattern + np.arange(7.0).reshape(1, -1, 1), axis=1, width=3)
    assert resliced.shape == (4, 7, 3)
    np.testing.assert_allclose(resliced, pattern + np.array([1, 1, 2, 3, 4, 5, 6.0]).reshape(1, -1, 1), atol=1e-9)


def test_nearest_slabs_repeat_each_slab_mean():
    image = np.random.default_rng(0).normal(size=(5, 10, 4)).astype(np.float32)
    resliced = slabs(image, axis=1, width=5, upsampling="nearest")
    for start in (0, 5):
        np.testing.assert_allclose(
            resliced[:, start : start + 5],
            np.broadcast_to(image[:, start : start + 5].mean(1, keepdims=True), (5, 5, 4)),
            atol=1e-6,
        )


@pytest.mark.parametrize(
    "name, axis, upsampling", [("5mm_slabs_z", 2, "linear"), ("5mm_slabs_nearest_x", 0, "nearest")]
)
def test_benchmark_slabs_are_5_mm_on_the_scans_own_spacing(name, axis, upsampling):
    image = np.random.default_rng(1).normal(size=(12, 12, 12)).astype(np.float32)
    spacing = np.array([1.0, 1.0, 1.0])
    spacing[axis] = 2.5  # 5 mm is two of these voxels
    degraded = DEGRADATIONS[name](image, spacing, np.random.default_rng(0))
    np.testing.assert_array_equal(degraded, slabs(image, axis, 2, upsampling))
    assert not np.allclose(degraded, slabs(image, (axis + 1) % 3, 2, upsampling))


def test_simulated_acquisition_thickens_one_axis_and_keeps_the_intensities():
    image = torch.from_numpy(np.random.default_rng(2).normal(size=(1, 24, 24, 24)).astype(np.float32))
    acquisition = RandAcquisitiond("image", prob=1.0, max_slice_mm=6.0, max_in_plane_mm=1.0)
    acquisition.set_random_state(3)
    low = acquisition({"image": image})["image"]
    assert max(acquisition.factors) > 1.5 and sorted(acquisition.factors)[:2] == [1.0, 1.0]
    slice_axis = int(np.argmax(acquisition.factors))
    # neighbouring voxels along the slice axis become alike; the other axes keep white noise's independence
    roughness = [float((low.diff(dim=1 + a) ** 2).mean()) for a in range(3)]
    assert int(np.argmin(roughness)) == slice_axis
    assert roughness[slice_axis] < 0.5 * min(r for a, r in enumerate(roughness) if a != slice_axis)
    assert float(low.mean()) == pytest.approx(float(image.mean()), abs=1e-4)
    assert float(low.std()) == pytest.approx(float(image.std()), rel=1e-4)


def test_slice_sharpness_tells_thick_slices_from_isotropic_voxels():
    """Relative to an image's own detail, 5 mm slices resampled to 1 mm (linearly or by nearest neighbour) are
    found along their axis; 2 mm isotropic voxels lose detail evenly and are not taken for slices."""
    image = torch.from_numpy(np.random.default_rng(4).normal(size=(1, 30, 40, 30)).astype(np.float32))
    reference = neighbour_differences(image[0])
    assert slice_sharpness(image[0], reference)[0] == pytest.approx(1.0)
    sharpness, axis = slice_sharpness(simulate_voxel_size(image, [1.0, 1.0, 5.0])[0], reference)
    assert sharpness < 0.2 and axis == 2
    assert slice_sharpness(slabs(image[0].numpy(), 0, 5, "nearest"), reference) == (0.0, 0)
    assert slice_sharpness(simulate_voxel_size(image, [2.0, 2.0, 2.0])[0], reference)[0] > 0.9
