"""Loading the bundle as MONAI's tools do: ConfigWorkflow properties, no side effects, any working directory, and one
clear line for bad weights or checkpoint files."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
from monai.bundle import ConfigWorkflow

from conftest import BUNDLE_DIR, files_under
from scripts import BundleError, find_bundle_error

CHAINS = [
    ("train", ("train.yaml",)),
    ("train", ("train.yaml", "train_native.yaml")),
    ("infer", ("inference.yaml",)),
    ("infer", ("inference.yaml", "inference_tf.yaml")),
    ("infer", ("inference.yaml", "inference_ts.yaml")),
]


def workflow(workflow_type, configs, **overrides):
    return ConfigWorkflow(
        config_file=[os.path.join(BUNDLE_DIR, "configs", name) for name in configs],
        meta_file=os.path.join(BUNDLE_DIR, "configs", "metadata.json"),
        logging_file=False,
        workflow_type=workflow_type,
        bundle_root=BUNDLE_DIR,
        **overrides,
    )


@pytest.mark.parametrize("workflow_type, configs", CHAINS, ids=["+".join(c) for _, c in CHAINS])
def test_workflow_properties_and_initialize_writes_nothing(
    workflow_type, configs, synthetic_task, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    bundle_files = files_under(BUNDLE_DIR)
    flow = workflow(workflow_type, configs, dataset_dir=synthetic_task, output_dir=str(tmp_path / "out"))
    flow.initialize()
    assert flow.check_properties() == []
    assert isinstance(flow.network_def, torch.nn.Module)
    assert os.listdir(tmp_path) == [] and files_under(BUNDLE_DIR) == bundle_files


@pytest.mark.parametrize(
    "workflow_type, configs, missing",
    [
        ("train", ("train.yaml", "train_native.yaml"), "data/Task04_Hippocampus"),
        ("infer", ("inference.yaml",), "data/scans"),
    ],
)
def test_default_paths_load_and_the_run_names_the_missing_folder(
    workflow_type, configs, missing, tmp_path, monkeypatch
):
    """As the model zoo checks a bundle: its configs with their own default paths (no data here) initialise and have
    every property; the run then stops with an exception a host can catch (never SystemExit) naming the folder."""
    monkeypatch.chdir(tmp_path)
    flow = workflow(workflow_type, configs)
    flow.initialize()
    assert flow.check_properties() == []
    with pytest.raises(RuntimeError) as error:
        flow.run()
    cause = find_bundle_error(error.value)
    assert isinstance(cause, BundleError) and missing in str(cause) and "does not exist" in str(cause)
    assert os.listdir(tmp_path) == []


def run_cli(*args, cwd, env=None):
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    return result.returncode, result.stdout + result.stderr


def test_training_evaluation_and_inference_from_another_folder(synthetic_task, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(BUNDLE_DIR, bundle, ignore=shutil.ignore_patterns("__pycache__", "output", "eval"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(bundle))
    native = [str(bundle / "configs" / name) for name in ("train.yaml", "train_native.yaml")]
    common = ["--bundle_root", str(bundle), "--dataset_dir", synthetic_task]
    code, log = run_cli("training", "--config_file", str(native), *common, "--epochs", "1", cwd=elsewhere, env=env)
    assert code == 0, log[-3000:]
    assert (bundle / "output" / "checkpoint.pt").is_file() and (bundle / "models" / "model.pt").is_file()
    code, log = run_cli(
        "evaluating",
        "--config_file",
        str(native + [str(bundle / "configs" / "evaluate.yaml")]),
        *common,
        cwd=elsewhere,
        env=env,
    )
    assert code == 0 and (bundle / "eval" / "summary.json").is_file(), log[-3000:]
    code, log = run_cli(
        "--config_file",
        str(bundle / "configs" / "inference.yaml"),
        *common,
        "--output_dir",
        str(tmp_path / "masks"),
        cwd=elsewhere,
        env=env,
    )
    assert code == 0 and list((tmp_path / "masks").glob("*_seg.nii.gz")), log[-3000:]
    assert os.listdir(elsewhere) == []


@pytest.fixture(scope="module")
def bad_weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights")
    (folder / "corrupt.pt").write_bytes(b"not a checkpoint")
    return folder


@pytest.mark.parametrize("case", ["missing", "missing_fold", "corrupt", "other_recipe", "resume_without_checkpoint"])
def test_bad_weights_or_checkpoint_give_one_line(case, bad_weights, synthetic_task, tmp_path):
    scans = ["--dataset_dir", os.path.join(synthetic_task, "imagesTs"), "--output_dir", str(tmp_path / "out")]
    if case == "missing":
        args, named = [
            "--config_file",
            "configs/inference.yaml",
            *scans,
            "--ckpt_file",
            "models/nothing.pt",
        ], "models/nothing.pt: no such weights or checkpoint file."
    elif case == "missing_fold":  # one of the crops' ensemble
        args, named = [
            "--config_file",
            "configs/inference.yaml",
            *scans,
            "--fold_files",
            "['models/folds/fold0.pt','models/nothing.pt']",
        ], "models/nothing.pt: no such weights or checkpoint file."
    elif case == "corrupt":
        weights = str(bad_weights / "corrupt.pt")
        args, named = [
            "--config_file",
            "configs/inference.yaml",
            *scans,
            "--ckpt_file",
            weights,
        ], f"{weights}: not a readable PyTorch checkpoint"
    elif case == "other_recipe":  # the native weights into the tf recipe's network
        args, named = [
            "--config_file",
            "['configs/inference.yaml','configs/inference_tf.yaml']",
            *scans,
            "--ckpt_file",
            "models/model.pt",
        ], "models/model.pt does not fit the configured network"
    else:
        args, named = [
            "training",
            "--config_file",
            "configs/train.yaml",
            "--dataset_dir",
            synthetic_task,
            "--output_dir",
            str(tmp_path / "train"),
            "--ckpt_dir",
            str(tmp_path / "models"),
            "--resume",
            "true",
        ], f"{tmp_path / 'train' / 'checkpoint.pt'}: no such weights or checkpoint file."
    code, log = run_cli(*args, cwd=BUNDLE_DIR)
    assert code == 1, log[-3000:]
    assert "Traceback" not in log and f"error: {named}" in log, log[-3000:]
    assert not os.path.exists(tmp_path / "out" / "volumes.csv")
