"""torchrun with two CPU processes (gloo): the same configs as multi-GPU training and evaluation."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from scripts.data.synthetic import make_synthetic_dataset
from conftest import copy_bundle, run_bundle

MULTI_TRAIN = "['configs/train.yaml','configs/multi_gpu_train.yaml','configs/test_rank_weights.yaml']"
# test-only override: each rank saves its own final weights, to compare them
RANK_WEIGHTS = """finalize:
- "$torch.save(@network.module.state_dict(), @output_dir + '/rank' + str(torch.distributed.get_rank()) + '.pt')"
- $scripts.engine.distributed.finalize()
"""


@pytest.fixture(scope="module")
def distributed_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    task = make_synthetic_dataset(str(root / "task"), num_cases=24)  # 3 validation cases for 2 ranks
    bundle = copy_bundle(root / "bundle")
    with open(os.path.join(bundle, "configs", "test_rank_weights.yaml"), "w") as f:
        f.write(RANK_WEIGHTS)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nnodes=1",
            "--nproc_per_node=2",
            "-m",
            "monai.bundle",
            "run",
            "training",
            "--config_file",
            MULTI_TRAIN,
            "--dataset_dir",
            task,
            "--epochs",
            "1",
        ],
        cwd=bundle,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return bundle, task, result.stdout + result.stderr


def test_one_checkpoint_and_identical_weights_on_both_ranks(distributed_run):
    bundle, _, _ = distributed_run
    written = [name for _, _, names in os.walk(os.path.join(bundle, "models")) for name in names]
    assert written == ["model_tf.pt"]
    output = os.path.join(bundle, "output")
    ranks = [torch.load(os.path.join(output, f"rank{r}.pt"), weights_only=True) for r in (0, 1)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    shipped = torch.load(os.path.join(bundle, "models", "model_tf.pt"), weights_only=True)
    assert all(torch.equal(shipped[k], ranks[0][k]) for k in shipped)  # 1 epoch: the best is the last
    events = [name for name in os.listdir(output) if name.startswith("events.out.tfevents")]
    assert len({name.split(".")[-2] for name in events}) == 1  # TensorBoard from one process only


def test_key_metric_equals_single_process_evaluation(distributed_run):
    bundle, task, log = distributed_run
    (distributed,) = re.findall(r"Epoch\[1\] Metrics -- .*val_mean_dice: ([0-9.]+)", log)
    # training's validation keeps every piece of a label; evaluation keeps the largest, as inference does, unless told
    single = run_bundle(
        bundle,
        "evaluating",
        "--config_file",
        "['configs/train.yaml','configs/evaluate.yaml']",
        "--dataset_dir",
        task,
        "--keep_largest",
        "false",
    )
    (evaluated,) = re.findall(r"Metrics -- .*val_mean_dice: ([0-9.]+)", single)
    assert float(distributed) == pytest.approx(float(evaluated), abs=1e-4)


def test_evaluation_with_fewer_cases_than_processes(distributed_run, tmp_path):
    """One validation case for two processes: one scores it, the other a padding copy that the metrics leave out."""
    bundle, task, _ = distributed_run
    evaluate = ["evaluating", "--dataset_dir", task, "--train_split", "0.96"]  # 23 training cases, 1 validation
    single = str(tmp_path / "single")
    run_bundle(
        bundle, *evaluate, "--config_file", "['configs/train.yaml','configs/evaluate.yaml']", "--output_dir", single
    )
    sharded = str(tmp_path / "sharded")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nnodes=1",
            "--nproc_per_node=2",
            "-m",
            "monai.bundle",
            "run",
            *evaluate,
            "--output_dir",
            sharded,
            "--config_file",
            "['configs/train.yaml','configs/evaluate.yaml','configs/multi_gpu_evaluate.yaml']",
        ],
        cwd=bundle,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = result.stdout + result.stderr
    reports = [json.load(open(os.path.join(folder, "summary.json"))) for folder in (single, sharded)]
    assert reports[0]["num_cases"] == reports[1]["num_cases"] == 1
    for metric in ("dice_anterior", "dice_posterior", "hd95_anterior"):
        assert reports[1][metric]["mean"] == pytest.approx(reports[0][metric]["mean"], abs=1e-6), metric
    (mean_dice,) = re.findall(r"Metrics -- .*val_mean_dice: ([0-9.]+)", log)
    assert float(mean_dice) == pytest.approx(
        (reports[0]["dice_anterior"]["mean"] + reports[0]["dice_posterior"]["mean"]) / 2, abs=1e-4
    )
