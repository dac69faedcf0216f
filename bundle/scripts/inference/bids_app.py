"""The BIDS App call form, `bids_dir output_dir participant|group [options]`, as FastSurfer, fMRIPrep and MRIQC take
it, and the image's entry point (Dockerfile). Run from the bundle folder:

    python -m scripts.inference.bids_app BIDS OUT participant --participant_label 01
    python -m scripts.inference.bids_app BIDS OUT group

`participant` segments the selected participants' T1w images as configs/inference.yaml does any BIDS dataset, but
writes each participant's volumes to its own table and the dataset files only where none are, so that one job per
participant can write into one output folder at once. `group` reads those tables and writes the cohort's
volumes.tsv, its outlier flags and report.html, segmenting nothing. Given a program instead (`python -m monai.bundle
run ...`, `bash`), the image runs that program.
"""

from __future__ import annotations

import argparse
import logging.config
import os
import shutil
import sys

import yaml
from scripts import BUNDLE_DIR, BundleError, as_bool, find_bundle_error, read_metadata
from scripts.inference import bids

CONFIG = os.path.join("configs", "inference.yaml")
# set by the positional arguments and the level, not by an option
FIXED = {
    "bundle_root",
    "dataset_dir",
    "output_dir",
    "output_layout",
    "bids_level",
    "participant_label",
    "session_label",
}


def _flag(value: str) -> bool:
    try:
        return as_bool(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


class _Parser(argparse.ArgumentParser):
    """A wrong call is one line that names the problem (--help gives the usage)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (--help for the usage)\n")


def argument_parser() -> argparse.ArgumentParser:
    metadata = read_metadata()
    parser = _Parser(
        prog="python -m scripts.inference.bids_app",
        description=f"{metadata['name']} {metadata['version']}: hippocampus masks and volumes of a BIDS dataset's T1w "
        "images, as BIDS-Derivatives (docs/usage.md, 'BIDS App').",
        epilog="Any other id of configs/inference.yaml is an option too (--dicom_seg true, --keep_largest false, "
        "--input_kind head).",
    )
    parser.add_argument("bids_dir", help="the BIDS dataset (the folder with dataset_description.json)")
    parser.add_argument("output_dir", help="where the derivatives go; participant jobs may share it")
    parser.add_argument(
        "analysis_level",
        choices=("participant", "group"),
        help="participant: segment (one job per participant, at once if you like); group: gather their volumes into "
        "volumes.tsv, flag the cohort's outliers and write report.html",
    )
    parser.add_argument("--participant_label", nargs="+", metavar="LABEL", help="participants (01 or sub-01); all")
    parser.add_argument("--session_label", nargs="+", metavar="LABEL", help="sessions (1 or ses-1); all")
    for flag, default, about in (
        ("qc_png", "false", "each case's QC picture in sub-X/figures/"),
        ("report", "true", "the QC pictures the group's report.html shows"),
        ("ensemble", "true", "crops: the five fold models averaged; false: models/model.pt alone"),
        ("overwrite", "false", "segment again scans whose mask exists"),
    ):
        parser.add_argument(
            f"--{flag}", type=_flag, nargs="?", const=True, metavar="true|false", help=f"{about} (default {default})"
        )
    parser.add_argument(
        "--cpu_bf16", choices=("auto", "true", "false"), help="bf16 on CPUs (auto: where the CPU has it natively)"
    )
    parser.add_argument("--max_voxels", type=int, help="refuse scans whose header claims more voxels (150,000,000)")
    parser.add_argument("--case_time_limit_s", type=float, help="fail a case that takes longer (0: no limit)")
    parser.add_argument("--version", action="version", version=f"{metadata['name']} {metadata['version']}")
    return parser


def _config_options(words: list[str], parser: argparse.ArgumentParser) -> dict:
    """`--id value` pairs for the other top-level ids of configs/inference.yaml; an unknown one is a usage error."""
    with open(os.path.join(BUNDLE_DIR, CONFIG), encoding="utf-8") as f:
        known = set(yaml.safe_load(f)) - FIXED
    options = {}
    while words:
        word = words.pop(0)
        key = word[2:] if word.startswith("--") else None
        if key not in known:
            parser.error(f"unrecognized argument {word}")
        if not words:
            parser.error(f"{word} needs a value")
        options[key] = words.pop(0)
    return options


def _check_dataset(bids_dir: str) -> None:
    if not os.path.isdir(bids_dir):
        raise BundleError(f"bids_dir {bids_dir} is not a folder.")
    if not os.path.isfile(os.path.join(bids_dir, bids.DESCRIPTION)):
        raise BundleError(f"bids_dir {bids_dir} is not a BIDS dataset: it has no {bids.DESCRIPTION}.")


def run(args: argparse.Namespace, options: dict) -> int:
    """One level of the app; returns the exit status."""
    _check_dataset(args.bids_dir)
    bids.find_t1w(args.bids_dir, args.participant_label, args.session_label)  # an unknown label, by name
    declared = ("qc_png", "report", "ensemble", "overwrite", "cpu_bf16", "max_voxels", "case_time_limit_s")
    settings = {
        "bundle_root": BUNDLE_DIR,
        "dataset_dir": args.bids_dir,
        "output_dir": args.output_dir,
        "output_layout": "bids",
        "bids_level": args.analysis_level,
        "participant_label": args.participant_label,
        "session_label": args.session_label,
        **{key: getattr(args, key) for key in declared if getattr(args, key) is not None},
        **options,
    }
    logging_file = os.path.join(BUNDLE_DIR, "configs", "logging.conf")
    if args.analysis_level == "participant":
        from monai.bundle import run as run_bundle

        run_bundle(config_file=os.path.join(BUNDLE_DIR, CONFIG), logging_file=logging_file, **settings)
        return 0
    if not os.path.isdir(args.output_dir):
        raise BundleError(f"output_dir {args.output_dir} does not exist: run the participant level into it first.")
    from scripts import recipe

    logging.config.fileConfig(logging_file, disable_existing_loggers=False)
    config = recipe.load(BUNDLE_DIR, [CONFIG], settings)
    config.get_parsed_content("inputs").check()
    failed = config.get_parsed_content("outputs#run_files").group()
    for image, reason in failed:
        print(f"{image}: {reason}", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and not argv[0].startswith("-") and not os.path.isdir(argv[0]) and shutil.which(argv[0]):
        os.execvp(argv[0], argv)  # the image given a program to run: `docker run IMAGE python -m monai.bundle ...`
    parser = argument_parser()
    args, rest = parser.parse_known_args(argv)
    options = _config_options(rest, parser)
    try:
        return run(args, options)
    except Exception as e:  # an input problem is one line that names it; anything else keeps its traceback
        cause = find_bundle_error(e)
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
