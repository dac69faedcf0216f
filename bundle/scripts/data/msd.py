"""Reads an MSD task folder and splits its labelled cases reproducibly (MONAI has no seeded, persisted split)."""

from __future__ import annotations

import json
import os
import random

from monai.data import load_decathlon_datalist
from monai.utils import look_up_option
from scripts import atomic_write


def load_training_list(dataset_dir: str) -> list[dict[str, str]]:
    """The `training` list of `dataset_dir/dataset.json`, with absolute paths."""
    dataset_dir = os.path.abspath(dataset_dir)
    return load_decathlon_datalist(os.path.join(dataset_dir, "dataset.json"), True, "training", dataset_dir)


def split_dataset(
    cases: list[dict[str, str]], split_seed: int = 0, train_split: float = 0.9
) -> dict[str, list[dict[str, str]]]:
    """Shuffle the labelled `cases` with `split_seed` and split them into `training` and `validation`.

    The split depends only on the set of cases and the seed.
    """
    if not 0.0 < train_split <= 1.0:
        raise ValueError(f"train_split must be in (0, 1], got {train_split}.")
    cases = sorted(cases, key=lambda case: case["image"])
    random.Random(split_seed).shuffle(cases)
    n_train = min(len(cases), max(1, round(train_split * len(cases))))
    return {"training": cases[:n_train], "validation": cases[n_train:]}


def fold_split(
    cases: list[dict[str, str]], fold: int, num_folds: int = 5, fold_seed: int = 0
) -> dict[str, list[dict[str, str]]]:
    """Fold `fold` of a `num_folds`-fold cross-validation: the labelled `cases` shuffled with `fold_seed` and dealt
    into `num_folds` parts of (nearly) equal size; the fold validates on its part and trains on the others. Every case
    is validated by exactly one fold."""
    fold, num_folds = int(fold), int(num_folds)
    if not 0 <= fold < num_folds:
        raise ValueError(f"fold must be in [0, {num_folds}), got {fold}.")
    cases = sorted(cases, key=lambda case: case["image"])
    random.Random(fold_seed).shuffle(cases)
    return {
        "training": [case for i, case in enumerate(cases) if i % num_folds != fold],
        "validation": cases[fold::num_folds],
    }


def write_split(split: dict[str, list[dict[str, str]]], output_dir: str) -> None:
    """`output_dir/split.json`: the cases a run trained and validated on."""
    os.makedirs(output_dir, exist_ok=True)
    with atomic_write(os.path.join(output_dir, "split.json"), "w") as f:
        json.dump(split, f, indent=2)


def evaluation_cases(split: dict[str, list[dict[str, str]]], eval_split: str = "validation") -> list[dict[str, str]]:
    """Cases to evaluate: the validation split, or every labelled case (`all`); each also as `orig_label`."""
    eval_split = look_up_option(eval_split, ("validation", "all"))
    cases = split["validation"] if eval_split == "validation" else split["training"] + split["validation"]
    return [dict(case, orig_label=case["label"]) for case in cases]
