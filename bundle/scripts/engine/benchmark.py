"""Throughput (img/s) of the full pipeline against the bare model, like the TensorFlow original's vnet_benchmark.py; MONAI has none.

Run from the bundle folder:
    python -m scripts.engine.benchmark --mode train --batch_size 8 --amp True --warmup_steps 10 --steps 40 \
        --output_json OUT.json
    python -m scripts.engine.benchmark --mode predict --batch_size 8 --dataset_dir /data/Task04_Hippocampus

`pipeline`: the config's own dataloader and transforms feeding the MONAI engine (no validation, metrics,
checkpoints or logging handlers; in predict mode, a recipe whose scans keep their own sizes is timed on them cropped
or padded to its `input_shape`, so that they batch); `model_only`: the same network, loss, optimizer and precision
on tensors already on the device, timed with the weights in both memory layouts (the config's `channels_last`).
`efficiency` = pipeline / model_only img/s, in the pipeline's layout; `pipeline_data_fraction`, the share of the
pipeline's steps spent waiting for batches, measures the data's cost within one loop, where the machine's speed
may drift between the two. Nothing is written into the bundle: outputs (the split) go to a temporary folder, and
without `--dataset_dir` a synthetic task is made there.
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
import torch
from ignite.engine import Engine, Events
from monai.utils import look_up_option
from scripts import BUNDLE_DIR, as_bool
from scripts.engine.amp import cpu_description
from scripts.engine.handlers import ThroughputLogger

logger = logging.getLogger(__name__)

MODES = ("train", "predict")


def _parser(config_files: str | list[str], overrides: dict[str, Any]):
    from scripts.recipe import load

    return load(BUNDLE_DIR, [config_files] if isinstance(config_files, str) else list(config_files), overrides)


def _synthetic_task(work_dir: str, batch_size: int, total_steps: int, train_split: float) -> str:
    """A synthetic task with enough training cases for the run without repeats, at most the real task's 208."""
    from scripts.data.synthetic import make_synthetic_dataset

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
        from scripts.data.msd import load_training_list

        images = [{"image": case["image"]} for case in load_training_list(parser.get_parsed_content("dataset_dir"))]
        # every scan is preprocessed once, before the model loop, so that the loop times the engine (and this apart)
        start = time.perf_counter()
        preprocessing = parser.get_parsed_content("preprocessing")
        preprocessed = [preprocessing(dict(image)) for image in images]
        preprocess_ms_per_image = 1000 * (time.perf_counter() - start) / len(images)
        if len({tuple(case["image"].shape) for case in preprocessed}) > 1:  # native grids differ: batch input_shape
            from monai.transforms import ResizeWithPadOrCropd

            to_shape = ResizeWithPadOrCropd("image", parser.get_parsed_content("input_shape"))
            preprocessed = [to_shape(case) for case in preprocessed]
        needed = batch_size * total_steps
        data = (preprocessed * math.ceil(needed / len(preprocessed)))[:needed]  # one pass, no loader restarts
        parser["validate#dataset"] = Dataset(data)
        parser["validate#dataloader#batch_size"] = batch_size
        parser["validate#dataloader#drop_last"] = True
        for key in ("postprocessing", "key_val_metric", "additional_metrics", "val_handlers"):
            parser[f"validate#evaluator#{key}"] = None
        parser["validate#evaluator#epoch_length"] = total_steps
        engine = parser.get_parsed_content("validate#evaluator")
        return {
            **_run_timed(engine, batch_size, warmup_steps, engine.run),
            "preprocess_ms_per_image": preprocess_ms_per_image,
        }
    return _run_timed(engine, batch_size, warmup_steps, engine.run)


def _model_only(mode: str, parser, batch_size: int, warmup_steps: int, total_steps: int) -> dict[str, float]:
    """A fresh network of the config with its loss, optimizer and precision, on tensors already on the device."""
    device = parser.get_parsed_content("device")
    network = parser.get_parsed_content("network")  # `network_def` on the device; `parser` is a fresh one
    inferer = parser.get_parsed_content("inferer")  # bf16 autocast on CPU when amp
    cuda_amp = parser.get_parsed_content("flags#cuda_amp")
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


def _epoch_seconds(config_files, overrides: dict[str, Any]) -> dict[str, float]:
    """Wall time of one training epoch of the recipe, and of the epoch with the validation after it; the data are
    cached before the clock starts, and nothing is logged or saved."""
    from monai.handlers import ValidationHandler

    parser = _parser(config_files, overrides)
    parser["train#trainer#train_handlers"] = []
    parser["train#trainer#max_epochs"] = 1
    parser["validate#output_handlers"] = []
    parser.get_parsed_content("setup")
    trainer = parser.get_parsed_content("train#trainer")
    trained = []
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda _: trained.append(ThroughputLogger.now()))
    for handler in parser.get_parsed_content("train#handlers"):  # the evaluator caches its data here
        if isinstance(handler, ValidationHandler):
            handler.attach(trainer)  # after the mark above: validation runs after the epoch is timed
    start = ThroughputLogger.now()
    trainer.run()
    end = ThroughputLogger.now()
    return {"epoch_s": trained[0] - start, "epoch_with_validation_s": end - start}


def _print_table(result: dict[str, Any]) -> None:
    rows = [
        ("pipeline", result["pipeline_img_per_s"], result["pipeline_ms_per_step"], result["pipeline_ms_per_step_p50"]),
        (
            "model only",
            result["model_only_img_per_s"],
            result["model_only_ms_per_step"],
            result["model_only_ms_per_step_p50"],
        ),
    ]
    print(
        f"\n{result['mode']} | batch {result['batch_size']} | amp {result['amp']} | {result['device']} | "
        f"torch threads {result['torch_num_threads']} | num_workers {result['num_workers']} | "
        f"{result['steps']} steps after {result['warmup_steps']} warm-up"
    )
    print(f"{'':<12}{'img/s':>10}{'ms/step':>10}{'median':>10}")
    for name, img_s, ms, median in rows:
        print(f"{name:<12}{img_s:>10.2f}{ms:>10.1f}{median:>10.1f}")
    print(
        f"efficiency (pipeline / model only): {result['efficiency']:.3f} "
        f"(of medians: {result['efficiency_p50']:.3f})"
    )
    print(
        f"pipeline steps waiting for their batch: {result['pipeline_data_ms_per_step']:.1f} ms of "
        f"{result['pipeline_ms_per_step']:.1f} ({100 * result['pipeline_data_fraction']:.1f}%)"
    )
    print(
        f"model only, img/s: channels-last weights {result['model_only_channels_last_img_per_s']:.2f}, "
        f"plain layout {result['model_only_contiguous_img_per_s']:.2f} (the pipeline's: "
        f"{'channels-last' if result['channels_last'] else 'plain'})"
    )
    if "epoch_s" in result:
        print(
            f"one epoch on {result['dataset']}: {result['epoch_s']:.1f} s, with validation "
            f"{result['epoch_with_validation_s']:.1f} s"
        )
    if result["mode"] == "predict":
        print(
            "pipeline latency per batch (ms): p50 {latency_ms_p50:.1f}  p90 {latency_ms_p90:.1f}  "
            "p99 {latency_ms_p99:.1f}".format(**result)
        )


def _overrides(work_dir: str, batch_size: int, amp: bool, num_workers: int | None) -> dict[str, Any]:
    """The run's settings, with every output in `work_dir`: nothing is written into the bundle."""
    overrides: dict[str, Any] = {
        "batch_size": batch_size,
        "amp": amp,
        "output_dir": os.path.join(work_dir, "output"),
        "ckpt_dir": os.path.join(work_dir, "models"),
    }
    if num_workers is not None:
        overrides["num_workers"] = int(num_workers)
    return overrides


def _dataset(parser, dataset_dir: str | None, work_dir: str, batch_size: int, total_steps: int) -> str:
    """Points `parser` at `dataset_dir`, or at a synthetic task made in `work_dir`; returns the dataset's name."""
    if dataset_dir is None:
        parser["dataset_dir"] = _synthetic_task(work_dir, batch_size, total_steps, float(parser["train_split"]))
        return "synthetic"
    parser["dataset_dir"] = os.path.abspath(os.path.expanduser(str(dataset_dir)))
    return parser["dataset_dir"]


def _result(
    mode: str, parser, pipeline: dict[str, float], model_only_by_layout: dict[bool, dict[str, float]], **settings: Any
) -> dict[str, Any]:
    """One record of the run: img/s of both loops, their efficiency, the device, precision and software."""
    import monai

    device = parser.get_parsed_content("device")
    channels_last = parser.get_parsed_content("flags#channels_last")
    model_only = model_only_by_layout[channels_last]
    cuda_amp, cpu_amp = parser.get_parsed_content("flags#cuda_amp"), parser.get_parsed_content("flags#cpu_amp")
    load_average = os.getloadavg() if hasattr(os, "getloadavg") else None
    result: dict[str, Any] = {
        "mode": mode,
        **settings,
        "world_size": idist.get_world_size(),
        "precision": "fp16" if cuda_amp else "bf16" if cpu_amp and device.type == "cpu" else "fp32",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({cpu_description()})",
        "pipeline_img_per_s": pipeline["img_per_s"],
        "channels_last": channels_last,
        "model_only_img_per_s": model_only["img_per_s"],
        "model_only_channels_last_img_per_s": model_only_by_layout[True]["img_per_s"],
        "model_only_contiguous_img_per_s": model_only_by_layout[False]["img_per_s"],
        "efficiency": pipeline["img_per_s"] / model_only["img_per_s"],
        "pipeline_ms_per_step": pipeline["ms_per_step"],
        # the share of the pipeline's own steps spent waiting for batches: immune to drift between the two loops
        "pipeline_data_ms_per_step": pipeline["data_ms_per_step"],
        "pipeline_data_fraction": pipeline["data_ms_per_step"] / pipeline["ms_per_step"],
        "model_only_ms_per_step": model_only["ms_per_step"],
        # medians resist outlier steps (e.g. another process on the machine)
        "pipeline_ms_per_step_p50": pipeline["latency_ms_p50"],
        "model_only_ms_per_step_p50": model_only["latency_ms_p50"],
        "efficiency_p50": model_only["latency_ms_p50"] / pipeline["latency_ms_p50"],
        "num_workers": int(parser.get_parsed_content("num_workers")),
        "input_shape": list(parser.get_parsed_content("input_shape")),
        "torch_version": torch.__version__,
        "monai_version": monai.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_after": list(load_average) if load_average else None,
    }
    if mode == "predict":
        for key in ("latency_ms_p50", "latency_ms_p90", "latency_ms_p99"):
            result[key] = pipeline[key]
            result[f"model_only_{key}"] = model_only[key]
        result["preprocess_ms_per_image"] = pipeline["preprocess_ms_per_image"]
    return result


def benchmark(
    mode: str = "train",
    batch_size: int = 8,
    amp: bool = True,
    warmup_steps: int = 10,
    steps: int = 40,
    output_json: str | None = None,
    dataset_dir: str | None = None,
    config_file: str | list[str] = "configs/train.yaml",
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
        dataset_dir: an MSD task folder; without it a synthetic one is made in a temporary folder. In train mode,
            one full epoch of the recipe on it is timed too, with and without validation.
        config_file: the recipe's training config(s), relative to the bundle folder, e.g.
            "['configs/train.yaml','configs/train_native.yaml']".
        num_workers: dataloader workers (default: the config's).
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(name)s - %(levelname)s - %(message)s")
    mode = look_up_option(mode, MODES)
    batch_size, warmup_steps, steps = int(batch_size), int(warmup_steps), int(steps)
    if batch_size < 1 or warmup_steps < 0 or steps < 1:
        raise ValueError("need batch_size >= 1, warmup_steps >= 0 and steps >= 1.")
    amp = as_bool(amp)
    total_steps = warmup_steps + steps
    with tempfile.TemporaryDirectory(prefix="vnet_benchmark_") as work_dir:
        overrides = _overrides(work_dir, batch_size, amp, num_workers)
        parser = _parser(config_file, overrides)
        dataset = _dataset(parser, dataset_dir, work_dir, batch_size, total_steps)
        parser.get_parsed_content("setup")  # as the training's: random seed, cudnn.benchmark on CUDA
        pipeline = _pipeline(mode, parser, batch_size, warmup_steps, total_steps)
        # the model alone in both memory layouts of the weights (the config's `channels_last`); the pipeline's own
        # layout gives the efficiency
        model_only = {
            layout: _model_only(
                mode,
                _parser(config_file, {**overrides, "channels_last": layout}),
                batch_size,
                warmup_steps,
                total_steps,
            )
            for layout in (True, False)
        }
        epochs = {}
        if mode == "train" and dataset_dir is not None:
            overrides["dataset_dir"] = parser["dataset_dir"]
            epochs = _epoch_seconds(config_file, overrides)
    result = _result(
        mode,
        parser,
        pipeline,
        model_only,
        batch_size=batch_size,
        amp=amp,
        warmup_steps=warmup_steps,
        steps=steps,
        dataset=dataset,
        config_file=config_file,
        **epochs,
    )
    _print_table(result)
    if output_json:
        os.makedirs(os.path.dirname(os.path.abspath(output_json)), exist_ok=True)
        with open(output_json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    import fire

    fire.Fire(benchmark, serialize=lambda result: None)  # the table is printed already
