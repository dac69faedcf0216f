"""CPU mixed precision: MONAI 1.6's engines autocast only on CUDA, so bf16 on CPU wraps the inferer instead, and only
where the processor computes bf16 natively (elsewhere it is emulated and 2-3x slower than fp32)."""

from __future__ import annotations

import functools
from typing import Any

import torch
from monai.inferers import Inferer
from scripts import as_bool

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512_BF16 or AMX): the flags of /proc/cpuinfo, False elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return any(flag in flags for flag in NATIVE_BF16_FLAGS)


def cpu_description() -> str:
    """The processor's model name (from /proc/cpuinfo where there is one) and whether it has native bf16."""
    import platform

    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name}, {'native' if cpu_has_native_bf16() else 'no native'} bf16"


def cpu_bf16(setting: object = "auto") -> bool:
    """`--cpu_bf16`: `auto` follows `cpu_has_native_bf16()`; true or false forces bf16 autocast on or off on CPU."""
    if isinstance(setting, str) and setting.strip().lower() == "auto":
        return cpu_has_native_bf16()
    return as_bool(setting)


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
