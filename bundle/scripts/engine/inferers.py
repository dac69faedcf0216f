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

    def passes(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> list[torch.Tensor]:
        """The logits of the input as it is, then of each mirror image mapped back (batch and channel first)."""
        outputs = [self.inferer(inputs, network, *args, **kwargs)]
        for axis in self.spatial_axes:
            dims = [axis + 2]
            outputs.append(self.inferer(inputs.flip(dims), network, *args, **kwargs).flip(dims))
        return outputs

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        if getattr(network, "training", False):
            return self.inferer(inputs, network, *args, **kwargs)
        passes = self.passes(inputs, network, *args, **kwargs)
        return sum(passes[1:], passes[0]) / len(passes)


def pass_agreement(passes: Sequence[torch.Tensor]) -> torch.Tensor:
    """(batch, foreground label) Dice between the arg-max of the first pass's logits and each other pass's, averaged
    over the other passes; nan where a label is in neither mask."""
    passes = [convert_to_tensor(p, track_meta=False) for p in passes]
    first = passes[0].argmax(1)
    labels = torch.arange(1, passes[0].shape[1], device=first.device).view(1, -1, *[1] * (first.ndim - 1))
    first = first.unsqueeze(1) == labels
    dices = []
    for other in passes[1:]:
        other = other.argmax(1).unsqueeze(1) == labels
        dims = tuple(range(2, first.ndim))
        both = (first & other).sum(dims).double()
        dices.append(2 * both / (first.sum(dims) + other.sum(dims)).double())  # 0 / 0: nan
    return torch.stack(dices).mean(0)


class EnsembleInferer(Inferer):
    """`inferer`'s flip averaging for each member of an `Ensemble` (a plain network is an ensemble of one), their
    softmax probabilities averaged (`Ensemble.combine`); one network's logits are returned as they are.

    Each case's test-time agreement is kept in `agreement` under its image path: for each label, the Dice of each
    member's mask on the input against its masks on the mirror images, averaged over the members; the case's the
    lower label's. It estimates the case's Dice (`python -m scripts.qc folds`) and is the crops' `qc_score`.
    """

    def __init__(self, inferer: FlipAveragingInferer) -> None:
        self.inferer = inferer
        self.agreement: dict[str, float] = {}

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        if getattr(network, "training", False):
            return self.inferer(inputs, network, *args, **kwargs)
        members = list(network.members) if isinstance(network, Ensemble) else [network]
        logits, agreements = [], []
        for member in members:
            passes = self.inferer.passes(inputs, member, *args, **kwargs)
            logits.append(sum(passes[1:], passes[0]) / len(passes))
            if len(passes) > 1:
                agreements.append(pass_agreement(passes))
        names = getattr(inputs, "meta", {}).get("filename_or_obj")
        if agreements and names is not None:
            per_case = torch.stack(agreements).nanmean(0).nan_to_num(1.0).amin(1)  # a label in no mask agrees
            for name, value in zip([names] if isinstance(names, str) else names, per_case.tolist()):
                self.agreement[str(name)] = value
        return logits[0] if len(logits) == 1 else Ensemble.combine(logits)
