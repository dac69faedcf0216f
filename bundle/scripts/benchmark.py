"""Throughput (img/s) of the full pipeline against the bare model, like the seed's vnet_benchmark.py; MONAI has none.

Run from the bundle folder:
    python -m scripts.benchmark --mode train --batch_size 8 --amp True --warmup_steps 10 --steps 40 \
        --output_json OUT.json
    python -m scripts.benchmark --mode predict --batch_size 8 --dataset_dir /data/Task04_Hippocampus

`pipeline`: the config's own dataloader and transforms feeding the MONAI engine (no validation, metrics,
checkpoints or logging handlers); `model_only`: the same network, loss, optimizer and precision on tensors
already on the device. `efficiency` = pipeline / model_only img/s. Nothing is written into the bundle:
outputs (the split) go to a temporary folder, and without `--dataset_dir` a synthetic task is made there.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
from typing import Any

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events

from scripts import as_bool
from scripts.amp import cpu_description

logger = logging.getLogger(__name__)

BUNDLE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("train", "predict")


def _cuda_in_use() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


class ThroughputLogger:
    """Logs training or inference throughput (img/s) at each EPOCH_COMPLETED and at COMPLETED.

    A step's time is the wall time between consecutive ITERATION_COMPLETED events, so it includes the
    dataloader fetch; the first step of an epoch is timed from EPOCH_STARTED (so epoch-end work such as
    validation is not counted). The first `warmup_steps` iterations of the run are not counted.
    img/s = batch_size * world_size / mean step time. On CUDA the device is synchronized before each reading.

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
        self._epoch_start = 0  # index into step_times of this epoch's first counted step
        self._last: float | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)
        engine.add_event_handler(Events.COMPLETED, self._completed)

    @staticmethod
    def _now() -> float:
        if _cuda_in_use():
            torch.cuda.synchronize()
        return time.perf_counter()

    def _reset(self, engine: Engine) -> None:
        self.step_times.clear()
        self._epoch_start = 0
        self._last = None

    def _epoch_started(self, engine: Engine) -> None:
        self._epoch_start = len(self.step_times)
        self._last = self._now()

    def _iteration_completed(self, engine: Engine) -> None:
        now = self._now()
        if self._last is not None and engine.state.iteration > self.warmup_steps:
            self.step_times.append(now - self._last)
        self._last = now

    def images_per_second(self, step_times: list[float] | None = None) -> float:
        """batch_size * world_size / mean step time of `step_times` (default: all counted steps); nan if none."""
        times = self.step_times if step_times is None else step_times
        if not times:
            return float("nan")
        return self.batch_size * idist.get_world_size() / (sum(times) / len(times))

    def summary(self) -> dict[str, float]:
        """Counted steps, mean step time, img/s and step-time percentiles (ms) over the whole run."""
        times = np.asarray(self.step_times, dtype=np.float64) * 1000.0
        if not len(times):
            return {"steps": 0}
        p50, p90, p99 = np.percentile(times, [50, 90, 99]).tolist()
        return {
            "steps": len(times),
            "ms_per_step": float(times.mean()),
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


# ---------------------------------------------------------------------------------------------- benchmark


def _parser(config_file: str, overrides: dict[str, Any]):
    from monai.bundle import ConfigParser

    path = config_file if os.path.isabs(config_file) else os.path.join(BUNDLE_DIR, config_file)
    parser = ConfigParser()
    parser.read_config(path)
    parser["bundle_root"] = BUNDLE_DIR
    parser.update(overrides)
    return parser


def _synthetic_task(work_dir: str, batch_size: int, total_steps: int, train_split: float) -> str:
    """A synthetic task with enough training cases for the run without repeats, at most the real task's 208."""
    from scripts.synthetic import make_synthetic_dataset

    needed = math.ceil(batch_size * total_steps / max(train_split, 1e-3)) + 1
    num_cases = max(24, min(208, needed))
    logger.info(f"No --dataset_dir: making a synthetic task of {num_cases} cases in {work_dir}.")
    return make_synthetic_dataset(os.path.join(work_dir, "Task04_Hippocampus"), num_cases=num_cases, seed=0)


def _run_timed(engine: Engine, batch_size: int, warmup_steps: int, run) -> dict[str, float]:
    timer = ThroughputLogger(batch_size=batch_size, warmup_steps=warmup_steps)
    timer.attach(engine)
    run()
    return timer.summary()


def _pipeline(mode: str, parser, batch_size: int, warmup_steps: int, total_steps: int) -> dict[str, float]:
    """The config's dataloader, transforms and MONAI engine, without validation/metrics/checkpoint/log handlers."""
    if mode == "train":
        parser["train#trainer#train_handlers"] = []
        parser["train#trainer#max_epochs"] = 1
        parser["train#trainer#epoch_length"] = total_steps  # ignite restarts the loader when it runs out
        parser["train#dataloader#drop_last"] = True  # only full batches, so img/s = batch_size / step
        engine = parser.get_parsed_content("train#trainer")
    else:
        from monai.data import Dataset

        from scripts.data import load_training_list

        images = [{"image": case["image"]} for case in load_training_list(parser.get_parsed_content("dataset_dir"))]
        # every scan is preprocessed once, before the model loop, so that the loop times the engine (and this apart)
        start = time.perf_counter()
        preprocessing = parser.get_parsed_content("validate#preprocessing")
        preprocessed = [preprocessing(dict(image)) for image in images]
        preprocess_ms_per_image = 1000 * (time.perf_counter() - start) / len(images)
        needed = batch_size * total_steps
        data = (preprocessed * math.ceil(needed / len(preprocessed)))[:needed]  # one pass, no loader restarts
        parser["validate#dataset"] = Dataset(data)
        parser["validate#dataloader#batch_size"] = batch_size
        parser["validate#dataloader#drop_last"] = True
        for key in ("postprocessing", "key_val_metric", "additional_metrics", "val_handlers"):
            parser[f"validate#evaluator#{key}"] = None
        parser["validate#evaluator#epoch_length"] = total_steps
        engine = parser.get_parsed_content("validate#evaluator")
        return {**_run_timed(engine, batch_size, warmup_steps, engine.run), "preprocess_ms_per_image": preprocess_ms_per_image}
    return _run_timed(engine, batch_size, warmup_steps, engine.run)


def _model_only(mode: str, parser, batch_size: int, warmup_steps: int, total_steps: int) -> dict[str, float]:
    """A fresh network of the config with its loss, optimizer and precision, on tensors already on the device."""
    device = parser.get_parsed_content("device")
    network = parser.get_parsed_content("network")  # `network_def` on the device; `parser` is a fresh one
    inferer = parser.get_parsed_content("inferer")  # bf16 autocast on CPU when amp
    cuda_amp = device.type == "cuda" and as_bool(parser.get_parsed_content("amp"))
    shape = [batch_size, 1, *parser.get_parsed_content("input_shape")]
    # fp16 on CUDA as the MONAI engines' `amp`; on the CPU the inferer itself autocasts to bf16
    autocast = (lambda: torch.autocast("cuda")) if cuda_amp else contextlib.nullcontext
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(shape, generator=generator).to(device)

    if mode == "train":
        num_classes = int(parser.get_parsed_content("num_classes"))
        labels = torch.randint(0, num_classes, shape, generator=generator).float().to(device)
        loss_function = parser.get_parsed_content("loss")
        optimizer = parser.get_parsed_content("optimizer")  # over `network`
        scaler = torch.amp.GradScaler("cuda") if cuda_amp else None
        network.train()

        def step(engine: Engine, _batch: Any) -> None:
            optimizer.zero_grad(set_to_none=False)  # as SupervisedTrainer (optim_set_to_none=False)
            with autocast():
                loss = loss_function(inferer(images, network), labels)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()

    else:
        network.eval()

        def step(engine: Engine, _batch: Any) -> None:
            with torch.no_grad(), autocast():
                inferer(images, network)

    engine = Engine(step)
    run = lambda: engine.run(data=None, max_epochs=1, epoch_length=total_steps)  # noqa: E731
    return _run_timed(engine, batch_size, warmup_steps, run)


def _print_table(result: dict[str, Any]) -> None:
    rows = [
        ("pipeline", result["pipeline_img_per_s"], result["pipeline_ms_per_step"], result["pipeline_ms_per_step_p50"]),
        ("model only", result["model_only_img_per_s"], result["model_only_ms_per_step"],
         result["model_only_ms_per_step_p50"]),
    ]
    print(f"\n{result['mode']} | batch {result['batch_size']} | amp {result['amp']} | {result['device']} | "
          f"torch threads {result['torch_num_threads']} | num_workers {result['num_workers']} | "
          f"{result['steps']} steps after {result['warmup_steps']} warm-up")
    print(f"{'':<12}{'img/s':>10}{'ms/step':>10}{'median':>10}")
    for name, img_s, ms, median in rows:
        print(f"{name:<12}{img_s:>10.2f}{ms:>10.1f}{median:>10.1f}")
    print(f"efficiency (pipeline / model only): {result['efficiency']:.3f} "
          f"(of medians: {result['efficiency_p50']:.3f})")
    if result["mode"] == "predict":
        print("pipeline latency per batch (ms): p50 {latency_ms_p50:.1f}  p90 {latency_ms_p90:.1f}  "
              "p99 {latency_ms_p99:.1f}".format(**result))


def benchmark(
    mode: str = "train",
    batch_size: int = 8,
    amp: bool = True,
    warmup_steps: int = 10,
    steps: int = 40,
    output_json: str | None = None,
    dataset_dir: str | None = None,
    config_file: str = "configs/train.yaml",
    num_workers: int | None = None,
) -> dict[str, Any]:
    """Times `steps` steps (after `warmup_steps`) of the full pipeline and of the model alone; returns the results.

    Args:
        mode: `train` (SupervisedTrainer: forward, loss, backward, optimizer step) or `predict`
            (SupervisedEvaluator: forward under no_grad, no postprocessing).
        batch_size: images per step.
        amp: mixed precision: fp16 autocast + GradScaler on CUDA; on CPU bf16 autocast (the config's inferer) where
            the processor has native bf16, fp32 elsewhere (the config's `cpu_bf16`).
        warmup_steps: steps left out of the timing.
        steps: timed steps.
        output_json: where to write the results, if given.
        dataset_dir: an MSD task folder; without it a synthetic one is made in a temporary folder.
        config_file: the training config, relative to the bundle folder unless absolute.
        num_workers: dataloader workers (default: the config's).
    """
    import monai

    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(name)s - %(levelname)s - %(message)s")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
    batch_size, warmup_steps, steps = int(batch_size), int(warmup_steps), int(steps)
    if batch_size < 1 or warmup_steps < 0 or steps < 1:
        raise ValueError("need batch_size >= 1, warmup_steps >= 0 and steps >= 1.")
    amp = as_bool(amp)
    total_steps = warmup_steps + steps
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None

    with tempfile.TemporaryDirectory(prefix="vnet_benchmark_") as work_dir:
        overrides: dict[str, Any] = {
            "batch_size": batch_size,
            "amp": amp,
            "output_dir": os.path.join(work_dir, "output"),
            "ckpt_dir": os.path.join(work_dir, "models"),
        }
        if num_workers is not None:
            overrides["num_workers"] = int(num_workers)
        parser = _parser(config_file, overrides)
        if dataset_dir is None:
            train_split = float(parser.get_parsed_content("train_split"))
            dataset_dir = _synthetic_task(work_dir, batch_size, total_steps, train_split)
            dataset_name = "synthetic"
        else:
            dataset_dir = os.path.abspath(os.path.expanduser(str(dataset_dir)))
            dataset_name = dataset_dir
        parser["dataset_dir"] = dataset_dir

        monai.utils.set_determinism(seed=parser.get_parsed_content("seed"))  # as the training's `initialize`
        pipeline = _pipeline(mode, parser, batch_size, warmup_steps, total_steps)
        model_only = _model_only(mode, _parser(config_file, overrides), batch_size, warmup_steps, total_steps)
        device = parser.get_parsed_content("device")

    result: dict[str, Any] = {
        "mode": mode,
        "batch_size": batch_size,
        "world_size": idist.get_world_size(),
        "amp": amp,
        "precision": "fp16" if amp and device.type == "cuda" else "bf16" if parser.get_parsed_content("cpu_amp") else "fp32",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"cpu ({cpu_description()})",
        "pipeline_img_per_s": pipeline["img_per_s"],
        "model_only_img_per_s": model_only["img_per_s"],
        "efficiency": pipeline["img_per_s"] / model_only["img_per_s"],
        "pipeline_ms_per_step": pipeline["ms_per_step"],
        "model_only_ms_per_step": model_only["ms_per_step"],
        # medians resist outlier steps (e.g. another process on the machine)
        "pipeline_ms_per_step_p50": pipeline["latency_ms_p50"],
        "model_only_ms_per_step_p50": model_only["latency_ms_p50"],
        "efficiency_p50": model_only["latency_ms_p50"] / pipeline["latency_ms_p50"],
        "warmup_steps": warmup_steps,
        "steps": steps,
        "num_workers": int(parser.get_parsed_content("num_workers")),
        "input_shape": list(parser.get_parsed_content("input_shape")),
        "dataset": dataset_name,
        "config_file": config_file,
        "torch_version": torch.__version__,
        "monai_version": monai.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_before": list(load_before) if load_before else None,
    }
    if mode == "predict":
        for key in ("latency_ms_p50", "latency_ms_p90", "latency_ms_p99"):
            result[key] = pipeline[key]
            result[f"model_only_{key}"] = model_only[key]
        result["preprocess_ms_per_image"] = pipeline["preprocess_ms_per_image"]
    _print_table(result)
    if output_json:
        os.makedirs(os.path.dirname(os.path.abspath(output_json)), exist_ok=True)
        with open(output_json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    import fire

    fire.Fire(benchmark, serialize=lambda result: None)  # the table is printed already
