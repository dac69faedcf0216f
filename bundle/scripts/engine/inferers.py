"""Test-time flip averaging: MONAI's TestTimeAugmentation targets uncertainty estimates, not a plain inferer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.inferers import Inferer


class FlipAveragingInferer(Inferer):
    """Averages the logits of `inferer` on the input and on its mirror images along each of `spatial_axes`.

    Test-time only: a network in training mode gets the single pass, so one inferer serves the trainer too.
    """

    def __init__(self, inferer: Inferer, spatial_axes: Sequence[int] = (0,)) -> None:
        self.inferer = inferer
        self.spatial_axes = list(spatial_axes)

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        outputs = self.inferer(inputs, network, *args, **kwargs)
        if getattr(network, "training", False):
            return outputs
        for axis in self.spatial_axes:
            dims = [axis + 2]  # batch and channel first
            outputs = outputs + self.inferer(inputs.flip(dims), network, *args, **kwargs).flip(dims)
        return outputs / (1 + len(self.spatial_axes))
