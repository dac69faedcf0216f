"""The deep-supervision loss for stacked network outputs."""

import torch
from monai.losses import DiceCELoss

from scripts.networks.losses import StackedDeepSupervisionLoss


def test_stacked_levels_are_weighted_one_half_quarter():
    torch.manual_seed(0)
    base = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
    loss = StackedDeepSupervisionLoss(base)
    pred = torch.randn(2, 3, 3, 8, 8, 8)
    target = torch.randint(0, 3, (2, 1, 8, 8, 8)).float()
    expected = base(pred[:, 0], target) + 0.5 * base(pred[:, 1], target) + 0.25 * base(pred[:, 2], target)
    torch.testing.assert_close(loss(pred, target), expected)
    # a plain prediction (eval mode, or a network without deep supervision) is the wrapped loss itself
    torch.testing.assert_close(loss(pred[:, 0], target), base(pred[:, 0], target))
