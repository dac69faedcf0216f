"""A short training through MONAI's CLI, from a copy of the bundle with no weights."""

import os
import re

import pytest
import torch

from scripts.networks.vnet import VNet

LOSS_LINE = re.compile(r"Epoch: (\d+)/\d+, Iter: \d+/\d+ -- train_loss: ([0-9.]+)")


def test_training_writes_loadable_best_weights(trained_bundle):
    bundle, _ = trained_bundle
    state = torch.load(os.path.join(bundle, "models", "model_tf.pt"), map_location="cpu", weights_only=True)
    VNet().load_state_dict(state)  # a plain state_dict of the configured network


def test_training_logs_validation_and_loss_falls(trained_bundle):
    bundle, log = trained_bundle
    for epoch in (1, 2):
        assert re.search(rf"Epoch\[{epoch}\] Metrics -- .*val_dice_anterior: [0-9.]+ .*val_dice_posterior", log)
        assert re.search(rf"Epoch\[{epoch}\] Metrics -- .*val_mean_dice: [0-9.]+", log)
    losses = {1: [], 2: []}
    for epoch, loss in LOSS_LINE.findall(log):
        losses[int(epoch)].append(float(loss))
    assert losses[1] and losses[2]
    assert sum(losses[2]) / len(losses[2]) < sum(losses[1]) / len(losses[1])
    output = os.path.join(bundle, "output")
    assert os.path.isfile(os.path.join(output, "split.json"))
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(output))
    assert any(name.startswith("checkpoint") for name in os.listdir(output))


def test_training_curve_plot_from_the_run_logs(trained_bundle, tmp_path):
    pytest.importorskip("matplotlib")
    from tools.plots import curve

    png = curve(os.path.join(trained_bundle[0], "output"), str(tmp_path / "curve.png"))
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
