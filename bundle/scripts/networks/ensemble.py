"""An ensemble of networks of one architecture (the cross-validation's folds), their probabilities averaged."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Ensemble(nn.Module):
    """Networks whose softmax probabilities are averaged. `forward` returns the log of the mean probability, so a
    softmax after it gives that mean and its arg-max is the ensemble's label, as for one network's logits.

    Args:
        members: the networks, each mapping (N, C_in, ...) to logits (N, C_out, ...).
    """

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member.")
        self.members = nn.ModuleList(members)

    @staticmethod
    def combine(logits: Sequence[torch.Tensor]) -> torch.Tensor:
        """The log of the mean of the softmax probabilities of each member's `logits` (channel dimension 1)."""
        with torch.autocast(logits[0].device.type, enabled=False):
            probabilities = torch.stack([x.float().softmax(1) for x in logits]).mean(0)
            return probabilities.clamp_min(torch.finfo(torch.float32).tiny).log()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.combine([member(x) for member in self.members])
