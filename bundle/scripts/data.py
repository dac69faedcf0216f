"""Reads an MSD task folder and splits its labelled cases reproducibly (MONAI has no seeded, persisted split)."""

from __future__ import annotations

import json
import os
import random

from scripts import atomic_write


def load_training_list(dataset_dir: str) -> list[dict[str, str]]:
    """The `training` list of `dataset_dir/dataset.json`, with paths made absolute."""
    with open(os.path.join(dataset_dir, "dataset.json"), encoding="utf-8") as f:
        cases = json.load(f)["training"]
    return [{key: os.path.abspath(os.path.join(dataset_dir, path)) for key, path in case.items()} for case in cases]


def split_dataset(
    cases: list[dict[str, str]], split_seed: int = 0, train_split: float = 0.9, output_dir: str | None = None
) -> dict[str, list[dict[str, str]]]:
    """Shuffle the labelled `cases` with `split_seed` and split them into `training` and `validation`.

    The split depends only on the set of cases and the seed; it is written to `output_dir/split.json` when given.
    """
    if not 0.0 < train_split <= 1.0:
        raise ValueError(f"train_split must be in (0, 1], got {train_split}.")
    cases = sorted(cases, key=lambda case: case["image"])
    random.Random(split_seed).shuffle(cases)
    n_train = min(len(cases), max(1, round(train_split * len(cases))))
    split = {"training": cases[:n_train], "validation": cases[n_train:]}
    if output_dir is not None:
        os.makedirs(output_dir, exist_ok=True)
        # atomic: every rank of a multi-process run writes the same file
        with atomic_write(os.path.join(output_dir, "split.json"), "w") as f:
            json.dump({"split_seed": split_seed, "train_split": train_split, **split}, f, indent=2)
    return split


def evaluation_cases(split: dict[str, list[dict[str, str]]], eval_split: str = "validation") -> list[dict[str, str]]:
    """Cases to evaluate: the validation split, or every labelled case (`all`); each also as `orig_label`."""
    if eval_split not in ("validation", "all"):
        raise ValueError(f"eval_split must be 'validation' or 'all', got {eval_split!r}.")
    cases = split["validation"] if eval_split == "validation" else split["training"] + split["validation"]
    return [dict(case, orig_label=case["label"]) for case in cases]
