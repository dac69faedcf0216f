"""Heads whose field of view cuts the brain, as clinical scans do: copies of a folder of heads with their top, one
side, their front or back removed, or only a slab through the temporal lobes kept, each segmented beside its full
head; eTIV and hippocampal volumes compared with the full head's. The copies are cut from the heads given, so they
are made again where the heads are, never committed.

    python -m tools.field_of_view --images ../../shared/data/real_heads/images --output_dir /tmp/field_of_view
"""

from __future__ import annotations

import csv
import os

import fire
import nibabel as nib
import numpy as np
from scripts import BUNDLE_DIR
from scripts.labels import SIDES, mask_name
from tools.failure_set import _axis_nearest, _head_files
from tools.head_check import configured_segmenter, segment_timed

# (face, share of the head's extent removed) or ("slab", mm kept around the hippocampi along superior-inferior);
# `_zeroed`: the same cut as zeros on the full grid, as a conformed or padded file holds it
CUTS = {
    "top15": ("top", 0.15),
    "top20": ("top", 0.20),
    "top25": ("top", 0.25),
    "top20_zeroed": ("top", 0.20),
    "left20": ("left", 0.20),
    "right20": ("right", 0.20),
    "front15": ("front", 0.15),
    "back15": ("back", 0.15),
    "slab70": ("slab", 70.0),
    "slab60": ("slab", 60.0),
}
FACES = {"top": (2, 1), "bottom": (2, -1), "left": (0, -1), "right": (0, 1), "front": (1, 1), "back": (1, -1)}
COLUMNS = (
    "head",
    "copy",
    "failed",
    "brain_outside",
    "etiv_mm3",
    "etiv_change",
    "mask_etiv_change",
    "left_change",
    "right_change",
    "qc",
    "qc_reasons",
)


def _head_extent(data: np.ndarray, axis: int) -> tuple[int, int]:
    """The first and last index along `axis` of slices that hold head (over 10% of the 99th percentile)."""
    head = data > 0.1 * np.percentile(data, 99)
    counts = head.sum(axis=tuple(a for a in range(3) if a != axis))
    hits = np.flatnonzero(counts >= 20)
    return int(hits[0]), int(hits[-1])


def cut(
    data: np.ndarray, affine: np.ndarray, face: str, amount: float, mask: np.ndarray | None = None, zeroed=False
) -> tuple[np.ndarray, np.ndarray]:
    """A head (`data`, `affine`) with `amount` of its extent removed at `face` (a key of `FACES`), or only `amount` mm
    along superior-inferior kept around `mask`'s voxels (its hippocampi) for `face` "slab"; `zeroed`: the removed
    voxels set to 0 on the full grid instead of cut away."""
    world_axis, direction = FACES["top" if face == "slab" else face]
    axis = _axis_nearest(affine, world_axis)
    spacing = float(np.linalg.norm(affine[:3, axis]))
    low, high = _head_extent(data, axis)
    if face == "slab":
        centre = np.argwhere(mask > 0).mean(0)[axis]
        half = amount / spacing / 2
        kept = slice(max(int(round(centre - half)), 0), int(round(centre + half)))
    else:
        removed = int(round(amount * (high - low + 1)))
        towards_larger_index = (affine[world_axis, axis] > 0) == (direction > 0)
        kept = slice(0, high + 1 - removed) if towards_larger_index else slice(low + removed, None)
    region = tuple(kept if a == axis else slice(None) for a in range(3))
    if zeroed:
        copy = np.zeros_like(data)
        copy[region] = data[region]
        return copy, affine
    start = np.zeros(3)
    start[axis] = kept.start
    cut_affine = affine.copy()
    cut_affine[:3, 3] = nib.affines.apply_affine(affine, start)
    return np.ascontiguousarray(data[region]), cut_affine


def _change(value: float | None, reference: float | None) -> float | None:
    return None if value is None or not reference else 100 * (value / reference - 1)


def run(images: str, output_dir: str, config_file: str = "configs/inference.yaml") -> list[dict]:
    """Segments each head of `images` (and the MNI152 template) and its `CUTS` copies (`output_dir/images`, masks in
    `output_dir/masks`), writes `field_of_view.csv` and prints the table of docs/heads.md ("Fields of view that cut
    the brain"): each copy's share of the brain outside its field of view, eTIV and hippocampal volume changes
    against its full head, and QC."""
    from scripts.recipe import load

    copies, masks = os.path.join(output_dir, "images"), os.path.join(output_dir, "masks")
    os.makedirs(copies, exist_ok=True)
    segmenter = configured_segmenter(config_file, masks)
    quality = load(BUNDLE_DIR, [config_file], {}).get_parsed_content("qc")
    rows = []
    for head, path in _head_files(images).items():
        source = nib.load(path)
        data, affine = np.asarray(source.dataobj, dtype=np.float32), source.affine
        full = None
        for copy in ("full", *CUTS):
            case = f"{head}__{copy}"
            image = os.path.join(copies, f"{case}.nii.gz")
            if copy == "full":
                nib.save(nib.Nifti1Image(data, affine), image)
            else:
                copied = cut(data, affine, *CUTS[copy], full["mask"], zeroed=copy.endswith("_zeroed"))
                nib.save(nib.Nifti1Image(*copied), image)
            result = segment_timed(segmenter, image)
            row = {"head": head, "copy": copy, "failed": result.get("failed", "")}
            if not row["failed"]:
                mask_file = os.path.join(masks, mask_name(case))
                qc = quality.row(case, mask_file, result, result["confidence"])
                row.update(
                    brain_outside=result.get("brain_outside_fov"),
                    etiv_mm3=result["etiv_mm3"],
                    mask_etiv_mm3=result.get("brain_mask_mm3", result["etiv_mm3"]),
                    qc=qc.qc,
                    qc_reasons=qc.qc_reasons,
                    **{f"{side}_mm3": qc.volume(side) for side in SIDES},
                )
            if copy == "full":
                if row["failed"]:
                    print(f"{head}: the full head failed ({row['failed']}); left out")
                    break
                full = {**row, "mask": np.asarray(nib.load(os.path.join(masks, mask_name(case))).dataobj)}
            row.update(
                etiv_change=_change(row.get("etiv_mm3"), full["etiv_mm3"]),
                mask_etiv_change=_change(row.get("mask_etiv_mm3"), full["mask_etiv_mm3"]),
                **{f"{side}_change": _change(row.get(f"{side}_mm3"), full[f"{side}_mm3"]) for side in SIDES},
            )
            rows.append(row)
            print(_line(row), flush=True)
    with open(os.path.join(output_dir, "field_of_view.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore", restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    _summary(rows)
    return rows


def _line(row: dict) -> str:
    """One copy as a row of the Markdown table."""
    if row["failed"]:
        return f"| {row['head']} | {row['copy']} | failed: {row['failed']} | | | | |"

    def pct(value):
        return "" if value is None else f"{value:+.1f}%"

    etiv = "withheld" if row["etiv_mm3"] is None else pct(row["etiv_change"])
    outside = row["brain_outside"]
    return (
        f"| {row['head']} | {row['copy']} | {'' if outside is None else f'{100 * outside:.0f}%'} | {etiv} | "
        f"{pct(row['mask_etiv_change'])} | {pct(row['left_change'])} / {pct(row['right_change'])} | "
        f"{row['qc']}: {row['qc_reasons']} |"
    )


def _summary(rows: list[dict]) -> None:
    """What the issue's targets count, over the cut copies; and any full head taken for cut."""
    cut = [r for r in rows if r["copy"] != "full"]
    segmented = [r for r in cut if not r["failed"]]
    slabs = [r for r in cut if r["copy"].startswith("slab")]
    named = [r for r in segmented if "field of view cuts" in r["qc_reasons"]]
    silent = [r for r in segmented if r["etiv_change"] is not None and abs(r["etiv_change"]) > 5 and r not in named]
    kept = [r for r in segmented if r["etiv_change"] is not None]
    drift = [r for r in segmented if r["qc"] != "fail" and max(abs(r[f"{side}_change"]) for side in SIDES) > 3]
    full_cut = [r["head"] for r in rows if r["copy"] == "full" and "field of view cuts" in r.get("qc_reasons", "")]
    print(
        f"{len(segmented)} of {len(cut)} cut copies segmented ({sum(not r['failed'] for r in slabs)} of {len(slabs)} "
        f"slabs), {len(named)} named as cut; eTIV more than 5% off without a reason that names the cut: "
        f"{len(silent)}; eTIV kept on {len(kept)} (within 3%: {sum(abs(r['etiv_change']) <= 3 for r in kept)}); "
        f"hippocampal volumes more than 3% off and not failed: {len(drift)}; full heads taken for cut: {full_cut}"
    )


def _cli(images: str, output_dir: str, config_file: str = "configs/inference.yaml") -> None:
    run(images, output_dir, config_file)


if __name__ == "__main__":
    fire.Fire(_cli)
