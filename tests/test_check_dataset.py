"""Tests for bundle/scripts/data/check_dataset.py: every kind of bad case is reported with its file and a reason."""

import json
import logging
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from conftest import BUNDLE_DIR
from scripts.data.check_dataset import BadDatasetError, check_case, check_dataset
from scripts.data.msd import load_training_list

LABELS = {0, 1, 2}


@pytest.fixture
def task(synthetic_task, tmp_path):
    """A private copy of the (read-only, session-wide) synthetic task that a test may corrupt."""
    return shutil.copytree(synthetic_task, str(tmp_path / "Task04_Hippocampus"))


def _path(task, kind, idx):
    return os.path.join(task, f"{kind}sTr", f"hippocampus_{idx:03d}.nii.gz")


def _rewrite(path, fn=lambda data: data, affine_fn=lambda affine: affine):
    img = nib.load(path)
    data, affine = fn(np.asanyarray(img.dataobj).copy()), affine_fn(img.affine.copy())
    out = nib.Nifti1Image(data, affine)
    out.set_qform(affine, code=1)
    out.set_sform(affine, code=1)
    nib.save(out, path)


def _missing_image(task, i):
    os.remove(_path(task, "image", i))
    return _path(task, "image", i)


def _truncated(task, i):
    path = _path(task, "image", i)
    with open(path, "rb") as f:
        raw = f.read()
    with open(path, "wb") as f:
        f.write(raw[: len(raw) // 2])
    return path


def _label_shape(task, i):
    _rewrite(_path(task, "label", i), lambda d: d[:-2])
    return _path(task, "label", i)


def _label_affine(task, i):
    def shift(affine):
        affine[0, 3] += 0.5
        return affine

    _rewrite(_path(task, "label", i), affine_fn=shift)
    return _path(task, "label", i)


def _label_value_5(task, i):
    def put5(d):
        d[0, 0, 0] = 5
        return d

    _rewrite(_path(task, "label", i), put5)
    return _path(task, "label", i)


def _nan_voxels(task, i):
    def nan(d):
        d[1:3, 1:3, 1:3] = np.nan
        return d

    _rewrite(_path(task, "image", i), nan)
    return _path(task, "image", i)


def _constant(task, i):
    _rewrite(_path(task, "image", i), lambda d: np.full_like(d, 7.0))
    return _path(task, "image", i)


def _two_volumes(task, i):
    _rewrite(_path(task, "image", i), lambda d: np.stack([d, d], axis=-1))
    return _path(task, "image", i)


def _one_volume(task, i):
    _rewrite(_path(task, "image", i), lambda d: d[..., None])
    return _path(task, "image", i)


# corruption -> a word the reason must contain
CORRUPTIONS = {
    "missing_image": (_missing_image, "not found"),
    "truncated_gzip": (_truncated, "unreadable"),
    "label_shape": (_label_shape, "shape"),
    "label_affine": (_label_affine, "affine"),
    "label_value_5": (_label_value_5, "[5]"),
    "nan_voxels": (_nan_voxels, "NaN"),
    "constant_image": (_constant, "constant"),
    "4d_two_volumes": (_two_volumes, "4D"),
}


def test_clean_dataset_passes(synthetic_task, caplog):
    with caplog.at_level(logging.WARNING):
        cases = check_dataset(synthetic_task)
    assert cases == load_training_list(synthetic_task)
    assert all(os.path.isabs(p) for case in cases for p in case.values())
    assert not caplog.records
    for case in cases[:3]:
        assert check_case(case, LABELS) == ([], [])


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_bad_case_reported(task, name):
    corrupt, reason = CORRUPTIONS[name]
    bad_file = corrupt(task, 3)
    case = load_training_list(task)[2]
    errors, _ = check_case(case, LABELS)
    assert errors and all(e.startswith(bad_file + ": ") for e in errors), errors
    assert any(reason in e for e in errors), errors

    with pytest.raises(BadDatasetError) as exc:
        check_dataset(task)
    report = str(exc.value)
    assert isinstance(exc.value, ValueError)
    assert report.startswith(f"1 of 12 cases in {task} are bad:\n")
    assert f"  {bad_file}: " in report and reason in report
    assert "--skip_bad_cases true" in report


def test_label_value_reason_names_allowed_labels(task):
    _label_value_5(task, 1)
    errors, _ = check_case(load_training_list(task)[0], LABELS)
    assert errors == [f"{_path(task, 'label', 1)}: label values [5] are not in dataset.json labels [0, 1, 2]"]


def test_4d_with_one_volume_is_a_warning(task, caplog):
    image = _one_volume(task, 2)
    errors, warnings = check_case(load_training_list(task)[1], LABELS)
    assert errors == []
    assert len(warnings) == 1 and warnings[0].startswith(image) and "4D with one volume, squeezed" in warnings[0]
    with caplog.at_level(logging.WARNING, logger="scripts.data.check_dataset"):
        cases = check_dataset(task)
    assert len(cases) == 12 and cases[1]["image"] == image
    assert any(image in r.getMessage() and "squeezed" in r.getMessage() for r in caplog.records)


def test_skip_bad_cases_drops_exactly_the_bad_ones(task, caplog):
    bad = {1: _missing_image, 4: _truncated, 6: _label_value_5, 9: _two_volumes}
    for idx, corrupt in bad.items():
        corrupt(task, idx)
    _one_volume(task, 11)  # only a warning: kept
    all_cases = load_training_list(task)
    with caplog.at_level(logging.WARNING, logger="scripts.data.check_dataset"):
        cases = check_dataset(task, skip_bad_cases=True)
    assert cases == [c for i, c in enumerate(all_cases, start=1) if i not in bad]
    dropped = "\n".join(r.getMessage() for r in caplog.records)
    assert "4 of 12 cases" in dropped
    for idx in bad:
        assert f"hippocampus_{idx:03d}.nii.gz" in dropped
    assert check_dataset(task, skip_bad_cases="true") == cases  # as passed by `--skip_bad_cases true`
    with pytest.raises(BadDatasetError, match="4 of 12 cases"):
        check_dataset(task, skip_bad_cases="false")


def test_skip_bad_cases_with_no_good_case_left(task):
    for idx in range(1, 13):
        _constant(task, idx)
    with pytest.raises(BadDatasetError, match="no good case left"):
        check_dataset(task, skip_bad_cases=True)


def _cli(dataset_dir):
    return subprocess.run(
        [sys.executable, "-m", "scripts.data.check_dataset", "--dataset_dir", dataset_dir],
        cwd=BUNDLE_DIR,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli(task):
    """A clean task's run is the documented command (test_documented_commands.py); here a broken one's."""
    bad_files = [corrupt(task, idx) for idx, (corrupt, _) in enumerate(CORRUPTIONS.values(), start=1)]
    res = _cli(task)
    assert res.returncode == 1
    assert "Traceback" not in res.stderr
    assert f"8 of 12 cases in {task} are bad:" in res.stderr
    for bad_file in bad_files:
        assert f"  {bad_file}: " in res.stderr
    for _, reason in CORRUPTIONS.values():
        assert reason in res.stderr


def test_missing_or_invalid_dataset_json(task, tmp_path):
    os.remove(os.path.join(task, "dataset.json"))
    with pytest.raises(FileNotFoundError, match="dataset.json not found"):
        check_dataset(task)
    res = _cli(task)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "dataset.json not found" in res.stderr and "MSD task folder" in res.stderr

    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_dataset(str(tmp_path / "nowhere"))

    with open(os.path.join(task, "dataset.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(BadDatasetError, match="not valid JSON"):
        check_dataset(task)

    with open(os.path.join(task, "dataset.json"), "w") as f:
        json.dump(
            {
                "training": [
                    {"image": "./imagesTr/hippocampus_001.nii.gz", "label": "./labelsTr/hippocampus_001.nii.gz"}
                ]
            },
            f,
        )
    with pytest.raises(BadDatasetError, match="no 'labels' entry"):
        check_dataset(task)
