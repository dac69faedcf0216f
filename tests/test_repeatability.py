"""tools.repeatability's copies of a head: thick slices across the named plane, and the head acquired again in
another position with its true orientation in the header (the head stays where it is in world space)."""

import numpy as np
import pytest
import SimpleITK as sitk

from tools.head_check import TEMPLATE
from tools.repeatability import POSITION_SLICE_MM, PLANES, acquired_again, copies, thick_slices


def agreement(copy, head):
    """Correlation of a copy, sampled back onto the head's grid in world space, with the head, inside the head."""
    back = sitk.GetArrayFromImage(sitk.Resample(copy, head, sitk.Transform(), sitk.sitkLinear, 0.0))
    original = sitk.GetArrayFromImage(head)
    inside = original > np.percentile(original, 50)
    return np.corrcoef(back[inside], original[inside])[0, 1]


@pytest.fixture(scope="module")
def head():
    return sitk.ReadImage(TEMPLATE, sitk.sitkFloat32)


def test_thick_slices_cross_the_named_plane(head):
    for plane, world_axis in PLANES.items():
        thick = thick_slices(head, world_axis, 5.0)
        direction = np.asarray(thick.GetDirection()).reshape(3, 3)
        slice_axis = int(np.argmax(thick.GetSpacing()))
        assert thick.GetSpacing()[slice_axis] == pytest.approx(5.0), plane
        assert np.argmax(np.abs(direction[:, slice_axis])) == world_axis, plane  # the slices' normal
        assert agreement(thick, head) > 0.8, plane


def test_positions_turn_the_scanner_not_the_head(head):
    for turn in (90.0, 180.0):
        again = acquired_again(head, turn, [3.0, -4.0, 5.0], phase_mm=2.0)
        direction = np.asarray(again.GetDirection()).reshape(3, 3)
        slice_axis = int(np.argmax(again.GetSpacing()))
        assert again.GetSpacing()[slice_axis] == pytest.approx(POSITION_SLICE_MM)
        assert np.argmax(np.abs(direction[:, slice_axis])) == 0  # sagittal: across left-right
        assert not np.allclose(direction, np.asarray(head.GetDirection()).reshape(3, 3), atol=0.1)  # other axes
        assert agreement(again, head) > 0.8, turn  # the head where it was, in world space
    names = list(copies(head, np.random.default_rng(0)))
    assert names[0] == "acquired" and len(names) == 8
