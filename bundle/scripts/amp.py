"""CPU mixed precision: MONAI 1.6's engines autocast only on CUDA, so bf16 on CPU wraps the inferer instead."""

from __future__ import annotations

from typing import Any

import torch
from monai.inferers import Inferer


class CPUAutocastInferer(Inferer):
    """Runs `inferer` under bf16 autocast when `enabled` and the input is on the CPU; returns float32.

    On CUDA it only delegates: there the engines' own `amp` (fp16 with GradScaler) applies.
    """

    def __init__(self, inferer: Inferer, enabled: bool = True) -> None:
        self.inferer = inferer
        self.enabled = enabled

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> Any:
        if not (self.enabled and inputs.device.type == "cpu"):
            return self.inferer(inputs, network, *args, **kwargs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs = self.inferer(inputs, network, *args, **kwargs)
        return outputs.float()
