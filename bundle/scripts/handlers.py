"""Ignite handlers the bundle needs and MONAI lacks."""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Sequence

import torch
from ignite.engine import Engine, Events

from scripts import atomic_write


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


def voxel_spacing(image: torch.Tensor) -> list[float]:
    """Voxel size in mm along each array axis, from the MetaTensor's affine."""
    affine = torch.as_tensor(image.meta["affine"], dtype=torch.float64)
    return torch.linalg.norm(affine[:3, :3], dim=0).tolist()


def soft_dice(probabilities: torch.Tensor, label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-class soft Dice of softmax `probabilities` (C, ...) against an index `label` (1, ...): the seed's measure."""
    one_hot = torch.nn.functional.one_hot(label[0].long(), num_classes).movedim(-1, 0).to(probabilities)
    dims = tuple(range(1, probabilities.ndim))
    intersection = (probabilities * one_hot).sum(dims)
    return 2 * intersection / (probabilities.sum(dims) + one_hot.sum(dims)).clamp_min(1e-8)


class CaseMetricsReport:
    """Per case and class: Dice, HD95 (mm) and normalized surface Dice, in each scan's own grid, plus the
    seed's soft Dice in the resized space; writes `metrics.csv` and `summary.json` and logs a table.

    MONAI's metric handlers cannot pass each case's voxel spacing, which HD95 and NSD in mm need.
    Reads `pred`/`label` (one-hot, original grid) and `resized_pred`/`resized_label` from the evaluator output.
    """

    def __init__(self, output_dir: str, class_names: Sequence[str], nsd_tolerance_mm: float = 1.0) -> None:
        self.output_dir = output_dir
        self.class_names = list(class_names)
        self.nsd_tolerance_mm = nsd_tolerance_mm
        self.rows: list[dict] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda _: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.write)

    def collect(self, engine: Engine) -> None:
        from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice

        foreground = self.class_names[1:]
        for item in engine.state.output:
            pred, label = item["pred"][None].float(), item["label"][None].float()
            spacing = voxel_spacing(item["label"])
            values = {
                "dice": compute_dice(pred, label, include_background=False)[0],
                "hd95": compute_hausdorff_distance(pred, label, percentile=95, spacing=spacing)[0],
                "nsd": compute_surface_dice(
                    pred, label, [self.nsd_tolerance_mm] * len(foreground), spacing=spacing
                )[0],
                "seed_soft_dice": soft_dice(item["resized_pred"], item["resized_label"], len(self.class_names))[1:],
            }
            row = {"case": os.path.basename(str(item["label"].meta["filename_or_obj"]))}
            for metric, per_class in values.items():
                for name, value in zip(foreground, per_class.tolist()):
                    row[f"{metric}_{name}"] = value
            self.rows.append(row)

    def write(self, engine: Engine) -> None:
        import ignite.distributed as idist

        rows = self.rows
        if idist.get_world_size() > 1:
            rows = [row for rank_rows in idist.all_gather(rows) for row in rank_rows]
        rows = sorted({row["case"]: row for row in rows}.values(), key=lambda row: row["case"])  # sampler padding
        if idist.get_rank() != 0 or not rows:
            return
        os.makedirs(self.output_dir, exist_ok=True)
        columns = list(rows[0])
        with open(os.path.join(self.output_dir, "metrics.csv"), "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        summary: dict = {"num_cases": len(rows)}
        for column in columns[1:]:
            values = torch.tensor([row[column] for row in rows], dtype=torch.float64)
            finite = values[torch.isfinite(values)]
            summary[column] = {
                "mean": finite.mean().item() if len(finite) else float("nan"),
                "std": finite.std(unbiased=False).item() if len(finite) else float("nan"),
                "num_undefined": int(len(values) - len(finite)),
            }
        with open(os.path.join(self.output_dir, "summary.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
        lines = [f"{'metric':<16}" + "".join(f"{name:>22}" for name in self.class_names[1:])]
        for metric in ("dice", "hd95", "nsd", "seed_soft_dice"):
            cells = [summary[f"{metric}_{name}"] for name in self.class_names[1:]]
            lines.append(f"{metric:<16}" + "".join(f"{c['mean']:>13.4f} ± {c['std']:<6.4f}" for c in cells))
        logging.getLogger(__name__).info(
            f"Evaluation of {len(rows)} cases (original grid; seed_soft_dice in the resized space):\n" + "\n".join(lines)
        )


class AtomicCheckpointSaver:
    """Saves `save_dict` to `save_dir/filename` through a temporary file and a rename, so a kill while saving
    never leaves a corrupt checkpoint (MONAI's CheckpointSaver writes in place).

    A single object is saved as its plain state_dict. With `key_metric`, it saves only at epochs where the
    engine's key metric improved (attach it to the evaluator); otherwise every `interval` epochs.
    """

    def __init__(
        self, save_dir: str, save_dict: dict, filename: str, key_metric: bool = False, interval: int = 1
    ) -> None:
        self.save_dir = save_dir
        self.save_dict = save_dict
        self.filename = filename
        self.key_metric = key_metric
        self.interval = interval

    def attach(self, engine: Engine) -> None:
        event = Events.EPOCH_COMPLETED if self.key_metric else Events.EPOCH_COMPLETED(every=self.interval)
        engine.add_event_handler(event, self)

    def __call__(self, engine: Engine) -> None:
        if self.key_metric and engine.state.best_metric_epoch != engine.state.epoch:
            return
        states = {name: getattr(obj, "module", obj).state_dict() for name, obj in self.save_dict.items()}
        checkpoint = next(iter(states.values())) if len(states) == 1 else states
        os.makedirs(self.save_dir, exist_ok=True)
        with atomic_write(os.path.join(self.save_dir, self.filename)) as f:
            torch.save(checkpoint, f)


class BestMetricState:
    """Makes an evaluator's best key metric part of a checkpoint, so a resumed run keeps the best model."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def state_dict(self) -> dict:
        return {"best_metric": self.engine.state.best_metric, "best_metric_epoch": self.engine.state.best_metric_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.engine.state.best_metric = state["best_metric"]
        self.engine.state.best_metric_epoch = state["best_metric_epoch"]
