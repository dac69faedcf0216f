"""BIDS in and BIDS-Derivatives out, which MONAI does not know: T1w selection by participant and session, derivative
file names, the dataset description, the look-up table and each mask's sidecar."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence

from scripts import BundleError, atomic_write
from scripts.labels import structures
from scripts.qc.check import CaseRow

DESCRIPTION = "dataset_description.json"
DESC = "hippocampus"
T1W = re.compile(r"^(sub-[A-Za-z0-9]+(?:_[a-z]+-[A-Za-z0-9]+)*)_T1w\.nii(?:\.gz)?$")
BIDS_IGNORE = ["volumes.tsv", "report.html", "logs", "sub-*/figures", "sub-*/*_volumes.tsv"]


def dataset_root(path: str) -> str | None:
    """The BIDS dataset (the folder with dataset_description.json) that holds `path`, or None."""
    folder = os.path.abspath(path if os.path.isdir(path) else os.path.dirname(path))
    while True:
        if os.path.isfile(os.path.join(folder, DESCRIPTION)):
            return folder
        parent = os.path.dirname(folder)
        if parent == folder:
            return None
        folder = parent


def entities(path: str) -> dict[str, str]:
    """The key-value entities of a `sub-X[_ses-Y]..._T1w.nii[.gz]` file name, in order; ValueError for another name."""
    match = T1W.match(os.path.basename(path))
    if not match:
        raise ValueError(f"{path} is not a BIDS T1w file name (sub-<label>[_ses-<label>]..._T1w.nii[.gz])")
    return dict(part.split("-", 1) for part in match.group(1).split("_"))


def _labels(labels: str | int | Sequence | None, prefix: str) -> set[str] | None:
    """`--participant_label "01 02"` (or `01,02`, `sub-01`, a list) as a set of labels; None for all."""
    if labels is None or labels == "":
        return None
    items = [labels] if isinstance(labels, (str, int)) else list(labels)
    words = (word for item in items for word in re.split(r"[\s,\[\]'\"]+", str(item)) if word)
    return {word.removeprefix(prefix) for word in words}


def find_t1w(root: str, participant_label=None, session_label=None) -> list[str]:
    """The `sub-*/[ses-*/]anat/*_T1w.nii[.gz]` files of a BIDS dataset, of the given participants and sessions;
    BundleError for a label that selects nothing."""
    participants, sessions = _labels(participant_label, "sub-"), _labels(session_label, "ses-")
    found = []
    for subject in sorted(d for d in os.listdir(root) if d.startswith("sub-") and os.path.isdir(os.path.join(root, d))):
        for folder, subfolders, files in os.walk(os.path.join(root, subject)):
            subfolders.sort()
            if os.path.basename(folder) != "anat":
                continue
            for name in sorted(files):
                if T1W.match(name):
                    found.append(os.path.join(folder, name))
    chosen = [
        path
        for path in found
        if (participants is None or entities(path)["sub"] in participants)
        and (sessions is None or entities(path).get("ses") in sessions)
    ]
    for wanted, key, flag in ((participants, "sub", "participant"), (sessions, "ses", "session")):
        missing = sorted((wanted or set()) - {entities(path).get(key) for path in chosen})
        if missing:
            raise BundleError(f"--{flag}_label {' '.join(missing)}: no T1w image of that {flag} in {root}.")
    return chosen


def derivative_name(path: str) -> str:
    """`sub-X[_ses-Y]..._desc-hippocampus_dseg` for the T1w image `path` (an input's own desc entity is replaced)."""
    kept = [f"{key}-{value}" for key, value in entities(path).items() if key != "desc"]
    return "_".join(kept + [f"desc-{DESC}", "dseg"])


def participant_table(output_dir: str, subject: str) -> str:
    """The volumes table of participant `subject` written by the BIDS App's participant level."""
    return os.path.join(output_dir, f"sub-{subject}", f"sub-{subject}_desc-{DESC}_volumes.tsv")


def write_dataset_files(output_dir: str, source_dir: str, metadata: dict, exclusive: bool = False) -> None:
    """The derivative dataset's `dataset_description.json`, README, `.bidsignore` and the look-up table of heads'
    labels, `desc-hippocampus_dseg.tsv` (a crop's mask has its own beside it); `metadata`: the bundle's metadata.json.
    With `exclusive` (participant jobs writing into one folder at once), each file is written only where none is.
    """
    description = {
        "Name": f"{metadata['name']}: masks and volumes",
        "BIDSVersion": "1.10.0",
        "DatasetType": "derivative",
        "Authors": [metadata["authors"]],
        "GeneratedBy": [
            {
                "Name": metadata["name"],
                "Version": metadata["version"],
                "Description": "MONAI bundle, configs/inference.yaml",
            }
        ],
        "SourceDatasets": [{"URL": f"file://{os.path.abspath(source_dir)}"}],
        "DatasetLinks": {"raw": f"file://{os.path.abspath(source_dir)}"},
    }
    _write_json(os.path.join(output_dir, DESCRIPTION), description, exclusive)
    with atomic_write(os.path.join(output_dir, "README"), "w", exclusive) as f:
        f.write(
            f"Hippocampus masks (anterior and posterior, per side for whole heads) written by {metadata['name']} "
            f"{metadata['version']}; volumes in volumes.tsv, quality review in report.html.\n"
        )
    with atomic_write(os.path.join(output_dir, ".bidsignore"), "w", exclusive) as f:
        f.write("\n".join(BIDS_IGNORE) + "\n")
    write_look_up(os.path.join(output_dir, f"desc-{DESC}_dseg.tsv"), "head", exclusive)


def write_look_up(path: str, kind: str, exclusive: bool = False) -> None:
    """The look-up table of a `kind` (crop or head) mask: each label's name and abbreviation."""
    with atomic_write(path, "w", exclusive) as f:
        f.write("index\tname\tabbreviation\n")
        for label, side, part in structures(kind):
            words = [word for word in (side, "hippocampus", part) if word]
            f.write(f"{label}\t{' '.join(words)}\t{''.join(word[0].upper() for word in words)}\n")


def write_sidecar(mask_file: str, source: str, source_dir: str, version: str, row: CaseRow, head: dict | None) -> None:
    """`<mask>.json`: its source (a BIDS URI), the bundle version, the registration's figures for a head, the QC."""
    uri = f"bids:raw:{os.path.relpath(source, source_dir)}"
    sidecar = {
        "Description": "Hippocampus anterior and posterior parts" + (", per side" if head else ""),
        "Sources": [uri],
        "SpatialReference": uri,
        "Manual": False,
        "BundleVersion": version,
        "Kind": row.kind,
        "Confidence": None if row.confidence is None or math.isnan(row.confidence) else round(row.confidence, 4),
        **_qc_fields(row),
    }
    if head is not None:
        sidecar["Registration"] = {
            "MutualInformation": round(head["mutual_information"], 4),
            "Correlation": round(head["correlation"], 4),
        }
        # null where the field of view cuts too much of the brain (QCReasons says so)
        sidecar["eTIV_mm3"] = None if head["etiv_mm3"] is None else round(head["etiv_mm3"])
        sidecar["BrainOutsideFieldOfView"] = round(head.get("brain_outside_fov", 0.0), 3)
    _write_json(mask_file[: -len(".nii.gz")] + ".json", sidecar)


def _qc_fields(row: CaseRow) -> dict:
    return {
        "QC": row.qc,
        "QCScore": round(row.qc_score, 3) if row.qc_score is not None else None,
        "QCReasons": list(row.reasons),
    }


def update_qc(mask_file: str, row: CaseRow) -> None:
    """The QC fields of `<mask>.json` rewritten from the mask's volumes-table row."""
    path = mask_file[: -len(".nii.gz")] + ".json"
    with open(path, encoding="utf-8") as f:
        sidecar = json.load(f)
    _write_json(path, {**sidecar, **_qc_fields(row)})


def _write_json(path: str, content: dict, exclusive: bool = False) -> None:
    with atomic_write(path, "w", exclusive) as f:
        json.dump(content, f, indent=2)
        f.write("\n")
