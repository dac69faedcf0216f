"""The V-Net port: shapes, parameter count, TorchScript, and input size checks."""

import pytest
import torch

from conftest import BUNDLE_DIR
from scripts.networks.vnet import VNet


@pytest.mark.parametrize(
    "kwargs, shape",
    [
        ({}, (2, 1, 32, 32, 32)),
        ({"out_channels": 2, "kernel_size": 5, "act": "prelu"}, (1, 1, 16, 24, 40)),
        ({"norm": "instance", "pooling": "max_pool", "upsampling": "trilinear"}, (1, 1, 16, 16, 16)),
        ({"norm": "none", "pooling": "avg_pool", "full_res_skip": True}, (1, 1, 48, 64, 48)),
        ({"in_channels": 2, "downscale_blocks": (1, 2), "upscale_blocks": (1,)}, (1, 2, 12, 8, 4)),
    ],
)
def test_output_shape(kwargs, shape):
    net = VNet(**kwargs).eval()
    with torch.no_grad():
        out = net(torch.randn(shape))
    assert out.shape == (shape[0], kwargs.get("out_channels", 3), *shape[2:])
    assert torch.isfinite(out).all()


def test_parameter_count_matches_the_tensorflow_original():
    assert sum(p.numel() for p in VNet().parameters()) == 3_599_747


def test_full_res_skip_changes_only_the_output_conv():
    plain, skip = VNet(), VNet(full_res_skip=True)
    assert skip.output_conv.in_channels == 2 * plain.output_conv.in_channels
    # the input block output reaches the logits directly only through the skip
    n_plain = sum(p.numel() for p in plain.parameters())
    n_skip = sum(p.numel() for p in skip.parameters())
    assert n_skip - n_plain == 16 * 3 * 27


def test_torchscript_matches_eager():
    torch.manual_seed(0)
    net = VNet(full_res_skip=True).eval()
    scripted = torch.jit.script(net)
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), net(x), rtol=1e-5, atol=1e-5)


def test_deep_supervision_stacks_upsampled_predictions_in_training_only():
    net = VNet(full_res_skip=True, deep_supervision=True)
    # one 1x1x1 head per up level (128 and 64 channels: upsampled features + skip) on top of the plain network
    extra = sum(p.numel() for p in net.parameters()) - sum(p.numel() for p in VNet(full_res_skip=True).parameters())
    assert extra == (128 + 1) * 3 + (64 + 1) * 3
    x = torch.randn(2, 1, 16, 24, 32)
    stacked = net.train()(x)
    assert stacked.shape == (2, 3, 3, 16, 24, 32)
    net.eval()
    with torch.no_grad():
        plain = net(x)
        assert plain.shape == (2, 3, 16, 24, 32)
        torch.testing.assert_close(torch.jit.script(net)(x), plain, rtol=1e-5, atol=1e-5)
    # every level is trained: each auxiliary head gets a gradient from its slice of the stack
    net.train()
    net(x)[:, 1:].sum().backward()
    assert all(head.weight.grad.abs().sum() > 0 for head in net.aux_heads)


def test_bad_spatial_size_says_which_sizes_work():
    with pytest.raises(ValueError, match="divisible by 8"):
        VNet()(torch.randn(1, 1, 30, 32, 32))
    with pytest.raises(torch.jit.Error, match="divisible by 8"):
        torch.jit.script(VNet())(torch.randn(1, 1, 32, 32, 36))


@pytest.mark.parametrize(
    "kwargs",
    [{"kernel_size": 4}, {"act": "elu"}, {"norm": "group"}, {"pooling": "stride"}, {"upscale_blocks": (3, 3, 3)}],
)
def test_bad_arguments_rejected(kwargs):
    with pytest.raises(ValueError):
        VNet(**kwargs)


def test_input_broadcast_added_to_first_features():
    net = VNet(norm="none").eval()
    # with the input conv zeroed and ReLU, the input block passes the input through to all 16 channels
    torch.nn.init.zeros_(net.input_conv[0].weight)
    features = {}
    net.down_levels[0].register_forward_hook(lambda m, inp, out: features.update(x=inp[0]))
    x = torch.rand(1, 1, 8, 8, 8)
    with torch.no_grad():
        net(x)
    assert torch.allclose(features["x"], x.expand(1, 16, 8, 8, 8))


def test_cpu_bf16_follows_the_processor_unless_forced(monkeypatch):
    from scripts.engine import amp

    monkeypatch.setattr(amp, "cpu_has_native_bf16", lambda: False)
    assert amp.cpu_bf16("auto") is False and amp.cpu_bf16("true") is True
    monkeypatch.setattr(amp, "cpu_has_native_bf16", lambda: True)
    assert amp.cpu_bf16("auto") is True and amp.cpu_bf16(False) is False
    # the configs' inferers follow the setting
    from scripts.recipe import load

    for config, inferer in (("inference.yaml", "inferer"), ("train.yaml", "inferer")):
        for setting, expected in (("false", False), ("true", True)):
            parser = load(BUNDLE_DIR, [f"configs/{config}"], {"cpu_bf16": setting})
            assert parser.get_parsed_content(inferer).enabled is expected, (config, setting)
