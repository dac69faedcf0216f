"""The failure set's copies (tools/failure_set.py) do what their names say, on a small synthetic head."""

import nibabel as nib
import numpy as np
import pytest

from tools.failure_set import VARIANTS, ShiftedRegistration, damaged, is_bad
from scripts.head.localisation import Registration


@pytest.fixture(scope="module")
def head():
    """A 60x70x60 head at 1.5 mm, RAS, with a left (labels 1/2) and a right (3/4) 'hippocampus'."""
    rng = np.random.default_rng(0)
    from scipy import ndimage

    data = (ndimage.gaussian_filter(rng.random((60, 70, 60)), 3) * 1000).astype(np.float32)
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    affine[:3, 3] = -np.array([30, 52, 45])
    mask = np.zeros(data.shape, np.uint8)
    mask[14:20, 30:38, 25:30], mask[14:20, 38:44, 25:30] = 2, 1  # left: low x is the subject's left in RAS
    mask[40:46, 30:38, 25:30], mask[40:46, 38:44, 25:30] = 4, 3
    return data, affine, mask


@pytest.mark.parametrize("variant", [v for v in VARIANTS if not v.startswith("registration")])
def test_every_copy_is_a_finite_3d_head(head, variant):
    data, affine, mask = head
    copy, copy_affine = damaged(variant, data, affine, mask, np.random.default_rng(1))
    assert copy.ndim == 3 and np.isfinite(copy).all() and copy_affine.shape == (4, 4)
    if variant in ("clean", "moved"):
        np.testing.assert_array_equal(copy, data)
    if variant == "moved":
        assert not np.allclose(copy_affine, affine)


def test_copies_change_what_their_names_say(head):
    data, affine, mask = head
    rng = np.random.default_rng(1)
    # another voxel order, the same head in world space
    copy, copy_affine = damaged("reoriented", data, affine, mask, rng)
    voxel = nib.affines.apply_affine(np.linalg.inv(copy_affine), nib.affines.apply_affine(affine, [10, 20, 30]))
    assert copy[tuple(np.rint(voxel).astype(int))] == data[10, 20, 30]
    # the field of view ends at the right hippocampus's centre (x voxel 42 of 40-45)
    copy, copy_affine = damaged("grazing", data, affine, mask, rng)
    assert copy.shape == (43, 70, 60)
    np.testing.assert_allclose(copy_affine, affine)
    # only the left side's region is replaced
    copy, _ = damaged("one_side", data, affine, mask, rng)
    left, right = np.isin(mask, (1, 2)), np.isin(mask, (3, 4))
    assert not np.allclose(copy[left], data[left]) and np.array_equal(copy[right], data[right])
    # thinner hippocampi: their outer voxels take the darkest brain's value
    copy, _ = damaged("atrophy", data, affine, mask, rng)
    assert (copy[mask > 0] != data[mask > 0]).mean() > 0.3
    # thick slices along the axis nearest superior-inferior
    copy, copy_affine = damaged("slices6mm", data, affine, mask, rng)
    np.testing.assert_allclose(np.linalg.norm(copy_affine[:3, :3], axis=0), [1.5, 1.5, 6.0])
    for variant, spacing in (("sagittal", [5.0, 1.5, 1.5]), ("coronal", [1.5, 5.0, 1.5]), ("axial", [1.5, 1.5, 5.0])):
        copy, copy_affine = damaged(f"slices5mm_{variant}", data, affine, mask, rng)
        np.testing.assert_allclose(np.linalg.norm(copy_affine[:3, :3], axis=0), spacing)


def test_shifted_registration_moves_the_boxes():
    class Fixed:
        def __call__(self, head, mask):
            return Registration(np.eye(3), np.zeros(3), 0.5, 0.5, 1.5e6)

    centre = np.array([[0.0, -18.0, 18.0]])  # the template centre the turn is about
    moved = ShiftedRegistration(Fixed(), [0, 0, 0], [10, 0, 8])(None, None)
    np.testing.assert_allclose(moved(centre), centre + [10, 0, 8])
    turned = ShiftedRegistration(Fixed(), [15, 15, 15], [0, 0, 0])(None, None)
    np.testing.assert_allclose(turned(centre), centre, atol=1e-9)
    assert np.linalg.norm(turned(np.array([[26.8, -22.3, -14.7]])) - [26.8, -22.3, -14.7]) > 8


def test_a_failed_case_or_a_side_under_0_8_is_bad():
    assert is_bad({"failed": "fragmented"})
    assert is_bad({"failed": "", "dice_left": 0.95, "dice_right": 0.79})
    assert not is_bad({"failed": "", "dice_left": 0.95, "dice_right": 0.85})


def test_thresholds_and_the_signal_table_come_from_the_scored_cases(capsys):
    """Each head threshold flags at most 2.5% of the harmless copies; a failed case is caught by its failure alone."""
    from tools.failure_set import _print_scores, thresholds

    def scored(case, group, dice, confidence, agreement, asymmetry=0.05, reasons=""):
        return {
            "case": case,
            "head": "h",
            "variant": case,
            "group": group,
            "failed": "",
            "dice_left": dice,
            "dice_right": dice,
            "confidence_left": confidence,
            "confidence_right": confidence + 0.01,
            "agreement_left": agreement,
            "agreement_right": agreement + 0.01,
            "mutual_information": 0.5,
            "correlation": 0.5,
            "asymmetry": asymmetry,
            "qc_reasons": reasons,
            "left_mm3": 3000.0,
            "right_mm3": 3100.0,
        }

    rows = [scored(f"good{i}", "good", 0.95, 0.93 + i / 1000, 0.95 + i / 1000) for i in range(40)]
    rows += [
        scored("blurred", "damaged", 0.7, 0.90, 0.97),
        scored("shifted", "damaged", 0.75, 0.95, 0.85),
        {"case": "cut", "head": "h", "variant": "cut", "group": "damaged", "failed": "box outside"},
    ]
    thick = [scored(f"thick{i}", "thick", 0.7, 0.85 + i / 1000, 0.88 + i / 1000, 0.1) for i in range(40)]
    chosen = thresholds(rows + thick)
    assert chosen == {"min_confidence": 0.93, "min_agreement": 0.95, "fail_agreement": 0.9, "max_asymmetry": 0.05}
    # the thick-slice copies get their own, by the same rule, and are neither harmless nor bad in the main table
    assert thresholds(rows + thick, group="thick") == {
        "min_confidence": 0.85,
        "min_agreement": 0.88,
        "fail_agreement": 0.8,
        "max_asymmetry": 0.1,
    }
    _print_scores(rows + thick)
    printed = capsys.readouterr().out
    assert "| any of them | 40 of 40 (100%) | 0 of 40 (0%) |" in printed  # thick copies at qc#head's, then their own
    assert "| any of them | 3 of 3 (100%) | 0 of 40 (0%) |" in printed
    assert "| failure (named, no mask) | 1 of 3 (33%) | 0 of 40 (0%) |" in printed
