"""Ignite handlers the bundle needs and MONAI lacks."""

from __future__ import annotations

import copy
import csv
import json
import logging
import os
import time
from collections.abc import Sequence

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.handlers import CheckpointLoader
from scripts import BundleError, atomic_write
from scripts.networks.ensemble import Ensemble

logger = logging.getLogger(__name__)


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


def soft_dice(logits: torch.Tensor, label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-class soft Dice of the softmax of `logits` (C, ...) against an index `label` (1, ...): the tf recipe's
    measure, in its resized space."""
    probabilities = logits.float().softmax(0)
    one_hot = torch.nn.functional.one_hot(label[0].long(), num_classes).movedim(-1, 0).to(probabilities)
    dims = tuple(range(1, probabilities.ndim))
    intersection = (probabilities * one_hot).sum(dims)
    return 2 * intersection / (probabilities.sum(dims) + one_hot.sum(dims)).clamp_min(1e-8)


class CaseMetricsReport:
    """Per case and class: Dice, HD95 (mm) and normalized surface Dice, in each scan's own grid, plus the
    tf recipe's soft Dice in the resized space; writes `metrics.csv` and `summary.json` and logs a table.

    MONAI's metric handlers cannot pass each case's voxel spacing, which HD95 and NSD in mm need.
    Reads `pred`/`label` (one-hot, original grid) and `resized_pred`/`resized_label` from the evaluator output.
    `model` names what was scored (the weight files), in both files and the log.
    """

    def __init__(
        self, output_dir: str, class_names: Sequence[str], nsd_tolerance_mm: float = 1.0, model: str = ""
    ) -> None:
        self.output_dir = output_dir
        self.class_names = list(class_names)
        self.nsd_tolerance_mm = nsd_tolerance_mm
        self.model = model
        self.rows: list[dict] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda _: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.write)

    def collect(self, engine: Engine) -> None:
        from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice

        foreground = self.class_names[1:]
        for item in engine.state.output:
            if not item["label"].any():  # a padding copy (scripts.engine.distributed.shard): its label was emptied
                continue
            pred, label = item["pred"][None].float(), item["label"][None].float()
            spacing = voxel_spacing(item["label"])
            values = {
                "dice": compute_dice(pred, label, include_background=False)[0],
                "hd95": compute_hausdorff_distance(pred, label, percentile=95, spacing=spacing)[0],
                "nsd": compute_surface_dice(pred, label, [self.nsd_tolerance_mm] * len(foreground), spacing=spacing)[0],
                "tf_soft_dice": soft_dice(item["resized_pred"], item["resized_label"], len(self.class_names))[1:],
            }
            row = {"case": os.path.basename(str(item["label"].meta["filename_or_obj"]))}
            for metric, per_class in values.items():
                for name, value in zip(foreground, per_class.tolist()):
                    row[f"{metric}_{name}"] = value
            self.rows.append(row)

    def write(self, engine: Engine) -> None:
        rows = self.rows
        if idist.get_world_size() > 1:
            rows = [row for rank_rows in idist.all_gather(rows) for row in rank_rows]
        rows = sorted(rows, key=lambda row: row["case"])
        if idist.get_rank() != 0 or not rows:
            return
        os.makedirs(self.output_dir, exist_ok=True)
        columns = list(rows[0])
        with open(os.path.join(self.output_dir, "metrics.csv"), "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["case", "model", *columns[1:]])
            writer.writeheader()
            writer.writerows({**row, "model": self.model} for row in rows)
        summary: dict = {"model": self.model, "num_cases": len(rows)}
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
        for metric in ("dice", "hd95", "nsd", "tf_soft_dice"):
            cells = [summary[f"{metric}_{name}"] for name in self.class_names[1:]]
            lines.append(f"{metric:<16}" + "".join(f"{c['mean']:>13.4f} ± {c['std']:<6.4f}" for c in cells))
        logger.info(
            f"Evaluation of {len(rows)} cases by {self.model or 'the network'} (original grid; tf_soft_dice in the "
            "resized space):\n" + "\n".join(lines)
        )


class AtomicCheckpointSaver:
    """Saves `save_dict` to `path` through a temporary file and a rename, so a kill while saving never leaves a
    corrupt checkpoint (MONAI's CheckpointSaver writes in place).

    A single object is saved as its plain state_dict. With `key_metric`, it saves only at epochs where the
    engine's key metric improved (attach it to the evaluator); otherwise every `interval` epochs.
    """

    def __init__(self, path: str, save_dict: dict, key_metric: bool = False, interval: int = 1) -> None:
        self.path = path
        self.save_dict = save_dict
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
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with atomic_write(self.path) as f:
            torch.save(checkpoint, f)


class CheckedCheckpointLoader(CheckpointLoader):
    """MONAI's CheckpointLoader that checks its file when built: a missing or unreadable file, or weights that do
    not fit the network, end the run with one line naming the file (MONAI's fails mid-run in a long traceback).

    The networks of `load_dict` receive their weights here already; the other objects (optimizer, trainer) when
    the engine starts, as with MONAI's.
    """

    def __init__(self, load_path: str, load_dict: dict, **kwargs) -> None:
        super().__init__(load_path, load_dict, **kwargs)
        checkpoint = read_checkpoint(load_path)
        if len(load_dict) == 1 and next(iter(load_dict)) not in checkpoint:
            checkpoint = {next(iter(load_dict)): checkpoint}  # a plain state_dict, as CheckpointLoader reads it
        for name, obj in load_dict.items():
            if not isinstance(obj, torch.nn.Module):
                continue
            if name not in checkpoint:
                raise BundleError(f"{load_path}: has no {name!r} entry (it holds {', '.join(map(str, checkpoint))}).")
            load_weights(load_path, obj, checkpoint[name])


def read_checkpoint(path: str) -> dict:
    """The checkpoint or state_dict of `path`, on the CPU; a missing or unreadable file is a `BundleError`."""
    if not os.path.isfile(path):
        raise BundleError(f"{path}: no such weights or checkpoint file.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise BundleError(f"{path}: not a readable PyTorch checkpoint ({e.__class__.__name__}: {e}).") from None


def load_weights(path: str, network: torch.nn.Module, state_dict: dict | None = None) -> torch.nn.Module:
    """`network` with the weights of `path` (or its already read `state_dict`); weights that do not fit it are a
    `BundleError` naming the file."""
    try:
        getattr(network, "module", network).load_state_dict(read_checkpoint(path) if state_dict is None else state_dict)
    except RuntimeError as e:
        problem = " ".join(str(e).split())
        raise BundleError(
            f"{path} does not fit the configured network (another recipe's weights?): {problem[:400]}"
        ) from None
    return network


def load_ensemble(network: torch.nn.Module, weight_files: Sequence[str]) -> Ensemble:
    """An `Ensemble` of copies of `network` (its device and memory layout), each with the weights of one file."""
    return Ensemble([load_weights(path, copy.deepcopy(network)) for path in weight_files])


class LazySummaryWriter:
    """A TensorBoard SummaryWriter created on first use, for MONAI's TensorBoard handlers: building a workflow
    (`initialize`) then writes nothing to disk; the trainer's and the evaluator's handlers share one event file."""

    def __init__(self, log_dir: str) -> None:
        self.log_dir = log_dir
        self._writer = None

    def __getattr__(self, name: str):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=self.log_dir)
        return getattr(self._writer, name)


class BestMetricState:
    """Makes an evaluator's best key metric part of a checkpoint, so a resumed run keeps the best model."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def state_dict(self) -> dict:
        return {"best_metric": self.engine.state.best_metric, "best_metric_epoch": self.engine.state.best_metric_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.engine.state.best_metric = state["best_metric"]
        self.engine.state.best_metric_epoch = state["best_metric_epoch"]


def _cuda_in_use() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


class ThroughputLogger:
    """Logs training or inference throughput (img/s) at each EPOCH_COMPLETED and at COMPLETED.

    A step's time is the wall time between consecutive ITERATION_COMPLETED events, so it includes the
    dataloader fetch; the first step of an epoch is timed from EPOCH_STARTED (so epoch-end work such as
    validation is not counted). The first `warmup_steps` iterations of the run are not counted.
    img/s = batch_size * world_size / mean step time. The part of each counted step spent waiting for the batch
    (GET_BATCH_STARTED to GET_BATCH_COMPLETED) is kept too: measured in the same steps, it shows how much the data
    cost even where the machine's speed drifts between runs. On CUDA the device is synchronized before each reading.

    Args:
        batch_size: images per step on each process (the dataloader's batch size).
        warmup_steps: iterations (of the whole run) left out of the timing.
    """

    def __init__(self, batch_size: int, warmup_steps: int = 10) -> None:
        if int(batch_size) < 1 or int(warmup_steps) < 0:
            raise ValueError(f"need batch_size >= 1 and warmup_steps >= 0, got {batch_size}, {warmup_steps}.")
        self.batch_size = int(batch_size)
        self.warmup_steps = int(warmup_steps)
        self.step_times: list[float] = []  # seconds, every counted step of the run
        self.data_times: list[float] = []  # seconds of each counted step spent fetching its batch
        self._epoch_start = 0  # index into step_times of this epoch's first counted step
        self._last: float | None = None
        self._fetch_started = 0.0
        self._fetch = 0.0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        engine.add_event_handler(Events.GET_BATCH_STARTED, self._get_batch_started)
        engine.add_event_handler(Events.GET_BATCH_COMPLETED, self._get_batch_completed)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)
        engine.add_event_handler(Events.COMPLETED, self._completed)

    @staticmethod
    def now() -> float:
        """perf_counter after the pending CUDA work, if any."""
        if _cuda_in_use():
            torch.cuda.synchronize()
        return time.perf_counter()

    def _reset(self, engine: Engine) -> None:
        self.step_times.clear()
        self.data_times.clear()
        self._epoch_start = 0
        self._last = None

    def _epoch_started(self, engine: Engine) -> None:
        self._epoch_start = len(self.step_times)
        self._last = self.now()

    def _get_batch_started(self, engine: Engine) -> None:
        self._fetch_started = self.now()

    def _get_batch_completed(self, engine: Engine) -> None:
        self._fetch = self.now() - self._fetch_started

    def _iteration_completed(self, engine: Engine) -> None:
        now = self.now()
        if self._last is not None and engine.state.iteration > self.warmup_steps:
            self.step_times.append(now - self._last)
            self.data_times.append(self._fetch)
        self._fetch = 0.0  # an engine run without a dataloader fetches nothing
        self._last = now

    def images_per_second(self, step_times: list[float] | None = None) -> float:
        """batch_size * world_size / mean step time of `step_times` (default: all counted steps); nan if none."""
        times = self.step_times if step_times is None else step_times
        if not times:
            return float("nan")
        return self.batch_size * idist.get_world_size() / (sum(times) / len(times))

    def summary(self) -> dict[str, float]:
        """Counted steps, mean step and batch-fetch times, img/s and step-time percentiles (ms) over the run."""
        times = np.asarray(self.step_times, dtype=np.float64) * 1000.0
        if not len(times):
            return {"steps": 0}
        p50, p90, p99 = np.percentile(times, [50, 90, 99]).tolist()
        return {
            "steps": len(times),
            "ms_per_step": float(times.mean()),
            "data_ms_per_step": 1000.0 * float(np.mean(self.data_times)),
            "img_per_s": self.images_per_second(),
            "latency_ms_p50": p50,
            "latency_ms_p90": p90,
            "latency_ms_p99": p99,
        }

    def _log(self, what: str, times: list[float]) -> None:
        if times:
            mean_ms = 1000.0 * sum(times) / len(times)
            logger.info(
                f"Throughput {what}: {self.images_per_second(times):.2f} img/s ({mean_ms:.1f} ms/step over "
                f"{len(times)} steps, batch {self.batch_size} x {idist.get_world_size()} process(es))"
            )

    def _epoch_completed(self, engine: Engine) -> None:
        self._log(f"epoch {engine.state.epoch}", self.step_times[self._epoch_start :])

    def _completed(self, engine: Engine) -> None:
        self._log("run", self.step_times)
