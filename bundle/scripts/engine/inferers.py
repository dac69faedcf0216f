"""Test-time flip averaging and the cross-validation ensemble's inference: MONAI's TestTimeAugmentation targets
uncertainty estimates, not a plain inferer, and MONAI's ensembles average whole evaluators' outputs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.inferers import Inferer
from monai.utils import convert_to_tensor
from scripts.networks.ensemble import Ensemble


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


def pairwise_agreement(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """(batch, foreground label) Dice between the arg-max masks of each pair of `logits` (batch, channel, ...),
    averaged over the pairs; nan where a label is in no mask of any pair."""
    logits = [convert_to_tensor(x, track_meta=False) for x in logits]
    labels = torch.arange(1, logits[0].shape[1], device=logits[0].device)
    masks = [x.argmax(1, keepdim=True) == labels.view(1, -1, *[1] * (x.ndim - 2)) for x in logits]
    dims = tuple(range(2, masks[0].ndim))
    dices = [
        2 * (a & b).sum(dims).double() / (a.sum(dims) + b.sum(dims)).double()  # 0 / 0: nan
        for i, a in enumerate(masks)
        for b in masks[i + 1 :]
    ]
    return torch.stack(dices).nanmean(0)


class EnsembleInferer(Inferer):
    """`inferer` (flip averaging) for each member of an `Ensemble`, their softmax probabilities averaged
    (`Ensemble.combine`); a plain network's logits are returned as `inferer` gives them.

    Each case's agreement is kept in `agreement` under its image path: for each label, the Dice between the masks
    of each pair of members, averaged over the pairs; the case's the lower label's. It estimates the case's Dice
    (`python -m scripts.qc folds`) and is a crop's `qc_score`. A plain network has none.
    """

    def __init__(self, inferer: Inferer) -> None:
        self.inferer = inferer
        self.agreement: dict[str, float] = {}

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not isinstance(network, Ensemble) or network.training:
            return self.inferer(inputs, network, *args, **kwargs)
        logits = [self.inferer(inputs, member, *args, **kwargs) for member in network.members]
        names = getattr(inputs, "meta", {}).get("filename_or_obj")
        if len(logits) > 1 and names is not None:
            per_case = pairwise_agreement(logits).nan_to_num(1.0).amin(1)  # a label in no mask agrees
            for name, value in zip([names] if isinstance(names, str) else names, per_case.tolist()):
                self.agreement[str(name)] = value
        return Ensemble.combine(logits)
