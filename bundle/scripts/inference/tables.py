"""The run's volumes table, `volumes.csv` (`volumes.tsv` with participants, sessions and eTIV fractions in the BIDS
layout): one row per input whose mask is on disk, kept across reruns."""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Sequence

from scripts import atomic_write
from scripts.inference.bids import entities
from scripts.qc.check import SIDE_PARTS, VOLUME_COLUMNS, CaseRow, QualityCheck, flag_cohort_outliers

logger = logging.getLogger(__name__)
FRACTION_COLUMNS = [f"{side}_{part}_etiv_fraction" for side, part in SIDE_PARTS]


def _bids_columns(row: CaseRow) -> dict[str, str]:
    """A `volumes.tsv` row: the participant and session first, each side's volumes also as a fraction of eTIV, n/a
    for what does not apply."""
    labels = entities(row.case)
    fractions = (
        {f"{name}_etiv_fraction": f"{value / row.etiv_mm3:.6g}" for name, value in row.side_volumes().items()}
        if row.etiv_mm3
        else {}
    )
    columns = {
        "participant_id": f"sub-{labels['sub']}",
        "session_id": f"ses-{labels['ses']}" if "ses" in labels else "",
        **row.columns(),
        **fractions,
    }
    return {key: value if value != "" else "n/a" for key, value in columns.items()}


def write_volumes(inputs, rows: Sequence[CaseRow], quality: QualityCheck) -> tuple[str, list[CaseRow]]:
    """The volumes table in `inputs.output_dir`, written atomically: one row per input whose mask is on disk, from
    `rows` (this run), else from the earlier file, else computed from the mask (a case skipped because its mask
    exists), with the cohort's outliers flagged. Returns the file and its rows."""
    path = os.path.join(inputs.output_dir, "volumes.tsv" if inputs.bids else "volumes.csv")
    delimiter = "\t" if inputs.bids else ","
    earlier = {}
    if os.path.isfile(path):
        with open(path, newline="", encoding="utf-8") as f:
            earlier = {
                row["case"]: {key: "" if value == "n/a" else value for key, value in row.items()}
                for row in csv.DictReader(f, delimiter=delimiter)
            }
    now = {row.case: row for row in rows}
    table = []
    for image in inputs.paths:
        case, mask = inputs.case(image), inputs.mask_path(image)
        if case in now:
            table.append(now[case])
        elif case in earlier and os.path.isfile(mask):
            table.append(CaseRow.from_columns(earlier[case]))
        elif os.path.isfile(mask):
            try:
                table.append(quality.row(case, mask))
            except Exception as e:  # an unreadable old mask loses its row, not the table
                logger.warning(f"{mask}: no volumes ({type(e).__name__}: {e})")
    flag_cohort_outliers(table)
    columns = ["participant_id", "session_id", *VOLUME_COLUMNS, *FRACTION_COLUMNS] if inputs.bids else VOLUME_COLUMNS
    with atomic_write(path, "w") as f:
        writer = csv.DictWriter(
            f, fieldnames=columns, restval="n/a" if inputs.bids else "", delimiter=delimiter, lineterminator="\n"
        )
        writer.writeheader()
        writer.writerows([_bids_columns(row) if inputs.bids else row.columns() for row in table])
    return path, table
