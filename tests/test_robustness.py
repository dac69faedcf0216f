"""Crash-resume, determinism and checkpoint safety of training through MONAI's CLI."""

import os
import re
import signal
import subprocess
import sys
import time

import torch

from conftest import copy_bundle, run_bundle

TRAIN = ["training", "--config_file", "configs/train.yaml"]


def load_weights(bundle):
    return torch.load(os.path.join(bundle, "models", "model_tf.pt"), map_location="cpu", weights_only=True)


def test_same_seed_gives_bitwise_identical_weights_on_either_data_path(trained_bundle, synthetic_task, tmp_path):
    """Two runs, the second on the GPU path (device-resident cache, ThreadDataLoader) with CPU tensors."""
    bundle = copy_bundle(tmp_path / "b")
    run_bundle(bundle, *TRAIN, "--dataset_dir", synthetic_task, "--epochs", "2", "--device_cache", "true")
    weights = [load_weights(trained_bundle[0]), load_weights(bundle)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_sigkill_mid_epoch_then_resume_finishes(synthetic_task, tmp_path):
    bundle = copy_bundle(tmp_path / "bundle")
    log_path = tmp_path / "killed.log"
    args = [sys.executable, "-m", "monai.bundle", "run", *TRAIN, "--dataset_dir", synthetic_task, "--epochs", "4"]
    with open(log_path, "w") as log:
        process = subprocess.Popen(args, cwd=bundle, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while "Epoch: 3/4, Iter: 2/" not in log_path.read_text():
            assert process.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert "Epoch[3] Complete" not in log_path.read_text()
    checkpoint = os.path.join(bundle, "output", "checkpoint.pt")
    trainer_state = torch.load(checkpoint, weights_only=True)["trainer"]
    assert trainer_state["iteration"] == 2 * trainer_state["epoch_length"]  # the last complete epoch

    log = run_bundle(bundle, *args[4:], "--resume", "true")
    assert "Restored all variables from" in log
    epochs_run = {int(e) for e in re.findall(r"Epoch: (\d+)/4, Iter", log)}
    assert epochs_run == {3, 4}
    assert "Epoch[4] Complete" in log
    state = load_weights(bundle)
    assert "output_conv.weight" in state
    trainer_state = torch.load(checkpoint, weights_only=True)["trainer"]
    assert trainer_state["iteration"] == 4 * trainer_state["epoch_length"]
    assert not [name for name in os.listdir(os.path.join(bundle, "output")) if name.endswith(".tmp")]


def test_resume_keeps_the_best_metric(synthetic_task, tmp_path):
    bundle = copy_bundle(tmp_path / "bundle")
    # plain `run` is the same workflow as `run training`
    run_bundle(bundle, "--config_file", "configs/train.yaml", "--dataset_dir", synthetic_task, "--epochs", "1")
    saved = torch.load(os.path.join(bundle, "output", "checkpoint.pt"), weights_only=True)["best_metric"]
    assert saved["best_metric_epoch"] == 1 and saved["best_metric"] > 0
    log = run_bundle(bundle, *TRAIN, "--dataset_dir", synthetic_task, "--epochs", "2", "--resume", "true")
    best = re.findall(r"Key metric: val_mean_dice best value: ([0-9.]+) at epoch: (\d+)", log)
    assert best and float(best[-1][0]) >= saved["best_metric"] - 1e-6


def test_mismatched_checkpoint_names_the_keys(tmp_path, synthetic_task):
    from scripts.networks.vnet import VNet

    wrong = tmp_path / "wrong.pt"
    torch.save(VNet(out_channels=2, full_res_skip=True).state_dict(), wrong)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "run",
            "--config_file",
            "configs/inference.yaml",
            "--dataset_dir",
            synthetic_task,
            "--output_dir",
            str(tmp_path / "out"),
            "--ckpt_file",
            str(wrong),
        ],
        cwd=os.path.join(os.path.dirname(__file__), "..", "bundle"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "size mismatch for output_conv.weight" in result.stderr
    assert f"{wrong} does not fit the configured network" in result.stderr and "Traceback" not in result.stderr


def test_bad_dataset_refuses_to_train_unless_skipped(synthetic_task, tmp_path):
    import shutil

    task = tmp_path / "task"
    shutil.copytree(synthetic_task, task)
    broken = sorted((task / "imagesTr").iterdir())[0]
    broken.write_bytes(b"truncated")
    bundle = copy_bundle(tmp_path / "bundle")
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", *TRAIN, "--dataset_dir", str(task), "--epochs", "1"],
        cwd=bundle,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0 and broken.name in result.stderr and "Traceback" not in result.stderr
    assert not os.path.exists(os.path.join(bundle, "models", "model_tf.pt"))
    log = run_bundle(bundle, *TRAIN, "--dataset_dir", str(task), "--epochs", "1", "--skip_bad_cases", "true")
    assert broken.name in log and os.path.exists(os.path.join(bundle, "models", "model_tf.pt"))
