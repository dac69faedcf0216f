"""Test-time flip averaging and the cross-validation ensemble's inference: MONAI's TestTimeAugmentation targets
uncertainty estimates, not a plain inferer, and MONAI's ensembles average whole evaluators' outputs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.inferers import Inferer
from monai.utils import convert_to_dst_type, convert_to_tensor
from scripts.networks.ensemble import Ensemble


class FlipAveragingInferer(Inferer):
    """Averages the logits of `inferer` on the input and on its mirror images along each of `spatial_axes`.

    Test-time only: a network in training mode gets the single pass, so one inferer serves the trainer too.
    """

    def __init__(self, inferer: Inferer, spatial_axes: Sequence[int] = (0,)) -> None:
        self.inferer = inferer
        self.spatial_axes = list(spatial_axes)

    @property
    def num_views(self) -> int:
        return 1 + len(self.spatial_axes)

    def view(self, inputs: torch.Tensor, network: Any, index: int, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The logits of `inferer` on view `index`: 0 the input as it is, k its mirror image along
        `spatial_axes[k - 1]` (the logits flipped back)."""
        if index == 0:
            return self.inferer(inputs, network, *args, **kwargs)
        dims = [self.spatial_axes[index - 1] + 2]  # batch and channel first
        return self.inferer(inputs.flip(dims), network, *args, **kwargs).flip(dims)

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        if getattr(network, "training", False):
            return self.inferer(inputs, network, *args, **kwargs)
        return sum(self.view(inputs, network, i, *args, **kwargs) for i in range(self.num_views)) / self.num_views


def pairwise_agreement(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """(batch, foreground label) Dice between the arg-max masks of each pair of `logits` (batch, channel, ...),
    averaged over the pairs; nan where a label is in no mask of any pair."""
    logits = [convert_to_tensor(x, track_meta=False) for x in logits]
    labels = torch.arange(1, logits[0].shape[1], device=logits[0].device)
    # max's indices are argmax's (the first maximum), 20 times faster along the channels of a contiguous tensor
    masks = [x.max(1, keepdim=True).indices == labels.view(1, -1, *[1] * (x.ndim - 2)) for x in logits]
    dims = tuple(range(2, masks[0].ndim))
    dices = [
        2 * (a & b).sum(dims).double() / (a.sum(dims) + b.sum(dims)).double()  # 0 / 0: nan
        for i, a in enumerate(masks)
        for b in masks[i + 1 :]
    ]
    return torch.stack(dices).nanmean(0)


def _with_meta_of(inputs: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """`outputs` (their dtype) with the metadata of `inputs` where it has any, as a network's output on them."""
    return convert_to_dst_type(outputs, inputs, dtype=outputs.dtype)[0]


class EnsembleInferer(Inferer):
    """The members of an `Ensemble` one pass each, their softmax probabilities averaged (`Ensemble.combine`); a plain
    network's logits are returned as `inferer` gives them.

    A `FlipAveragingInferer`'s views are dealt to the members in turn (with flips along the first axis the first
    member sees the scan, the second its mirror image, and so on): the ensemble of the five folds is then as accurate
    as with every member flip-averaged (validation split and out of fold, docs/training.md "Cross-validation") in
    half the passes. Any other `inferer` runs for each member.

    Each case's agreement is kept in `agreement` under its image path: for each label, the Dice between the masks
    of each pair of members, averaged over the pairs; the case's the lower label's. It estimates the case's Dice
    (`python -m scripts.qc folds`) and is a crop's `qc_score`. A plain network has none.
    """

    def __init__(self, inferer: Inferer) -> None:
        self.inferer = inferer
        self.agreement: dict[str, float] = {}

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        if getattr(network, "training", False):
            return self.inferer(inputs, network, *args, **kwargs)
        # the passes on a plain tensor, the output with the input's metadata: MetaTensor's tracking through the
        # network's operations costs 6 ms a pass on a crop, a fifth of it
        plain = convert_to_tensor(inputs, track_meta=False)
        if not isinstance(network, Ensemble):
            return _with_meta_of(inputs, self.inferer(plain, network, *args, **kwargs))
        logits = [self._member_logits(plain, member, i, *args, **kwargs) for i, member in enumerate(network.members)]
        names = getattr(inputs, "meta", {}).get("filename_or_obj")
        if len(logits) > 1 and names is not None:
            per_case = pairwise_agreement(logits).nan_to_num(1.0).amin(1)  # a label in no mask agrees
            for name, value in zip([names] if isinstance(names, str) else names, per_case.tolist()):
                self.agreement[str(name)] = value
        return _with_meta_of(inputs, Ensemble.combine(logits))

    def _member_logits(self, inputs: torch.Tensor, member: Any, index: int, *args: Any, **kwargs: Any) -> torch.Tensor:
        if isinstance(self.inferer, FlipAveragingInferer):
            return self.inferer.view(inputs, member, index % self.inferer.num_views, *args, **kwargs)
        return self.inferer(inputs, member, *args, **kwargs)
