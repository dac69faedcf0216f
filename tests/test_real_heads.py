"""Real heads from other scanners (../shared/data/real_heads, see its README): every head is segmented and its
hippocampi agree with hippodeep's, with the README's inference command; skipped where the folder is absent."""

import os
import re
import shutil

import nibabel as nib
import numpy as np
import pytest

from conftest import BUNDLE_DIR, REPO_DIR
from scripts.qc.calibration import dice
from test_inference import run_inference

REAL_HEADS = os.path.join(os.path.dirname(REPO_DIR), "shared", "data", "real_heads")
pytestmark = pytest.mark.skipif(not os.path.isdir(REAL_HEADS), reason=f"{REAL_HEADS} is absent")


def test_every_real_head_is_segmented_and_agrees_with_hippodeep(tmp_path):
    import subprocess
    import sys

    inputs, output = tmp_path / "in", tmp_path / "out"
    shutil.copytree(os.path.join(REAL_HEADS, "images"), inputs)
    (inputs / "mgz").mkdir()
    shutil.copy(os.path.join(REAL_HEADS, "mgz", "fs_bert_brain.mgz"), inputs / "mgz")
    heads = sorted(f for f in os.listdir(inputs) if f.endswith(".nii.gz"))
    result = run_inference(inputs, output, "--recursive", "true")
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert f"{len(heads) + 1} written, 0 failed" in log
    compared = subprocess.run(
        [
            sys.executable,
            "-m",
            "tools.head_check",
            "compare",
            "--masks",
            str(output),
            "--reference",
            os.path.join(REAL_HEADS, "hippodeep"),
            "--left_suffix",
            "_mask_L.nii.gz",
            "--right_suffix",
            "_mask_R.nii.gz",
            "--threshold",
            "127",
        ],
        cwd=BUNDLE_DIR,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert compared.returncode == 0, compared.stderr[-3000:]
    scores = dict(re.findall(r"^\| (\S+) \| ([0-9.]+ / [0-9.]+) \|", compared.stdout, re.M))
    assert sorted(scores) == [h[: -len(".nii.gz")] for h in heads], compared.stdout
    for case, pair in scores.items():
        assert min(float(v) for v in pair.split(" / ")) >= 0.75, (case, pair)
    # the FreeSurfer file holds the same brain as its NIfTI copy: the same mask on the same grid
    from_mgz, from_nifti = (
        nib.load(str(output / f)) for f in ("mgz/fs_bert_brain_seg.nii.gz", "fs_bert_brain_seg.nii.gz")
    )
    np.testing.assert_allclose(from_mgz.affine, from_nifti.affine, atol=1e-4)
    assert dice(np.asarray(from_mgz.dataobj) > 0, np.asarray(from_nifti.dataobj) > 0) > 0.99
