"""Inference on folders of NIfTI files and DICOM series, and its handling of bad cases."""

import csv
import fnmatch
import glob
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from monai.transforms import LoadImage

from conftest import BUNDLE_DIR, template_crop
from dicom_series import write_dicom_series

# what every run writes beside the masks: the volumes table, the cohort report and its QC pictures
RUN_FILES = ("volumes.csv", "report.html", "qc")
# for tests of reading and writing files: the single model (quicker); the crops' ensemble has its own tests
SINGLE_MODEL = ("--ensemble", "false")


def run_inference(input_dir, output_dir, *extra, config="configs/inference.yaml", prefix=()):
    """The inference command line on `input_dir`; `prefix`: a command that runs it (e.g. one that measures it)."""
    return subprocess.run(
        [
            *prefix,
            sys.executable,
            "-m",
            "monai.bundle",
            "run",
            "--config_file",
            config,
            "--dataset_dir",
            str(input_dir),
            "--output_dir",
            str(output_dir),
            *extra,
        ],
        cwd=BUNDLE_DIR,
        capture_output=True,
        text=True,
        timeout=300,
    )


def oblique_affine(spacing, angle, origin):
    c, s = np.cos(angle), np.sin(angle)
    rotation = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


@pytest.fixture(scope="module")
def scans(synthetic_task, tmp_path_factory):
    """Synthetic scans of several shapes re-saved with oblique, anisotropic affines (one flipped)."""
    folder = tmp_path_factory.mktemp("scans")
    images = sorted(glob.glob(os.path.join(synthetic_task, "imagesTr", "*.nii.gz")))[:3]
    geometries = [
        ((1.0, 1.0, 1.0), 0.0, (0, 0, 0)),
        ((0.9, 1.1, 1.3), 0.3, (10, -5, 2)),
        ((-1.0, 1.0, 1.2), -0.5, (3, 3, 3)),
    ]
    for i, (image, (spacing, angle, origin)) in enumerate(zip(images, geometries)):
        data = np.asarray(nib.load(image).dataobj)
        if i == 2:
            data = data[:, :-3, 2:]
        nib.save(nib.Nifti1Image(data, oblique_affine(spacing, angle, origin)), str(folder / f"scan {i} é.nii.gz"))
    return folder


@pytest.fixture(scope="module")
def crop_run(scans, tmp_path_factory):
    """One run of the command line over the scans, which several tests read."""
    out = tmp_path_factory.mktemp("crop_run")
    return out, run_inference(scans, out)


def test_nifti_masks_match_each_input_grid(scans, crop_run):
    tmp_path, result = crop_run
    assert result.returncode == 0, result.stderr[-3000:]
    inputs = sorted(glob.glob(str(scans / "*.nii.gz")))
    assert "3 written, 0 failed" in result.stdout + result.stderr
    for image in inputs:
        mask_path = tmp_path / os.path.basename(image).replace(".nii.gz", "_seg.nii.gz")
        source, mask = nib.load(image), nib.load(str(mask_path))
        assert mask.shape == source.shape
        np.testing.assert_allclose(mask.affine, source.affine, atol=1e-4)
        assert mask.get_data_dtype() == np.uint8
        labels = np.asarray(mask.dataobj)
        assert set(np.unique(labels)) <= {0, 1, 2}
        # volumes.csv: each label's voxel count times the voxel volume of the mask's own grid
        with open(tmp_path / "volumes.csv", newline="", encoding="utf-8") as f:
            row = {r["case"]: r for r in csv.DictReader(f)}[os.path.basename(image)]
        voxel = abs(np.linalg.det(source.affine[:3, :3]))
        assert row["kind"] == "crop" and row["left_total_mm3"] == "" and row["etiv_mm3"] == ""
        assert float(row["anterior_mm3"]) == pytest.approx((labels == 1).sum() * voxel, abs=0.1)
        assert float(row["posterior_mm3"]) == pytest.approx((labels == 2).sum() * voxel, abs=0.1)


def test_dicom_series_folder(synthetic_task, tmp_path):
    volume = np.asarray(nib.load(sorted(glob.glob(os.path.join(synthetic_task, "imagesTr", "*")))[1]).dataobj)
    series = write_dicom_series(volume, str(tmp_path / "in" / "patient 1"))
    result = run_inference(tmp_path / "in", tmp_path / "out", *SINGLE_MODEL)
    assert result.returncode == 0, result.stderr[-3000:]
    mask = nib.load(str(tmp_path / "out" / "patient 1_seg.nii.gz"))
    reference = LoadImage(image_only=True)(series)  # the series' geometry as MONAI's reader reports it
    assert mask.shape == tuple(reference.shape)
    np.testing.assert_allclose(mask.affine, reference.affine.numpy(), atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(mask.affine[:3, :3], axis=0), [1.0, 1.0, 1.2], atol=1e-4)


def test_bad_file_is_named_and_others_are_written(scans, tmp_path):
    folder = tmp_path / "in"
    shutil.copytree(scans, folder)
    good = sorted(os.listdir(folder))
    (folder / "broken.nii.gz").write_bytes(b"this is not a NIfTI file")
    result = run_inference(folder, tmp_path / "out", *SINGLE_MODEL)
    log = result.stdout + result.stderr
    assert result.returncode != 0
    assert "broken.nii.gz" in log and "3 written, 1 failed" in log
    written = sorted(name for name in os.listdir(tmp_path / "out") if name not in RUN_FILES)
    assert written == sorted(name.replace(".nii.gz", "_seg.nii.gz") for name in good)


def test_existing_outputs_are_kept_unless_overwrite(scans, tmp_path):
    first = sorted(glob.glob(str(scans / "*.nii.gz")))[0]
    existing = tmp_path / os.path.basename(first).replace(".nii.gz", "_seg.nii.gz")
    existing.write_bytes(b"keep me")
    result = run_inference(scans, tmp_path, *SINGLE_MODEL)
    assert result.returncode == 0, result.stderr[-3000:]
    assert existing.read_bytes() == b"keep me" and "2 written, 0 failed" in result.stdout + result.stderr
    result = run_inference(scans, tmp_path, "--overwrite", "true", *SINGLE_MODEL)
    assert result.returncode == 0 and nib.load(str(existing)).shape == nib.load(first).shape


@pytest.fixture(scope="module")
def single_model_run(scans, tmp_path_factory):
    """The scans segmented by models/model.pt alone (`--ensemble false`), as heads and MONAI's clients are."""
    out = tmp_path_factory.mktemp("single_model_run")
    return out, run_inference(scans, out, *SINGLE_MODEL)


def test_crops_are_segmented_by_the_folds_ensemble_with_a_qc_score(crop_run, single_model_run):
    """By default the five fold models segment crops (their masks are not the single model's), and each crop's
    qc_score is their agreement, an estimate of its Dice; the single model gives none."""
    (ensemble_dir, ensemble), (single_dir, single) = crop_run, single_model_run
    assert ensemble.returncode == 0 and single.returncode == 0, single.stderr[-3000:]
    tables = []
    for folder in (ensemble_dir, single_dir):
        with open(folder / "volumes.csv", newline="", encoding="utf-8") as f:
            tables.append({row["case"]: row for row in csv.DictReader(f)})
    assert tables[0].keys() == tables[1].keys() and len(tables[0]) == 3
    assert all(0.0 <= float(row["qc_score"]) <= 1.0 for row in tables[0].values())
    assert all(row["qc_score"] == "" for row in tables[1].values())
    differs = [
        (
            np.asarray(nib.load(str(ensemble_dir / name)).dataobj)
            != np.asarray(nib.load(str(single_dir / name)).dataobj)
        ).any()
        for name in fnmatch.filter(os.listdir(ensemble_dir), "*_seg.nii.gz")
    ]
    assert any(differs)


def test_crops_resliced_from_thick_slices_are_flagged_by_their_content(tmp_path):
    """A crop whose header says 1 mm but whose content was resampled from 5 mm slices (linearly, or repeated by a
    nearest-neighbour reslice) is flagged for review naming the slices' axis; the crop as acquired is not."""
    import torch
    from scripts.data.acquisition import simulate_voxel_size
    from scripts.qc.robustness import slabs

    crop = template_crop().astype(np.float32)
    copies = {
        "acquired": crop,
        "thick z": simulate_voxel_size(torch.from_numpy(crop)[None], [1.0, 1.0, 5.0])[0].numpy(),
        "nearest x": slabs(crop, 0, 5, "nearest"),
    }
    images = tmp_path / "in"
    images.mkdir()
    for name, data in copies.items():
        nib.save(nib.Nifti1Image(data, np.eye(4)), str(images / f"{name}.nii.gz"))
    result = run_inference(images, tmp_path / "out", *SINGLE_MODEL, "--report", "false")
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "out" / "volumes.csv", newline="", encoding="utf-8") as f:
        reasons = {row["case"].removesuffix(".nii.gz"): row["qc_reasons"] for row in csv.DictReader(f)}
    assert "thick slices" not in reasons["acquired"]
    assert "looks like thick slices along its z axis, resampled to 1 mm" in reasons["thick z"]
    assert "looks like thick slices along its x axis, resampled to 1 mm: sharpness 0.00" in reasons["nearest x"]


def test_torchscript_config_gives_the_same_masks(scans, single_model_run, tmp_path):
    """The committed models/model.ts (the export of models/model.pt: test_export_and_evaluate.py) through its config,
    against the same weights in eager mode."""
    eager_dir, eager = single_model_run
    scripted = run_inference(scans, tmp_path / "ts", config="['configs/inference.yaml','configs/inference_ts.yaml']")
    assert eager.returncode == 0 and scripted.returncode == 0, scripted.stderr[-3000:]
    for name in fnmatch.filter(os.listdir(eager_dir), "*_seg.nii.gz"):
        a = np.asarray(nib.load(str(eager_dir / name)).dataobj)
        b = np.asarray(nib.load(str(tmp_path / "ts" / name)).dataobj)
        assert (a != b).mean() < 1e-3


def test_broken_inputs_are_each_named_with_a_reason(scans, tmp_path):
    folder = tmp_path / "in"
    shutil.copytree(scans, folder)
    good = sorted(os.listdir(folder))
    source = nib.load(str(folder / good[0]))
    data = np.asarray(source.dataobj).astype(np.float32)
    raw = (folder / good[0]).read_bytes()
    (folder / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    with_nan = data.copy()
    with_nan[5, 5, 5] = np.nan
    nib.save(nib.Nifti1Image(with_nan, source.affine), str(folder / "nan.nii.gz"))
    nib.save(nib.Nifti1Image(np.full(data.shape, 3.0, np.float32), source.affine), str(folder / "constant.nii.gz"))
    nib.save(nib.Nifti1Image(np.stack([data, data], -1), source.affine), str(folder / "two volumes.nii.gz"))
    nib.save(nib.Nifti1Image(data[..., None], source.affine), str(folder / "one volume 4d.nii.gz"))
    result = run_inference(folder, tmp_path / "out", *SINGLE_MODEL)
    log = result.stdout + result.stderr
    assert result.returncode != 0
    assert "4 written, 4 failed" in log
    for name, reason in [
        ("truncated.nii.gz", ""),
        ("nan.nii.gz", "NaN"),
        ("constant.nii.gz", "constant"),
        ("two volumes.nii.gz", "2 volume"),
    ]:
        assert any(name in line and reason in line for line in log.splitlines()), (name, log[-3000:])
    written = sorted(name for name in os.listdir(tmp_path / "out") if name not in RUN_FILES)
    expected = [name.replace(".nii.gz", "_seg.nii.gz") for name in good + ["one volume 4d.nii.gz"]]
    assert written == sorted(expected)
    assert "Traceback" not in log


def test_unusable_output_folder_fails_before_any_work(scans, tmp_path):
    blocker = tmp_path / "a file"
    blocker.write_text("not a folder")
    result = run_inference(scans, blocker / "out")
    assert result.returncode != 0
    assert "not writable" in result.stderr and "Traceback" not in result.stderr
    assert "Restored" not in result.stdout + result.stderr  # stopped before loading the model


def test_flip_averaging_inferer_averages_mirrored_logits():
    import torch
    from monai.inferers import SimpleInferer
    from scripts.engine.inferers import FlipAveragingInferer

    weight = torch.linspace(0, 1, 8).view(1, 1, 8, 1, 1)  # a network that is not mirror symmetric
    network = lambda x: x * weight  # noqa: E731
    x = torch.rand(2, 1, 8, 6, 4)
    plain = FlipAveragingInferer(SimpleInferer(), spatial_axes=[])(x, network)
    flipped = FlipAveragingInferer(SimpleInferer(), spatial_axes=[0])(x, network)
    torch.testing.assert_close(plain, network(x))
    torch.testing.assert_close(flipped, (network(x) + network(x.flip(2)).flip(2)) / 2)
    torch.testing.assert_close(flipped, x * 0.5)  # weight and its mirror image average to 1/2
