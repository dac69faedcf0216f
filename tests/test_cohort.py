"""Cohort inference: nested folders, sharding across processes, volumes.csv with QC flags, reruns, QC pictures."""

import csv
import glob
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from conftest import BUNDLE_DIR, template_crop
from scripts import BundleError
from dicom_series import write_dicom_series
from test_inference import SINGLE_MODEL, run_inference

SHARDED = "['configs/inference.yaml','configs/multi_gpu_inference.yaml']"


def read_volumes(folder):
    with open(os.path.join(folder, "volumes.csv"), newline="", encoding="utf-8") as f:
        return {row["case"]: row for row in csv.DictReader(f)}


def run_sharded(input_dir, output_dir, *extra):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "monai.bundle",
            "run",
            "--config_file",
            SHARDED,
            "--dataset_dir",
            str(input_dir),
            "--output_dir",
            str(output_dir),
            *SINGLE_MODEL,
            *extra,
        ],
        cwd=BUNDLE_DIR,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def bids(synthetic_task, tmp_path_factory):
    """A BIDS-like tree: two subjects' `anat/T1w.nii.gz` (same file name), a nested DICOM series, a top-level scan and
    a broken nested file."""
    root = tmp_path_factory.mktemp("bids") / "in"
    images = sorted(glob.glob(os.path.join(synthetic_task, "imagesTr", "*.nii.gz")))
    for i, subject in enumerate(("sub-01", "sub-02")):
        (root / subject / "ses-1" / "anat").mkdir(parents=True)
        shutil.copy(images[i], root / subject / "ses-1" / "anat" / "T1w.nii.gz")
    # a crop the shipped model finds a hippocampus in, so that the DICOM SEG comparison has labels to compare
    write_dicom_series(template_crop(), str(root / "sub-03" / "dicom" / "t1 series"))
    shutil.copy(images[3], root / "top.nii.gz")
    (root / "sub-03" / "broken.nii.gz").write_bytes(b"not a NIfTI file")
    return root


EXPECTED_MASKS = [
    "sub-01/ses-1/anat/T1w_seg.nii.gz",
    "sub-02/ses-1/anat/T1w_seg.nii.gz",
    "sub-03/dicom/t1 series_seg.nii.gz",
    "top_seg.nii.gz",
]
EXPECTED_CASES = [
    "sub-01/ses-1/anat/T1w.nii.gz",
    "sub-02/ses-1/anat/T1w.nii.gz",
    "sub-03/dicom/t1 series",
    "top.nii.gz",
]


def test_sharded_recursive_run_writes_each_mask_once_and_one_table(bids, tmp_path):
    out = tmp_path / "out"
    result = run_sharded(
        bids, out, "--recursive", "true", "--qc_png", "true", "--num_workers", "1", "--dicom_seg", "true"
    )
    log = result.stdout + result.stderr
    assert result.returncode != 0  # the broken file
    assert log.count("Inference finished: 4 written, 1 failed") == 1, log[-4000:]  # one summary for both processes
    assert any("broken.nii.gz" in line and "FAILED" in line for line in log.splitlines())
    masks = sorted(os.path.relpath(p, out) for p in glob.glob(str(out / "**" / "*_seg.nii.gz"), recursive=True))
    assert masks == sorted(EXPECTED_MASKS)
    for case, mask in zip(EXPECTED_CASES, EXPECTED_MASKS):
        if case.endswith(".nii.gz"):
            assert nib.load(str(out / mask)).shape == nib.load(str(bids / case)).shape
    rows = read_volumes(out)
    assert sorted(rows) == sorted(EXPECTED_CASES)
    for case, mask in zip(EXPECTED_CASES, EXPECTED_MASKS):
        labels = np.asarray(nib.load(str(out / mask)).dataobj)
        voxel = abs(np.linalg.det(nib.load(str(out / mask)).affine[:3, :3]))
        assert float(rows[case]["total_mm3"]) == pytest.approx((labels > 0).sum() * voxel, abs=0.5)
        confidence = rows[case]["confidence"]  # empty when nothing was segmented
        assert rows[case]["qc"] in ("pass", "review") and (confidence == "" or 0 < float(confidence) <= 1)
    pictures = sorted(
        os.path.relpath(p, out / "qc") for p in glob.glob(str(out / "qc" / "**" / "*.png"), recursive=True)
    )
    assert pictures == sorted(m.replace("_seg.nii.gz", ".png") for m in EXPECTED_MASKS)
    assert all(os.path.getsize(out / "qc" / p) > 5000 for p in pictures)

    assert_dicom_seg_matches_mask(bids / "sub-03" / "dicom" / "t1 series", out / "sub-03" / "dicom" / "t1 series_seg")

    # a process died before its masks and the table were written: the rerun completes the cohort, nothing else
    os.remove(out / EXPECTED_MASKS[1])
    os.remove(out / "volumes.csv")
    os.remove(bids / "sub-03" / "broken.nii.gz")
    kept = {m: (out / m).stat().st_mtime_ns for m in EXPECTED_MASKS if m != EXPECTED_MASKS[1]}
    result = run_sharded(bids, out, "--recursive", "true")
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "Inference finished: 1 written, 0 failed" in result.stdout + result.stderr
    assert {m: (out / m).stat().st_mtime_ns for m in kept} == kept
    assert sorted(read_volumes(out)) == sorted(EXPECTED_CASES)


def assert_dicom_seg_matches_mask(series, seg_base):
    """The SEG references every source slice and, placed by each source slice's own position, equals the NIfTI mask."""
    import highdicom as hd
    import pydicom

    seg = hd.seg.segread(f"{seg_base}.dcm")
    assert [item.SegmentLabel for item in seg.SegmentSequence] == ["Anterior hippocampus", "Posterior hippocampus"]
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "5366008"  # SCT hippocampus
    assert seg.SoftwareVersions == json_version()
    sources = [pydicom.dcmread(str(f), stop_before_pixels=True) for f in sorted(series.iterdir())]
    frames = seg.get_pixels_by_source_instance(
        [s.SOPInstanceUID for s in sources], combine_segments=True, ignore_spatial_locations=True
    )
    mask = nib.load(f"{seg_base}.nii.gz")
    labels = np.asarray(mask.dataobj)
    to_voxel = np.linalg.inv(mask.affine)
    assert frames.any()
    for frame, source in zip(frames, sources):
        rows, cols = np.nonzero(np.ones_like(frame))
        x, y = np.array(source.ImageOrientationPatient[:3], float), np.array(source.ImageOrientationPatient[3:], float)
        row_spacing, col_spacing = map(float, source.PixelSpacing)
        lps = (
            np.array(source.ImagePositionPatient, float)
            + np.outer(cols * col_spacing, x)
            + np.outer(rows * row_spacing, y)
        )
        voxels = np.rint(nib.affines.apply_affine(to_voxel, lps * [-1, -1, 1])).astype(int)
        np.testing.assert_array_equal(labels[voxels[:, 0], voxels[:, 1], voxels[:, 2]], frame[rows, cols])


def json_version():
    import json

    with open(os.path.join(BUNDLE_DIR, "configs", "metadata.json")) as f:
        return json.load(f)["version"]


def test_flat_run_ignores_sub_folders_and_empty_input_is_an_error(bids, tmp_path):
    result = run_inference(bids, tmp_path / "out", *SINGLE_MODEL)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "out")) == ["qc", "report.html", "top_seg.nii.gz", "volumes.csv"]
    again = run_inference(bids, tmp_path / "out", *SINGLE_MODEL)  # every case skipped: not an error
    assert again.returncode == 0 and "skipped" in again.stdout + again.stderr
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    result = run_inference(empty, tmp_path / "out2")
    assert result.returncode != 0
    assert (
        "No NIfTI, FreeSurfer (.mgz, .mgh) files or DICOM series to segment" in result.stderr
        and "Traceback" not in result.stderr
    )


def write_mask(path, labels, spacing=1.0):
    nib.save(nib.Nifti1Image(labels.astype(np.uint8), np.diag([spacing] * 3 + [1.0])), str(path))
    return str(path)


def test_quality_flags(tmp_path):
    from scripts.qc.check import CaseRow, QualityCheck

    check = QualityCheck(
        {"anterior": [1000, 3000], "posterior": [1000, 3000]},
        {"min_agreement": 0.9, "fail_agreement": 0.7, "min_slice_sharpness": 0.4},
    )
    labels = np.zeros((40, 40, 40), np.uint8)
    labels[5:17, 5:17, 5:17] = 1  # 1728 mm3
    labels[20:32, 5:17, 5:17] = 2
    good = check.row("good", write_mask(tmp_path / "good.nii.gz", labels), confidence=0.95, agreement=0.95)
    assert (good.qc, good.qc_reasons, good.columns()["anterior_mm3"]) == ("pass", "", "1728.0")
    sharp = check.row("sharp", write_mask(tmp_path / "good.nii.gz", labels), agreement=0.95, slice_sharpness=(0.45, 2))
    assert sharp.qc == "pass"
    resliced = check.row(
        "resliced", write_mask(tmp_path / "good.nii.gz", labels), agreement=0.95, slice_sharpness=(0.3, 2)
    )
    assert (resliced.qc, resliced.qc_reasons) == (
        "review",
        "looks like thick slices along its z axis, resampled to 1 mm: sharpness 0.30 (under 0.4)",
    )
    assert good.columns()["qc_score"] == "0.950"  # a crop's qc_score is its models' agreement
    split = labels.copy()
    split[35:38, 35:38, 35:38] = 2  # a second piece of posterior
    row = check.row("split", write_mask(tmp_path / "split.nii.gz", split), confidence=0.95)
    assert row.qc == "review" and row.qc_reasons == "posterior in 2 pieces"
    no_posterior = np.where(labels == 2, 0, labels)
    row = check.row("absent", write_mask(tmp_path / "absent.nii.gz", no_posterior, spacing=2.0), agreement=0.85)
    assert (
        row.qc_reasons == "anterior 13824 mm3 outside 1000-3000; posterior absent; the ensemble's models agree at 0.850"
    )
    row = check.row("disagrees", write_mask(tmp_path / "good.nii.gz", labels), agreement=0.6)
    assert (row.qc, row.qc_reasons) == ("fail", "the ensemble's models agree at 0.600")
    head = np.zeros((40, 40, 40), np.uint8)
    head[5:17, 5:17, 5:17], head[20:32, 5:17, 5:17], head[5:17, 20:32, 5:17] = 1, 2, 3
    row = check.row("head", write_mask(tmp_path / "head.nii.gz", head), {"etiv_mm3": 1.5e6}, confidence=0.95)
    columns = row.columns()
    assert row.kind == "head" and columns["left_total_mm3"] == "3456.0" and columns["right_anterior_mm3"] == "1728.0"
    assert row.qc_reasons == "right posterior absent" and columns["etiv_mm3"] == "1500000"
    assert CaseRow.from_columns(columns) == row  # a rerun reads the table back to the same row
    boxes = {"left anterior": 1700.0, "left posterior": 1500.0, "right anterior": 1600.0, "right posterior": 1400.0}
    row = check.row("head", write_mask(tmp_path / "head.nii.gz", head), {"etiv_mm3": 1.5e6, "box_volumes_mm3": boxes})
    assert row.volumes == boxes and row.qc == "pass"  # a head's volumes as its 1 mm boxes hold them, not the mask's
    thick = labels[:, :, ::6]  # 6 mm slices along the third axis, the volumes still in range
    affine = np.diag([1.0, 1.0, 6.0, 1.0])
    nib.save(nib.Nifti1Image(thick, affine), str(tmp_path / "thick.nii.gz"))
    row = check.row("thick", str(tmp_path / "thick.nii.gz"), confidence=0.95)
    assert row.qc == "review" and row.qc_reasons == "6 mm slices: volumes move on slices over 5 mm", row.qc_reasons
    nib.save(nib.Nifti1Image(labels[:, :, ::5], np.diag([1.0, 1.0, 5.0, 1.0])), str(tmp_path / "five.nii.gz"))
    assert check.row("five", str(tmp_path / "five.nii.gz"), confidence=0.95).qc == "pass"


def test_head_flags_from_each_sides_signals_and_cohort_outliers(tmp_path):
    """A head's sides are flagged by their own confidence and test-time agreement, a very low agreement fails it,
    its qc_score is the lower agreement; in a run of 20 or more heads one far from the others is an outlier."""
    from scripts.qc.check import CaseRow, QualityCheck, flag_cohort_outliers

    thresholds = {"min_confidence": 0.9, "min_agreement": 0.85, "fail_agreement": 0.6, "max_asymmetry": 0.3}
    crop = {"min_agreement": 0.95, "fail_agreement": 0.9}
    check = QualityCheck({"anterior": [1000, 3000], "posterior": [1000, 3000]}, crop, 1.5e6, thresholds)
    head = np.zeros((40, 40, 40), np.uint8)
    head[5:17, 5:17, 5:17], head[20:32, 5:17, 5:17], head[5:17, 20:32, 5:17], head[20:32, 20:32, 5:17] = 1, 2, 3, 4
    mask = write_mask(tmp_path / "head.nii.gz", head)

    def row(confidence, agreement):
        result = {"etiv_mm3": 1.5e6, "side_confidence": confidence, "side_agreement": agreement}
        return check.row("head", mask, result, confidence=0.93)

    good = row({"left": 0.93, "right": 0.94}, {"left": 0.95, "right": 0.9})
    columns = good.columns()
    assert (good.qc, good.qc_reasons, columns["qc_score"]) == ("pass", "", "0.900")  # 0.9 < 0.95 is crops' only
    assert (columns["left_confidence"], columns["right_agreement"]) == ("0.9300", "0.9000")
    review = row({"left": 0.93, "right": 0.85}, {"left": 0.95, "right": 0.8})
    assert review.qc == "review" and review.qc_reasons == (
        "right hippocampus: test-time augmentations agree at 0.800; right hippocampus: confidence 0.850"
    )
    failed = row({"left": 0.93, "right": 0.94}, {"left": 0.55, "right": 0.9})
    assert failed.qc == "fail" and failed.columns()["qc_score"] == "0.550"
    assert failed.qc_reasons == "left hippocampus: test-time augmentations agree at 0.550"
    # a head of 4 mm slices is held to the thick-slice thresholds, a 1 mm one to the heads'
    thick_thresholds = {**thresholds, "min_slice_mm": 4.0, "min_agreement": 0.75, "fail_agreement": 0.5}
    check = QualityCheck(
        {"anterior": [1000, 3000], "posterior": [1000, 3000]}, crop, 1.5e6, thresholds, 5.0, thick_thresholds
    )
    result = {"etiv_mm3": 1.5e6, "side_confidence": {"left": 0.93, "right": 0.94}}
    result["side_agreement"] = {"left": 0.8, "right": 0.9}
    assert check.row("head", mask, result).qc == "review"
    thick_mask = str(tmp_path / "thick_head.nii.gz")
    nib.save(nib.Nifti1Image(head[:, :, ::4], np.diag([1.0, 1.0, 4.0, 1.0])), thick_mask)
    assert check.row("head", thick_mask, result).qc == "pass"
    result["side_agreement"] = {"left": 0.55, "right": 0.9}
    assert check.row("head", mask, result).qc == "fail" and check.row("head", thick_mask, result).qc == "review"

    rng = np.random.default_rng(0)
    cohort = [
        CaseRow(
            f"{i}",
            "head",
            {"left anterior": 3500 + rng.normal(0, 100), "right anterior": 3600 + rng.normal(0, 100)},
            etiv_mm3=1.5e6,
        )
        for i in range(20)
    ]
    cohort[7].volumes["left anterior"] = 2200.0
    flag_cohort_outliers(cohort[:19])  # fewer than 20 heads: no cohort
    assert all(r.qc == "pass" for r in cohort)
    flag_cohort_outliers(cohort)
    assert [r.case for r in cohort if r.qc == "review"] == ["7"]
    assert "left hippocampus's volume over eTIV a cohort outlier" in cohort[7].qc_reasons


def test_case_stream_reads_cases_only_as_they_are_consumed():
    from scripts.inference.cases import CaseStream, SafeCases

    read = []

    def transform(case):
        read.append(case["image"])
        if case["image"] == "bad":
            raise ValueError("unreadable")
        return {"image": np.zeros((1, 2, 2, 2), np.float32)}

    stream = CaseStream(SafeCases([{"image": name} for name in ("a", "bad", "c", "d")], transform))
    batches = iter(stream)
    next(batches)
    assert read == ["a"]
    assert len(list(batches)) == 2 and read == ["a", "bad", "c", "d"]
    assert stream.failures == [("bad", "ValueError: unreadable")]


def test_inputs_skip_an_output_folder_inside_the_input_folder(tmp_path):
    from scripts.inference.inputs import Inputs

    scans = tmp_path / "scans"
    (scans / "sub-01").mkdir(parents=True)
    write_mask(scans / "sub-01" / "T1w.nii.gz", np.ones((4, 4, 4)))
    out = scans / "masks"
    (out / "sub-01").mkdir(parents=True)
    write_mask(out / "sub-01" / "T1w_seg.nii.gz", np.ones((4, 4, 4)))  # a mask of an earlier run
    inputs = Inputs(str(scans), str(out), recursive=True)
    assert inputs.paths == [str(scans / "sub-01" / "T1w.nii.gz")]
    assert inputs.mask_path(inputs.paths[0]) == str(out / "sub-01" / "T1w_seg.nii.gz")
    assert inputs.pending() == []  # its mask exists
    single = Inputs(str(scans / "sub-01" / "T1w.nii.gz"), str(out))  # one scan is an input too
    assert single.paths == [str(scans / "sub-01" / "T1w.nii.gz")]
    assert single.mask_path(single.paths[0]) == str(out / "T1w_seg.nii.gz")
    with pytest.raises(BundleError, match="does not exist"):
        Inputs(str(scans / "missing.nii.gz"), str(out)).check()  # when the run starts, not when the config loads
