"""scripts/benchmark.py: the CLI's JSON in both modes, and ThroughputLogger's warm-up. No speed is asserted."""

import json
import logging
import math
import os
import re
import subprocess
import sys
import time

import pytest
from ignite.engine import Engine

from conftest import BUNDLE_DIR
from scripts.handlers import ThroughputLogger

COMMON_KEYS = {
    "mode", "batch_size", "amp", "device", "pipeline_img_per_s", "model_only_img_per_s", "efficiency",
    "warmup_steps", "steps", "num_workers", "torch_version", "torch_num_threads",
}
LATENCY_KEYS = {"latency_ms_p50", "latency_ms_p90", "latency_ms_p99"}
POSITIVE_KEYS = ("pipeline_img_per_s", "model_only_img_per_s", "efficiency", "pipeline_ms_per_step",
                 "model_only_ms_per_step")
MODES = ("train", "predict")


def _snapshot(*folders):
    """(path, mtime) of every file under the bundle's `folders`: the benchmark must not write there."""
    found = set()
    for folder in folders:
        for root, _, files in os.walk(os.path.join(BUNDLE_DIR, folder)):
            found.update((os.path.join(root, f), os.stat(os.path.join(root, f)).st_mtime_ns) for f in files)
    return found


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory, synthetic_task):
    """Both modes run at once, tiny settings: predict on a synthetic task it makes, train on a given task folder
    (which also times one epoch with and without validation)."""
    out = tmp_path_factory.mktemp("benchmark")
    before = _snapshot("models", "output")
    procs = {}
    for mode in MODES:
        procs[mode] = subprocess.Popen(
            [sys.executable, "-m", "scripts.benchmark", "--mode", mode, "--batch_size", "2", "--amp", "True",
             "--warmup_steps", "1", "--steps", "2", "--output_json", str(out / f"{mode}.json"),
             *(["--dataset_dir", synthetic_task] if mode == "train" else [])],
            cwd=BUNDLE_DIR, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
    results = {}
    for mode, proc in procs.items():
        log, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, log[-3000:]
        with open(out / f"{mode}.json", encoding="utf-8") as f:
            results[mode] = (json.load(f), log)
    assert _snapshot("models", "output") == before
    return results


@pytest.mark.parametrize("mode", MODES)
def test_cli_writes_json(cli_results, mode):
    result, log = cli_results[mode]
    assert COMMON_KEYS <= set(result)
    assert result["mode"] == mode and result["batch_size"] == 2 and result["amp"] is True
    assert result["warmup_steps"] == 1 and result["steps"] == 2
    for key in POSITIVE_KEYS:
        assert isinstance(result[key], float) and math.isfinite(result[key]) and result[key] > 0, key
    assert result["efficiency"] == pytest.approx(result["pipeline_img_per_s"] / result["model_only_img_per_s"])
    if mode == "predict":
        assert LATENCY_KEYS <= set(result)
        values = [result[key] for key in sorted(LATENCY_KEYS)]  # p50, p90, p99
        assert all(math.isfinite(v) and v > 0 for v in values) and values == sorted(values)
    else:
        assert not LATENCY_KEYS & set(result)
        assert 0 < result["epoch_s"] < result["epoch_with_validation_s"]
        assert "one epoch on" in log
    assert "efficiency (pipeline / model only)" in log  # the printed table


def _engine(sleep_s: float = 0.003) -> Engine:
    return Engine(lambda engine, batch: time.sleep(sleep_s))


def test_throughput_logger_logs_only_after_warmup(caplog):
    caplog.set_level(logging.INFO, logger="scripts.handlers")
    engine = _engine()
    timer = ThroughputLogger(batch_size=4, warmup_steps=4)
    timer.attach(engine)
    engine.run(range(3), max_epochs=3)  # iterations 1-4 are warm-up: none in epoch 1, 2 in epoch 2, 3 in epoch 3

    lines = [r.getMessage() for r in caplog.records if r.name == "scripts.handlers"]
    assert not any("epoch 1:" in line for line in lines)
    counted = {what: int(n) for what, n in (re.search(r"Throughput (epoch \d|run): .* over (\d+) steps", line).groups()
                                            for line in lines)}
    assert counted == {"epoch 2": 2, "epoch 3": 3, "run": 5}
    for line in lines:
        img_s = float(re.search(r": ([0-9.]+) img/s", line).group(1))
        assert math.isfinite(img_s) and img_s > 0
    assert len(timer.step_times) == 5 and all(t >= 0.003 for t in timer.step_times)
    summary = timer.summary()
    assert summary["steps"] == 5
    assert summary["img_per_s"] == pytest.approx(4 / (sum(timer.step_times) / 5))


def test_throughput_logger_silent_during_warmup(caplog):
    caplog.set_level(logging.INFO, logger="scripts.handlers")
    engine = _engine()
    timer = ThroughputLogger(batch_size=2, warmup_steps=10)
    timer.attach(engine)
    engine.run(range(2), max_epochs=2)
    assert not [r for r in caplog.records if r.name == "scripts.handlers"]
    assert timer.summary() == {"steps": 0} and math.isnan(timer.images_per_second())


def test_throughput_logger_from_config():
    """The lead wires it into train.yaml as a handler: it must build from a plain config entry."""
    from monai.bundle import ConfigParser

    parser = ConfigParser({"batch_size": 8, "handler": {"_target_": "scripts.handlers.ThroughputLogger",
                                                        "batch_size": "@batch_size"}})
    handler = parser.get_parsed_content("handler")
    assert isinstance(handler, ThroughputLogger) and handler.batch_size == 8 and handler.warmup_steps == 10
