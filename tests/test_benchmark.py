"""ThroughputLogger's warm-up and logging. No speed is asserted; the benchmark CLI and its JSON are checked where
their documented commands run (test_documented_commands.py)."""

import logging
import math
import re
import time

import pytest
from ignite.engine import Engine

from scripts.engine.handlers import ThroughputLogger


def _engine(sleep_s: float = 0.003) -> Engine:
    return Engine(lambda engine, batch: time.sleep(sleep_s))


def test_throughput_logger_logs_only_after_warmup(caplog):
    caplog.set_level(logging.INFO, logger="scripts.engine.handlers")
    engine = _engine()
    timer = ThroughputLogger(batch_size=4, warmup_steps=4)
    timer.attach(engine)
    engine.run(range(3), max_epochs=3)  # iterations 1-4 are warm-up: none in epoch 1, 2 in epoch 2, 3 in epoch 3

    lines = [r.getMessage() for r in caplog.records if r.name == "scripts.engine.handlers"]
    assert not any("epoch 1:" in line for line in lines)
    counted = {
        what: int(n)
        for what, n in (re.search(r"Throughput (epoch \d|run): .* over (\d+) steps", line).groups() for line in lines)
    }
    assert counted == {"epoch 2": 2, "epoch 3": 3, "run": 5}
    for line in lines:
        img_s = float(re.search(r": ([0-9.]+) img/s", line).group(1))
        assert math.isfinite(img_s) and img_s > 0
    assert len(timer.step_times) == 5 and all(t >= 0.003 for t in timer.step_times)
    summary = timer.summary()
    assert summary["steps"] == 5
    assert summary["img_per_s"] == pytest.approx(4 / (sum(timer.step_times) / 5))


def test_throughput_logger_times_the_batch_fetch():
    """The wait for each batch is timed apart from the step that includes it."""

    def slow_batches():
        for _ in range(6):
            time.sleep(0.02)
            yield 0

    engine = _engine(sleep_s=0.005)
    timer = ThroughputLogger(batch_size=1, warmup_steps=1)
    timer.attach(engine)
    engine.run(slow_batches(), max_epochs=1, epoch_length=6)
    assert len(timer.data_times) == len(timer.step_times) == 5
    assert all(0.02 <= data < step for data, step in zip(timer.data_times, timer.step_times))
    summary = timer.summary()
    assert 20 <= summary["data_ms_per_step"] < summary["ms_per_step"]


def test_throughput_logger_silent_during_warmup(caplog):
    caplog.set_level(logging.INFO, logger="scripts.engine.handlers")
    engine = _engine()
    timer = ThroughputLogger(batch_size=2, warmup_steps=10)
    timer.attach(engine)
    engine.run(range(2), max_epochs=2)
    assert not [r for r in caplog.records if r.name == "scripts.engine.handlers"]
    assert timer.summary() == {"steps": 0} and math.isnan(timer.images_per_second())


def test_throughput_logger_from_config():
    """The lead wires it into train.yaml as a handler: it must build from a plain config entry."""
    from monai.bundle import ConfigParser

    parser = ConfigParser(
        {
            "batch_size": 8,
            "handler": {"_target_": "scripts.engine.handlers.ThroughputLogger", "batch_size": "@batch_size"},
        }
    )
    handler = parser.get_parsed_content("handler")
    assert isinstance(handler, ThroughputLogger) and handler.batch_size == 8 and handler.warmup_steps == 10
