"""TorchScript and ONNX export parity, and the evaluation report (the export and check commands themselves run in
test_documented_commands.py)."""

import csv
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from conftest import BUNDLE_DIR
from scripts.engine.handlers import CaseMetricsReport
from scripts.qc.calibration import dice
from scripts.recipe import load

EXPORT_ARGS = [
    "--ckpt_file",
    "models/model.pt",
    "--meta_file",
    "configs/metadata.json",
    "--config_file",
    "configs/inference.yaml",
]


def bundle_command(*args):
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", *args], cwd=BUNDLE_DIR, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def shipped_network():
    """The network that configs/inference.yaml builds, with the shipped weights."""
    net = load(BUNDLE_DIR, ["configs/inference.yaml"]).get_parsed_content("network_def").eval()
    net.load_state_dict(torch.load(os.path.join(BUNDLE_DIR, "models", "model.pt"), weights_only=True))
    return net


def test_torchscript_export_matches_pytorch(shipped_network, tmp_path):
    bundle_command("ckpt_export", "network_def", "--filepath", str(tmp_path / "model.ts"), *EXPORT_ARGS)
    scripted = torch.jit.load(str(tmp_path / "model.ts"))
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), shipped_network(x), rtol=0, atol=1e-5)


def test_committed_torchscript_matches_committed_weights(shipped_network):
    scripted = torch.jit.load(os.path.join(BUNDLE_DIR, "models", "model.ts"))
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), shipped_network(x), rtol=0, atol=1e-5)


def test_onnx_export_matches_pytorch(shipped_network, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    path = str(tmp_path / "model.onnx")
    bundle_command(
        "onnx_export",
        "network_def",
        "--filepath",
        path,
        *EXPORT_ARGS,
        "--input_shape",
        "[1, 1, 32, 32, 32]",
        "--use_trace",
        "true",
    )
    x = torch.randn(1, 1, 32, 32, 32)
    session = ort.InferenceSession(path)
    onnx_out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(onnx_out), shipped_network(x), rtol=0, atol=1e-4)


def _one_hot(label):
    return torch.nn.functional.one_hot(label.long(), 3).movedim(-1, 0).float()


def test_case_metrics_for_a_perfect_prediction(tmp_path):
    label = torch.zeros(20, 24, 16)
    label[5:12, 6:18, 4:10] = 1
    label[12:16, 6:18, 4:10] = 2
    affine = torch.diag(torch.tensor([0.8, 1.0, 1.5, 1.0]))
    label_meta = MetaTensor(_one_hot(label), affine=affine, meta={"filename_or_obj": "/data/case_7.nii.gz"})
    item = {
        "pred": label_meta.clone(),
        "label": label_meta,
        "resized_pred": 100 * _one_hot(label),  # logits
        "resized_label": label[None],
    }
    report = CaseMetricsReport(str(tmp_path), ["background", "anterior", "posterior"])
    engine = SimpleNamespace(state=SimpleNamespace(output=[item]))
    report.collect(engine)
    report.write(engine)
    with open(tmp_path / "metrics.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert row["case"] == "case_7.nii.gz"
    for name in ("anterior", "posterior"):
        assert float(row[f"dice_{name}"]) == pytest.approx(1.0)
        assert float(row[f"hd95_{name}"]) == pytest.approx(0.0)
        assert float(row[f"nsd_{name}"]) == pytest.approx(1.0)
        assert float(row[f"tf_soft_dice_{name}"]) == pytest.approx(1.0)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["num_cases"] == 1 and summary["dice_anterior"]["mean"] == pytest.approx(1.0)


def test_case_metrics_use_voxel_spacing_in_mm(tmp_path):
    label = torch.zeros(30, 30, 30)
    label[10:20, 10:20, 10:20] = 1
    label[20:24, 10:20, 10:20] = 2
    pred = label.clone()
    pred[8:10, 10:20, 10:20] = 1  # anterior grows by 2 voxels along axis 0 only
    affine = torch.diag(torch.tensor([2.0, 1.0, 1.0, 1.0]))
    item = {
        "pred": MetaTensor(_one_hot(pred), affine=affine),
        "label": MetaTensor(_one_hot(label), affine=affine, meta={"filename_or_obj": "c.nii.gz"}),
        "resized_pred": _one_hot(pred),
        "resized_label": label[None],
    }
    report = CaseMetricsReport(str(tmp_path), ["background", "anterior", "posterior"])
    report.collect(SimpleNamespace(state=SimpleNamespace(output=[item])))
    assert report.rows[0]["hd95_anterior"] == pytest.approx(4.0)  # 2 voxels of 2 mm
    assert report.rows[0]["dice_posterior"] == pytest.approx(1.0)


@pytest.mark.parametrize("ensemble", ["true", "false"])
def test_evaluate_command_scores_what_inference_writes(synthetic_task, tmp_path, ensemble):
    """The documented evaluation scores the masks the documented inference writes, case by case: the crops' ensemble
    by default, ckpt_file's model alone with --ensemble false; the reports say which."""
    flags = [] if ensemble == "true" else ["--ensemble", "false"]
    log = bundle_command(
        "run",
        "evaluating",
        "--config_file",
        "['configs/train.yaml','configs/train_native.yaml','configs/evaluate.yaml']",  # the shipped model's recipe
        "--dataset_dir",
        synthetic_task,
        "--output_dir",
        str(tmp_path),
        "--train_split",
        "0.75",  # three validation cases
        *flags,
    )
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and {"dice_anterior", "hd95_posterior", "nsd_anterior"} <= set(rows[0])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["num_cases"] == 3 and "tf_soft_dice_posterior" in summary
    scored = "fold0.pt, fold1.pt, fold2.pt, fold3.pt, fold4.pt" if ensemble == "true" else "model.pt"
    assert summary["model"] == scored and {row["model"] for row in rows} == {scored}
    assert f"Evaluation of 3 cases by {scored}" in log

    # the masks inference writes score what evaluation reports: one network, inferer, mapping back and post-processing
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    for row in rows:
        os.symlink(os.path.join(synthetic_task, "imagesTr", row["case"]), images / row["case"])
    bundle_command(
        "run",
        "--config_file",
        "configs/inference.yaml",
        "--dataset_dir",
        str(images),
        "--output_dir",
        str(masks),
        *flags,
    )
    for row in rows:
        name = row["case"][: -len(".nii.gz")]
        mask = np.asarray(nib.load(str(masks / f"{name}_seg.nii.gz")).dataobj)
        label = np.asarray(nib.load(os.path.join(synthetic_task, "labelsTr", row["case"])).dataobj)
        for value, part in ((1, "anterior"), (2, "posterior")):
            assert dice(mask == value, label == value) == pytest.approx(float(row[f"dice_{part}"]), abs=1e-6)
