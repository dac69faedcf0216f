"""Ignite handlers the bundle needs and MONAI lacks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from ignite.engine import Engine, Events


class PerClassMetrics:
    """Replaces each per-class metric tensor in `engine.state.metrics` by one scalar per class.

    MONAI's metric handlers with ``reduction="mean_batch"`` store a tensor that StatsHandler and
    TensorBoardStatsHandler cannot log; ``val_dice`` becomes ``val_dice_anterior`` and so on.
    Attach it after the metrics (the evaluator attaches its metrics before its handlers).
    """

    def __init__(self, metric_names: Sequence[str], class_names: Sequence[str]) -> None:
        self.metric_names = list(metric_names)
        self.class_names = list(class_names)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        for name in self.metric_names:
            values = torch.as_tensor(engine.state.metrics.pop(name)).flatten()
            if values.numel() != len(self.class_names):
                raise ValueError(f"metric {name} has {values.numel()} values for classes {self.class_names}.")
            for class_name, value in zip(self.class_names, values.tolist()):
                engine.state.metrics[f"{name}_{class_name}"] = value
