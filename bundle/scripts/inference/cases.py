"""The cases of an inference run, segmented so that a bad case never stops the others, at any folder size: MONAI's
datasets stop at the first unreadable file, and its bundle CLI does not tell crops from whole heads."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence

from monai.data import DataLoader, Dataset, list_data_collate
from monai.utils import look_up_option
from scripts.head.segmenter import input_kind
from scripts.inference.inputs import Inputs, check_output_dir

logger = logging.getLogger(__name__)


def split_by_kind(cases: Sequence[dict], kind: str = "auto", max_crop_mm: float = 100.0) -> dict[str, list[dict]]:
    """Crop and head cases: by field of view (`scripts.head.segmenter.input_kind`) for `auto`, or all of one `kind`."""
    kind = look_up_option(str(kind), ("auto", "crop", "head"))
    split: dict[str, list[dict]] = {"crop": [], "head": []}
    for case in cases:
        split[input_kind(case["image"], max_crop_mm) if kind == "auto" else kind].append(case)
    return split


class CaseTimeout(TimeoutError):
    """A case that took longer than the run's `case_time_limit_s`."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raises `CaseTimeout` in the block after `seconds` (0: no limit): a SIGALRM timer, so only in a process's main
    thread (a DataLoader worker's too); elsewhere the block runs unlimited."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise CaseTimeout(f"the case took longer than --case_time_limit_s {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, float(seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class SafeCases(Dataset):
    """Each case preprocessed on demand, within `time_limit_s` (0: none); a case that fails becomes
    `{"image": path, "failure": reason}`."""

    def __init__(self, data: Sequence, transform: Callable | None = None, time_limit_s: float = 0) -> None:
        super().__init__(data, transform)
        self.time_limit_s = float(time_limit_s)

    def _transform(self, index: int) -> dict:
        case = self.data[index]
        try:
            with time_limit(self.time_limit_s):
                return self.transform(dict(case))
        except Exception as e:  # any reader or transform error belongs to this case only
            return {"image": case["image"], "failure": failure_reason(e)}


def _as_list(items: list) -> list:
    return items


class CaseStream:
    """Crop cases read and preprocessed as the model consumes them, `num_workers` DataLoader processes reading
    ahead, so memory does not grow with the folder. Cases that fail are kept in `failures`, not raised. It has no
    length: an Ignite engine runs one epoch over it until it is exhausted.

    Args:
        dataset: the cases (dicts with an `image` path) and their deterministic preprocessing.
        batch_size: cases per batch (same-shaped inputs only).
        num_workers: DataLoader worker processes.
    """

    def __init__(self, dataset: SafeCases, batch_size: int = 1, num_workers: int = 0) -> None:
        self.dataset = dataset
        self.cases = list(dataset.data)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.failures: list[tuple[str, str]] = []

    def __iter__(self) -> Iterator[dict]:
        loader = DataLoader(
            self.dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers, collate_fn=_as_list
        )
        for items in loader:
            good = []
            for item in items:
                if "failure" in item:
                    self.failures.append((item["image"], item["failure"]))
                    logger.error(f"{item['image']}: FAILED, {item['failure']}")
                else:
                    good.append(item)
            if good:
                yield list_data_collate(good)


def failure_reason(error: BaseException) -> str:
    """The innermost message of a (possibly MONAI-wrapped) exception."""
    while error.__cause__ is not None:
        error = error.__cause__
    message = str(error).strip().splitlines()
    return f"{type(error).__name__}: {message[-1] if message else 'no message'}"


class HeadCases:
    """Whole-head cases, segmented one at a time by `segmenter` (`scripts.head.segmenter.HeadSegmenter`), each within
    `time_limit_s` (0: none); a case that fails is kept in `failures` with its reason, and the others go on."""

    def __init__(self, data: Sequence[dict], segmenter: Callable[[str], dict], time_limit_s: float = 0) -> None:
        self.cases = list(data)
        self.segmenter = segmenter
        self.time_limit_s = float(time_limit_s)
        self.failures: list[tuple[str, str]] = []
        self.results: dict[str, dict] = {}

    def run(self) -> None:
        for case in self.cases:
            image = case["image"]
            try:
                start = time.perf_counter()
                with time_limit(self.time_limit_s):
                    result = self.segmenter(image)
            except Exception as e:  # any reader, registration or segmentation error belongs to this case only
                self.failures.append((image, failure_reason(e)))
                logger.error(f"{image}: FAILED, {failure_reason(e)}")
                continue
            self.results[image] = result
            split = ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in result.items() if k.endswith("_s"))
            etiv = "withheld" if result["etiv_mm3"] is None else f"{result['etiv_mm3'] / 1000:.0f} cm3"
            logger.info(
                f"{image}: head segmented in {time.perf_counter() - start:.1f} s ({split}), "
                f"eTIV {etiv}, mutual information {result['mutual_information']:.2f}, "
                f"correlation {result['correlation']:.2f}"
            )


class ConfidenceRecorder:
    """A post-processing step on softmax probabilities (`key`, channel first, before argmax): records each case's
    mean top-class probability inside its predicted hippocampus, for the low-confidence QC flag."""

    def __init__(self, key: str = "pred") -> None:
        self.key = key
        self.values: dict[str, float] = {}

    def __call__(self, data: dict) -> dict:
        probabilities = data[self.key]
        top, label = probabilities.max(0)
        inside = label > 0
        image = str(probabilities.meta["filename_or_obj"])
        self.values[image] = float(top[inside].mean()) if bool(inside.any()) else float("nan")
        return data


class SliceSharpnessRecorder:
    """A post-processing step: records each case's `slice_sharpness` and `slice_axis` from its `key` image's metadata
    (`scripts.data.acquisition.SliceSharpnessd` in the preprocessing), for the thick-slice QC flag."""

    def __init__(self, key: str = "image") -> None:
        self.key = key
        self.values: dict[str, tuple[float, int]] = {}

    def __call__(self, data: dict) -> dict:
        meta = data[self.key].meta
        if "slice_sharpness" in meta:
            self.values[str(meta["filename_or_obj"])] = (float(meta["slice_sharpness"]), int(meta["slice_axis"]))
        return data


def run(inputs: Inputs, evaluator, crops: CaseStream, heads: HeadCases) -> None:
    """Checks the inputs and that the output folder can be written, then segments the crops through `evaluator` and
    the heads (the evaluator's checkpoint loader has loaded the weights)."""
    inputs.check()
    check_output_dir(inputs.output_dir)
    if crops.cases:
        evaluator.run()
    if heads.cases:
        heads.run()
