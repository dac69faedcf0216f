"""Whole-head inputs: registration to MNI152, both hippocampi with their side, volumes with eTIV, and failures."""

import csv
import glob
import os
import shutil

import nibabel as nib
import numpy as np
import pytest

from dicom_series import write_dicom_series
from tools.head_check import TEMPLATE, dice, in_template_grid, make_harder_heads, make_heads
from test_inference import run_inference

MIN_DICE = {
    "template": 0.99,
    "moved0": 0.99,
    "moved1": 0.99,
    "lps": 0.99,
    "aniso": 0.9,
    "2mm": 0.8,
    "dicom": 0.8,
    "neck": 0.95,
    "cut_face_top": 0.95,
    "skull_stripped": 0.95,
    "freesurfer": 0.99,
}
HARDER = ["neck", "cut_face_top", "skull_stripped", "freesurfer"]
BRAIN_MASK = os.path.join(os.path.dirname(TEMPLATE), "mni_icbm152_brain_mask_2mm.nii.gz")


def read_volumes(folder):
    with open(os.path.join(folder, "volumes.csv"), newline="") as f:
        return {row["case"]: row for row in csv.DictReader(f)}


@pytest.fixture(scope="module")
def head_run(synthetic_task, tmp_path_factory):
    """One inference run over transformed heads, a long neck, a field of view cut at the face and the top, a
    skull-stripped brain, an `.mgz` copy, a DICOM head, a crop, and three that must fail: a head of noise, an
    inverted head, a field of view that misses the hippocampi."""
    folder = tmp_path_factory.mktemp("heads")
    inputs, output = folder / "in", folder / "out"
    descriptions = make_heads(str(inputs))
    descriptions.update(make_harder_heads(str(inputs), names=HARDER))
    two_mm = nib.load(str(inputs / "2mm.nii.gz"))
    corner = nib.affines.apply_affine(two_mm.affine, [two_mm.shape[0] - 1, two_mm.shape[1] - 1, 0])
    # DICOM rows run along LPS y and columns along LPS x: the RAS array reversed in x and y, transposed
    write_dicom_series(
        np.asarray(two_mm.dataobj)[::-1, ::-1].transpose(1, 0, 2),
        str(inputs / "dicom"),
        spacing=(2.0, 2.0, 2.0),
        origin=(-corner[0], -corner[1], corner[2]),
    )
    rng = np.random.default_rng(0)
    nib.save(
        nib.Nifti1Image(rng.random((160, 192, 160)).astype(np.float32) * 100, np.eye(4)), str(inputs / "noise.nii.gz")
    )
    template = nib.load(TEMPLATE)
    inverted = 255.0 - np.asarray(template.dataobj, dtype=np.float32)  # a T2-like contrast: registers, but is no T1
    nib.save(nib.Nifti1Image(inverted, template.affine), str(inputs / "inverted.nii.gz"))
    below = 70  # the field of view starts 2 mm above the hippocampi's centres: their boxes lie half outside it
    cut_affine = template.affine.copy()
    cut_affine[:3, 3] = nib.affines.apply_affine(template.affine, [0, 0, below])
    nib.save(
        nib.Nifti1Image(np.asarray(template.dataobj, dtype=np.float32)[:, :, below:], cut_affine),
        str(inputs / "above_hippocampi.nii.gz"),
    )
    crop = sorted(glob.glob(os.path.join(synthetic_task, "imagesTr", "*.nii.gz")))[0]
    shutil.copy(crop, inputs / "crop.nii.gz")
    result = run_inference(inputs, output)
    return inputs, output, descriptions, result, result.stdout + result.stderr


def test_transformed_heads_agree_with_the_template_and_keep_their_sides(head_run):
    _, output, descriptions, _, log = head_run
    template = nib.load(TEMPLATE)
    world_x = nib.affines.apply_affine(template.affine, np.argwhere(np.ones(template.shape, bool)))[:, 0]
    world_x = world_x.reshape(template.shape)
    reference = in_template_grid(str(output / "template_seg.nii.gz"), "template")
    for name in [*descriptions, "dicom"]:
        labels = in_template_grid(str(output / f"{name}_seg.nii.gz"), name)
        for side, side_labels in (("left", [1, 2]), ("right", [3, 4])):
            score = dice(np.isin(labels, side_labels), np.isin(reference, side_labels))
            assert score >= MIN_DICE[name], (name, side, score, log[-3000:])
        # left hippocampus (1, 2) in the left hemisphere (x < 0 in MNI), right (3, 4) in the right
        assert (world_x[np.isin(labels, [1, 2])] < 0).all() and (world_x[np.isin(labels, [3, 4])] > 0).all(), name


def test_head_volumes_from_the_boxes_agree_with_the_written_masks_and_etiv_with_the_brain(head_run):
    """A head's volumes are measured on its 1 mm boxes: close to its written mask's voxel count on any grid."""
    inputs, output, descriptions, _, _ = head_run
    rows = read_volumes(output)
    brain_mask = nib.load(BRAIN_MASK)
    template_etiv = float(np.asarray(brain_mask.dataobj).sum()) * abs(np.linalg.det(brain_mask.affine[:3, :3]))
    for name in [*descriptions, "dicom"]:
        case = {"dicom": "dicom", "freesurfer": "freesurfer.mgz"}.get(name, f"{name}.nii.gz")
        row = rows[case]
        mask = nib.load(str(output / f"{name}_seg.nii.gz"))
        labels = np.asarray(mask.dataobj)
        voxel = abs(np.linalg.det(mask.affine[:3, :3]))
        assert row["kind"] == "head"
        assert float(row["left_anterior_mm3"]) == pytest.approx((labels == 1).sum() * voxel, rel=0.06), name
        assert float(row["right_posterior_mm3"]) == pytest.approx((labels == 4).sum() * voxel, rel=0.06), name
        assert float(row["total_mm3"]) == pytest.approx((labels > 0).sum() * voxel, rel=0.04), name
        assert float(row["total_mm3"]) == pytest.approx(float(row["left_total_mm3"]) + float(row["right_total_mm3"]))
        assert float(row["left_total_mm3"]) > 2000 and float(row["right_total_mm3"]) > 2000
        # eTIV is the brain mask's volume: the template's is that of its brain mask in atlas/; a changed copy's within
        # 5% (cut_face_top's field of view grazes the brain's top: 2% of its mask, under what counts as a cut)
        exact = name in ("template", "lps", "freesurfer")
        assert float(row["etiv_mm3"]) == pytest.approx(template_etiv, rel=0.01 if exact else 0.05), name
        assert "field of view" not in row["qc_reasons"], name


def test_noise_non_t1_and_cut_heads_are_named_failures_and_crop_stays_a_crop(head_run):
    inputs, output, _, result, log = head_run
    assert result.returncode != 0
    assert f"{len(MIN_DICE) + 1} written, 3 failed" in log  # the heads of MIN_DICE and the crop
    assert any("noise.nii.gz" in line and "registration" in line for line in log.splitlines()), log[-3000:]
    assert any("inverted.nii.gz" in line and "T1" in line for line in log.splitlines()), log[-3000:]
    assert any("above_hippocampi.nii.gz" in line and "outside the image" in line for line in log.splitlines()), log[
        -3000:
    ]
    for name in ("noise", "inverted", "above_hippocampi"):
        assert not (output / f"{name}_seg.nii.gz").exists()
    assert "Traceback" not in log
    rows = read_volumes(output)
    assert rows["crop.nii.gz"]["kind"] == "crop" and rows["crop.nii.gz"]["etiv_mm3"] == ""
    crop_mask = np.asarray(nib.load(str(output / "crop_seg.nii.gz")).dataobj)
    assert set(np.unique(crop_mask)) <= {0, 1, 2}
    # the crop is segmented exactly as the crop path does it when told so
    alone = inputs.parent / "crop_only"
    alone.mkdir()
    shutil.copy(inputs / "crop.nii.gz", alone / "crop.nii.gz")
    forced = run_inference(alone, alone.parent / "crop_out", "--input_kind", "crop")
    assert forced.returncode == 0, forced.stderr[-3000:]
    np.testing.assert_array_equal(
        np.asarray(nib.load(str(alone.parent / "crop_out" / "crop_seg.nii.gz")).dataobj), crop_mask
    )


def test_rerun_skips_finished_heads_and_keeps_their_volumes(head_run, tmp_path):
    inputs, output, _, _, _ = head_run
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("template.nii.gz", "moved0.nii.gz"):
        shutil.copy(inputs / name, folder / name)
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(output / "template_seg.nii.gz", out / "template_seg.nii.gz")
    with open(out / "volumes.csv", "w", newline="") as f:
        table = csv.DictWriter(f, fieldnames=list(read_volumes(output)["template.nii.gz"]))
        table.writeheader()
        table.writerow(read_volumes(output)["template.nii.gz"])
    result = run_inference(folder, out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 written, 0 failed" in result.stdout + result.stderr
    rows = read_volumes(out)
    assert sorted(rows) == ["moved0.nii.gz", "template.nii.gz"]
    assert rows["template.nii.gz"] == read_volumes(output)["template.nii.gz"]


def test_input_kind_from_field_of_view(head_run, synthetic_task):
    from scripts.inference.cases import split_by_kind

    inputs, _, _, _, _ = head_run
    cases = [{"image": str(inputs / name)} for name in ("template.nii.gz", "2mm.nii.gz", "dicom", "crop.nii.gz")]
    split = split_by_kind(cases)
    assert [c["image"] for c in split["head"]] == [c["image"] for c in cases[:3]]
    assert [c["image"] for c in split["crop"]] == [cases[3]["image"]]
    assert split_by_kind(cases, "head")["crop"] == [] and split_by_kind(cases, "crop")["head"] == []
    with pytest.raises(ValueError):
        split_by_kind(cases, "brain")


def test_configured_box_centres_are_where_the_model_finds_the_template_hippocampi():
    import yaml
    from tools.atlas import centres

    cwd = os.getcwd()
    os.chdir(os.path.dirname(os.path.dirname(TEMPLATE)))
    try:
        found = centres()
        with open("configs/inference.yaml") as f:
            configured = yaml.safe_load(f)["head"]["box_centers"]
    finally:
        os.chdir(cwd)
    for side in ("left", "right"):
        np.testing.assert_allclose(found[side], configured[side], atol=0.5)


@pytest.mark.parametrize("reference", ["aseg", "dlmuse", "mask_pair"])
def test_compare_scores_masks_against_other_tools_references(head_run, tmp_path, reference):
    """References made from the template's own mask, stored in another voxel order: FreeSurfer's aseg (17/53, the
    subject's `aseg.mgz`), DLMUSE's ids (48/47) and a pair of left/right masks (hippodeep's, 0/255): Dice 1."""
    import subprocess
    import sys

    from conftest import BUNDLE_DIR

    _, output, _, _, _ = head_run
    mask = nib.load(str(output / "template_seg.nii.gz"))
    labels = np.asarray(mask.dataobj)
    left, right = np.isin(labels, [1, 2]), np.isin(labels, [3, 4])
    flip = np.diag([-1.0, 1.0, -1.0, 1.0])
    flip[[0, 2], 3] = np.array(labels.shape)[[0, 2]] - 1
    folder = tmp_path / "ref"
    folder.mkdir()

    def save(array, name):
        kind = nib.MGHImage if name.endswith(".mgz") else nib.Nifti1Image
        os.makedirs(os.path.dirname(folder / name), exist_ok=True)
        nib.save(kind(array[::-1, :, ::-1].astype(np.int32), mask.affine @ flip), str(folder / name))

    if reference == "mask_pair":
        save(left * 255, "template_mask_L.nii.gz")
        save(right * 255, "template_mask_R.nii.gz")
        options = ["--left_suffix", "_mask_L.nii.gz", "--right_suffix", "_mask_R.nii.gz", "--threshold", "127"]
    elif reference == "aseg":  # FreeSurfer's subject layout and its default labels
        save(np.select([left, right], [17, 53], 0), "template/aseg.mgz")
        options = ["--reference_suffix", "/aseg.mgz"]
    else:
        save(np.select([left, right], [48, 47], 0), "template_dlmuse.nii.gz")
        options = ["--reference_suffix", "_dlmuse.nii.gz", "--left_labels", "48", "--right_labels", "47"]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tools.head_check",
            "compare",
            "--masks",
            str(output),
            "--reference",
            str(folder),
            *options,
        ],
        cwd=BUNDLE_DIR,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| template | 1.000 / 1.000 |" in result.stdout
    assert "over 1 heads" in result.stdout  # the other masks have no reference
    # no false positives, so no share of them in the amygdala; both ends where the reference's are
    row = next(line for line in result.stdout.splitlines() if line.startswith("| template |"))
    assert row.strip("| ").split(" | ")[4:] == ["n/a / n/a", "+0.0 / +0.0", "+0.0 / +0.0", "0.00 / 0.00"], row


def test_border_scores_find_a_mask_moved_into_the_amygdala():
    """A hippocampus 30 voxels long (2 mm voxels, along y) with the amygdala in front of it; a mask 3 voxels (6 mm)
    anterior: all its false positives in the amygdala, its anterior end 6 mm past and posterior end 6 mm short of
    the reference's, and the missed tail the 3 of the tail fifth's 6 slices it no longer covers."""
    from tools.head_check import border_scores

    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    reference, amygdala = np.zeros((20, 50, 20), bool), np.zeros((20, 50, 20), bool)
    reference[5:10, 10:40, 5:10] = True
    amygdala[5:10, 40:48, 5:10] = True
    moved = np.roll(reference, 3, axis=1)
    scores = border_scores(moved, affine, reference, affine, amygdala)
    assert scores["dice"] == pytest.approx(27 / 30)
    assert scores["amygdala_fp_share"] == 1.0
    assert scores["anterior_mm"] == pytest.approx(6.0, abs=0.5)
    assert scores["posterior_mm"] == pytest.approx(-6.0, abs=0.5)
    assert scores["tail_missed"] == pytest.approx(3 / 6, abs=0.1)
    # the same mask on its own 1 mm grid (each 2 mm voxel split in eight), the reference resampled onto it
    fine = moved.repeat(2, 0).repeat(2, 1).repeat(2, 2)
    fine_affine = np.eye(4)
    fine_affine[:3, 3] = -0.5
    again = border_scores(fine, fine_affine, reference, affine, amygdala)
    assert again["dice"] == pytest.approx(27 / 30)
    assert again["amygdala_fp_share"] == 1.0 and again["anterior_mm"] == pytest.approx(6.0, abs=1.0)


def test_freesurfer_input_gets_a_nifti_mask_on_its_own_grid(head_run):
    inputs, output, _, _, _ = head_run
    mask, image = nib.load(str(output / "freesurfer_seg.nii.gz")), nib.load(str(inputs / "freesurfer.mgz"))
    assert isinstance(mask, nib.Nifti1Image) and mask.shape == image.shape
    np.testing.assert_allclose(mask.affine, image.affine, atol=1e-4)
    np.testing.assert_array_equal(
        np.asarray(mask.dataobj), np.asarray(nib.load(str(output / "template_seg.nii.gz")).dataobj)
    )


def test_head_volume_ranges_scale_with_etiv(head_run):
    """The template's hippocampi are as large as its head: flagged for their size only if the head were small."""
    import yaml
    from scripts.qc.check import QualityCheck

    _, output, _, _, _ = head_run
    with open(os.path.join(os.path.dirname(os.path.dirname(TEMPLATE)), "configs", "inference.yaml")) as f:
        qc = yaml.safe_load(f)["qc"]
    quality = QualityCheck(qc["volume_range"], qc["crop"], qc["reference_etiv_mm3"])
    mask = str(output / "template_seg.nii.gz")
    etiv = float(read_volumes(output)["template.nii.gz"]["etiv_mm3"])
    assert "outside" not in quality.row("template", mask, {"etiv_mm3": etiv}, 1.0).qc_reasons
    assert "outside" in quality.row("template", mask, {"etiv_mm3": etiv / 2}, 1.0).qc_reasons


def test_registration_checks_reject_implausible_maps():
    from scripts.head.localisation import HeadError, Registration, TemplateRegistration

    registration = TemplateRegistration(TEMPLATE, BRAIN_MASK)
    registration.check(Registration(np.eye(3), np.zeros(3), 0.5, 0.6, 1.5e6))
    for matrix, mutual_information, correlation, reason in [
        (np.diag([-1.0, 1.0, 1.0]), 0.5, 0.6, "mirrors the head"),
        (np.diag([1.0, 1.0, 1.6]), 0.5, 0.6, "implausible"),
        (np.eye(3), 0.1, 0.6, "mutual information"),
        (np.eye(3), 0.5, -0.3, "does not look like a T1"),
    ]:
        with pytest.raises(HeadError, match=reason):
            registration.check(Registration(matrix, np.zeros(3), mutual_information, correlation, 1.5e6))
