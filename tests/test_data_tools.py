"""Tests for the synthetic data generator and the download helper in bundle/scripts."""

import json
import os
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from scripts.data import download as download_mod
from scripts.data.synthetic import SHAPE_MAX, SHAPE_MIN, make_synthetic_dataset

BUNDLE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundle")
NUM_CASES = 8


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "Task04_Hippocampus"
    assert make_synthetic_dataset(str(out), num_cases=NUM_CASES, seed=0) == str(out)
    return str(out)


def _load(root, rel):
    return nib.load(os.path.join(root, rel))


def test_dataset_json(synth_dir):
    with open(os.path.join(synth_dir, "dataset.json")) as f:
        meta = json.load(f)
    for key in ("name", "description", "reference", "licence", "tensorImageSize", "modality", "labels"):
        assert key in meta
    assert meta["tensorImageSize"] == "3D"
    assert meta["modality"] == {"0": "MRI"}
    assert meta["labels"] == {"0": "background", "1": "Anterior", "2": "Posterior"}
    assert meta["numTraining"] == len(meta["training"]) == NUM_CASES
    assert meta["numTest"] == len(meta["test"]) >= 2
    for item in meta["training"]:
        assert item["image"].startswith("./imagesTr/hippocampus_") and item["image"].endswith(".nii.gz")
        assert item["label"] == item["image"].replace("imagesTr", "labelsTr")
        assert os.path.isfile(os.path.join(synth_dir, item["image"]))
        assert os.path.isfile(os.path.join(synth_dir, item["label"]))
    for rel in meta["test"]:
        assert rel.startswith("./imagesTs/")
        assert os.path.isfile(os.path.join(synth_dir, rel))
    assert len(os.listdir(os.path.join(synth_dir, "imagesTs"))) == meta["numTest"]


def test_volumes(synth_dir):
    with open(os.path.join(synth_dir, "dataset.json")) as f:
        meta = json.load(f)
    shapes = set()
    for item in meta["training"]:
        img, lab = _load(synth_dir, item["image"]), _load(synth_dir, item["label"])
        assert img.shape == lab.shape and len(img.shape) == 3
        assert all(lo <= s <= hi for s, lo, hi in zip(img.shape, SHAPE_MIN, SHAPE_MAX))
        shapes.add(img.shape)
        np.testing.assert_allclose(img.header.get_zooms(), (1.0, 1.0, 1.0))
        np.testing.assert_allclose(img.affine, lab.affine)
        assert img.header["qform_code"] == 1 and img.header["sform_code"] == 1
        assert img.get_data_dtype() == np.float32 and lab.get_data_dtype() == np.uint8
        image = img.get_fdata()
        label = np.asarray(lab.dataobj)
        assert np.isfinite(image).all() and image.min() >= 0 and image.std() > 0
        assert set(np.unique(label).tolist()) == {0, 1, 2}
        fg = (label > 0).mean()
        assert 0.003 < fg < 0.2
        # the two structures are adjacent: dilating label 1 reaches label 2
        assert (ndimage.binary_dilation(label == 1) & (label == 2)).any()
        # and visible: the structure differs from the rest of the image
        assert abs(image[label > 0].mean() - image[label == 0].mean()) > 0.02 * image.mean()
    assert len(shapes) > 1


def test_deterministic(synth_dir, tmp_path):
    same = make_synthetic_dataset(str(tmp_path / "same"), num_cases=NUM_CASES, seed=0)
    other = make_synthetic_dataset(str(tmp_path / "other"), num_cases=NUM_CASES, seed=1)
    rel = "imagesTr/hippocampus_001.nii.gz"
    rel_lab = "labelsTr/hippocampus_001.nii.gz"
    a, b, c = (_load(d, rel) for d in (synth_dir, same, other))
    np.testing.assert_array_equal(a.get_fdata(), b.get_fdata())
    np.testing.assert_array_equal(
        np.asarray(_load(synth_dir, rel_lab).dataobj), np.asarray(_load(same, rel_lab).dataobj)
    )
    with open(os.path.join(synth_dir, rel), "rb") as f1, open(os.path.join(same, rel), "rb") as f2:
        assert f1.read() == f2.read()
    assert a.shape != c.shape or not np.array_equal(a.get_fdata(), c.get_fdata())


def test_cli(tmp_path):
    out = tmp_path / "cli"
    res = subprocess.run(
        [sys.executable, "-m", "scripts.data.synthetic", "--output_dir", str(out), "--num_cases", "3", "--seed", "5"],
        cwd=BUNDLE_DIR,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    with open(out / "dataset.json") as f:
        meta = json.load(f)
    assert meta["numTraining"] == 3
    assert all((out / item["label"]).is_file() for item in meta["training"])


def test_download_offline_fails_fast(tmp_path, monkeypatch):
    from monai.apps.datasets import DecathlonDataset

    monkeypatch.setitem(DecathlonDataset.resource, "Task04_Hippocampus", "http://127.0.0.1:9/x.tar")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    start = time.monotonic()
    with pytest.raises(SystemExit) as exc:
        download_mod.download(str(data_dir))
    assert time.monotonic() - start < 10
    msg = str(exc.value.code)
    assert "Task04_Hippocampus" in msg and "127.0.0.1" in msg and "\n" not in msg
    assert os.listdir(data_dir) == []


def test_download_failure_after_connect_cleans_up(tmp_path, monkeypatch):
    """A failure during the download itself (past the connectivity check) leaves nothing behind."""
    monkeypatch.setattr(download_mod, "_check_reachable", lambda url: None)

    def fail(url, filepath, output_dir, **kwargs):
        with open(filepath, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("connection reset")

    import monai.apps

    monkeypatch.setattr(monai.apps, "download_and_extract", fail)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with pytest.raises(SystemExit, match="connection reset"):
        download_mod.download(str(data_dir))
    assert os.listdir(data_dir) == []


def test_download_skips_existing(tmp_path, capsys):
    target = tmp_path / "Task04_Hippocampus"
    target.mkdir()
    (target / "dataset.json").write_text("{}")
    assert download_mod.download(str(tmp_path)) == str(target)
    assert "already" in capsys.readouterr().out
