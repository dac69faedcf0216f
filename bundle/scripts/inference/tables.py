"""The run's volumes table, `volumes.csv` (`volumes.tsv` with participants, sessions and eTIV fractions in the BIDS
layout): one row per input whose mask is on disk, kept across reruns."""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Sequence

from scripts import atomic_write
from scripts.inference.bids import entities, participant_table
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


def read_rows(path: str, delimiter: str) -> dict[str, dict[str, str]]:
    """The rows of a volumes table written by `write_table` (empty when there is none), by case, n/a read as empty."""
    if not os.path.isfile(path):
        return {}
    with open(path, newline="", encoding="utf-8") as f:
        return {
            row["case"]: {key: "" if value == "n/a" else value for key, value in row.items()}
            for row in csv.DictReader(f, delimiter=delimiter)
        }


def _table_rows(inputs, paths: Sequence[str], rows: Sequence[CaseRow], earlier: dict, quality: QualityCheck):
    """One row per input of `paths` whose mask is on disk: from `rows` (this run), else from `earlier` (a table's),
    else computed from the mask (a case skipped because its mask exists)."""
    now = {row.case: row for row in rows}
    table = []
    for image in paths:
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
    return table


def write_table(path: str, table: Sequence[CaseRow], bids: bool) -> None:
    """`table` as a volumes table, written atomically: tab-separated with the BIDS columns when `bids`."""
    columns = ["participant_id", "session_id", *VOLUME_COLUMNS, *FRACTION_COLUMNS] if bids else VOLUME_COLUMNS
    with atomic_write(path, "w") as f:
        writer = csv.DictWriter(
            f, fieldnames=columns, restval="n/a" if bids else "", delimiter="\t" if bids else ",", lineterminator="\n"
        )
        writer.writeheader()
        writer.writerows([_bids_columns(row) if bids else row.columns() for row in table])


def write_volumes(inputs, rows: Sequence[CaseRow], quality: QualityCheck) -> tuple[str, list[CaseRow]]:
    """The volumes table in `inputs.output_dir`: one row per input whose mask is on disk, from `rows` (this run),
    else from the earlier file, else computed from the mask, with the cohort's outliers flagged. Returns the file
    and its rows."""
    path = os.path.join(inputs.output_dir, "volumes.tsv" if inputs.bids else "volumes.csv")
    earlier = read_rows(path, "\t" if inputs.bids else ",")
    table = _table_rows(inputs, inputs.paths, rows, earlier, quality)
    flag_cohort_outliers(table)
    write_table(path, table, inputs.bids)
    return path, table


def write_participant_volumes(inputs, rows: Sequence[CaseRow], quality: QualityCheck) -> list[str]:
    """The BIDS App's participant level: each participant's own volumes table (`bids.participant_table`), its rows
    as `write_volumes` finds them, with no cohort flags (the group level sets them). Returns the files."""
    subjects: dict[str, list[str]] = {}
    for image in inputs.paths:
        subjects.setdefault(entities(image)["sub"], []).append(image)
    written = []
    for subject, paths in subjects.items():
        path = participant_table(inputs.output_dir, subject)
        table = _table_rows(inputs, paths, rows, read_rows(path, "\t"), quality)
        if table:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            write_table(path, table, bids=True)
            written.append(path)
    return written
