"""Deep-supervision loss for stacked outputs: MONAI's DeepSupervisionLoss takes a list, its DynUNet (and
`scripts.networks.vnet.VNet(deep_supervision=True)`) return one tensor stacked along dim 1."""

from __future__ import annotations

import torch
from monai.losses import DeepSupervisionLoss

__all__ = ["StackedDeepSupervisionLoss"]


class StackedDeepSupervisionLoss(DeepSupervisionLoss):
    """`DeepSupervisionLoss` whose input may be predictions stacked along dim 1, full resolution first
    (weights 1, 1/2, 1/4, ... with the default ``weight_mode="exp"``); a plain prediction is passed through."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # noqa: A002 (MONAI's name)
        if input.ndim == target.ndim + 1:
            return super().forward(list(torch.unbind(input, dim=1)), target)
        return super().forward(input, target)
