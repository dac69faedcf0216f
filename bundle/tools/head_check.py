"""Whole-head checks. There are no labelled heads here, so `check` measures what can be measured: the agreement of the
masks of moved, reoriented, resampled and degraded copies of the MNI152 template with the template's own mask once
each change is undone, and the time of each step. `compare` scores head masks against another tool's segmentations
(FreeSurfer's or FastSurfer's aseg by default, DLMUSE's, or another tool's pair of masks), for whoever has them;
`real_heads` runs both tools' comparison on a folder laid out as `../shared/data/real_heads`.

    python -m tools.head_check check --output_dir /tmp/head_check
    python -m tools.head_check compare --masks OUT --reference REF --reference_suffix /aseg.mgz
    python -m tools.head_check compare --masks OUT --reference REF --reference_suffix _dlmuse.nii.gz \
        --left_labels 48 --right_labels 47
    python -m tools.head_check compare --masks OUT --reference HIPPODEEP --left_suffix _mask_L.nii.gz \
        --right_suffix _mask_R.nii.gz --threshold 127
    python -m tools.head_check real_heads --data_dir ../../shared/data/real_heads --output_dir /tmp/real_heads \
        [--overrides "{'head#box_size': [40, 56, 40]}"]
    python -m tools.head_check beside_hippodeep --hippodeep ../../shared/peers/hippodeep_pytorch/hippodeep.py \
        --images IN --output_dir /tmp/timed
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import nibabel as nib
import numpy as np
import torch
from monai.data import FolderLayoutBase, MetaTensor
from scipy import ndimage
from scripts import BUNDLE_DIR
from scripts.head.segmenter import HeadSegmenter
from scripts.imaging import from_sitk, nonzero_box, resample, sample_near, sample_on_grid, to_sitk
from scripts.labels import HEAD_LABELS, MASK_SUFFIX, mask_name
from scripts.qc.calibration import dice
from scripts.recipe import load

TEMPLATE = os.path.join(BUNDLE_DIR, "atlas", "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
TIME_STEPS = ("read_s", "extraction_s", "registration_s", "segmentation_s", "writing_s")
STEPS_HEADER = "read / extraction / registration / segmentation / writing s"


def _print_header(*columns: str) -> None:
    """The header of a Markdown table."""
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))


class FlatFolder(FolderLayoutBase):
    """`output_dir/<case>_seg.nii.gz`, whichever folder the head comes from."""

    def __init__(self, output_dir: str) -> None:
        self.output_dir = output_dir

    def filename(self, subject: str, idx=None, **kwargs) -> str:
        os.makedirs(self.output_dir, exist_ok=True)
        return os.path.join(self.output_dir, mask_name(subject))


def configured_segmenter(config_file: str, output_dir: str, overrides: dict | None = None) -> HeadSegmenter:
    """The head segmenter of an inference config with `overrides` (config ids), its weights loaded, writing to
    `output_dir` (no input folder to mirror): for the commands that segment heads outside a bundle run
    (`tools.atlas`, `tools.head_check`, `tools.failure_set`)."""
    parser = load(
        BUNDLE_DIR, [config_file], {**(overrides or {}), "head#segmenter#folder_layout": FlatFolder(output_dir)}
    )
    parser.get_parsed_content("handlers")  # its checkpoint loader puts the weights into the network
    return parser.get_parsed_content("head#segmenter")


def rigid(angles_deg, translation) -> np.ndarray:
    """A 4x4 world (RAS mm) rotation about the template's centre, then translation."""
    rotation = np.eye(3)
    for axis, angle in enumerate(np.deg2rad(angles_deg)):
        c, s = np.cos(angle), np.sin(angle)
        i, j = [a for a in range(3) if a != axis]
        turn = np.eye(3)
        turn[i, i], turn[i, j], turn[j, i], turn[j, j] = c, -s, s, c
        rotation = turn @ rotation
    centre = np.array([0.0, -18.0, 18.0])
    matrix = np.eye(4)
    matrix[:3, :3] = rotation
    matrix[:3, 3] = centre - rotation @ centre + np.asarray(translation, dtype=float)
    return matrix


def resampled(image: nib.Nifti1Image, spacing) -> nib.Nifti1Image:
    """`image` on a grid of `spacing` mm (one per voxel axis) over the same field of view, anti-aliased
    (`scripts.imaging.resample`)."""
    volume = MetaTensor(
        torch.from_numpy(np.asarray(image.dataobj, dtype=np.float32))[None], affine=torch.as_tensor(image.affine)
    )
    # SimpleITK lists the voxel axes last to first
    data, affine = from_sitk(resample(to_sitk(volume), np.broadcast_to(spacing, (3,))[::-1].tolist()))
    return nib.Nifti1Image(data, affine)


def make_heads(folder: str, seed: int = 0) -> dict[str, str]:
    """Writes the template and its copies to `folder`: two under random rotations (up to 15 degrees) and translations
    (up to 20 mm) of the header, one in LPS voxel order, one anisotropic, one at 2 mm. Returns {name: the change}."""
    os.makedirs(folder, exist_ok=True)
    template = nib.load(TEMPLATE)
    data = np.asarray(template.dataobj, dtype=np.float32)
    rng = np.random.default_rng(seed)
    heads = {"template": (data, template.affine, "the template itself")}
    for i in range(2):
        angles, shift = rng.uniform(-15, 15, 3), rng.uniform(-20, 20, 3)
        heads[f"moved{i}"] = (
            data,
            rigid(angles, shift) @ template.affine,
            f"rotated {np.round(angles, 1).tolist()} deg, moved {np.round(shift, 1).tolist()} mm",
        )
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    lps[:2, 3] = np.array(data.shape[:2]) - 1
    heads["lps"] = (data[::-1, ::-1], template.affine @ lps, "stored in LPS voxel order")
    for name, spacing in (("aniso", (0.9, 1.0, 1.6)), ("2mm", (2.0, 2.0, 2.0))):
        image = resampled(template, spacing)
        heads[name] = (image.get_fdata(dtype=np.float32), image.affine, f"resampled to {list(spacing)} mm")
    for name, (array, affine, _) in heads.items():
        nib.save(nib.Nifti1Image(np.ascontiguousarray(array), affine), os.path.join(folder, f"{name}.nii.gz"))
    return {name: description for name, (_, _, description) in heads.items()}


NECK_MM = 120
TOP_KEPT_MM = 150
FACE_CUT_MM = 25


def make_harder_heads(folder: str, seed: int = 0, names: Sequence[str] | None = None) -> dict[str, str]:
    """Copies with what real scans add: a bias field, other contrast and noise, a neck, a cut-off top, a field of
    view cut at the face and the top, smaller and larger heads, a large tilt far from the scanner's origin, no skull,
    a FreeSurfer `.mgz` file; and two that must fail: noise, inverted contrast. `names` writes only those."""
    template = nib.load(TEMPLATE)
    data = np.asarray(template.dataobj, dtype=np.float32)
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in data.shape], indexing="ij")
    bias = np.exp(0.35 * (0.8 * grids[0] + 0.5 * grids[1] - 0.7 * grids[2] + 0.4 * grids[0] * grids[2]))
    below = data[:, :, NECK_MM // 2 : 0 : -1]
    mask = nib.load(os.path.join(BUNDLE_DIR, "atlas", "mni_icbm152_brain_mask_2mm.nii.gz"))
    brain = (
        sample_on_grid((np.asarray(mask.dataobj) > 0).astype(np.float32), mask.affine, template.affine, data.shape)
        > 0.5
    )
    brain = ndimage.binary_fill_holes(ndimage.binary_dilation(brain, iterations=2))
    neck_affine = template.affine.copy()
    neck_affine[2, 3] -= NECK_MM
    heads = {
        "bias": (data * bias, template.affine, "bias field, up to x2 across the head"),
        "contrast": (
            (data / 255) ** 1.5 * 1000 + np.abs(rng.normal(0, 25, data.shape)),
            template.affine,
            "gamma 1.5 and noise",
        ),
        "neck": (np.concatenate([below * 0.9, below * 0.8, data], 2), neck_affine, f"{NECK_MM} mm of 'neck' below"),
        "cut_top": (data[:, :, :TOP_KEPT_MM], template.affine, f"only the lowest {TOP_KEPT_MM} mm"),
        "cut_face_top": (
            data[:, :-FACE_CUT_MM, :TOP_KEPT_MM],
            template.affine,
            f"field of view cut {FACE_CUT_MM} mm into the face and above {TOP_KEPT_MM} mm",
        ),
        "tilted_far": (data, rigid([25, -10, 5], [40, -60, 80]) @ template.affine, "rotated 25 deg, 110 mm away"),
        "pitched35": (data, rigid([35, 0, 0], [0, 0, 0]) @ template.affine, "nodded 35 deg"),
        "turned40": (data, rigid([0, 0, 40], [0, 0, 0]) @ template.affine, "turned 40 deg"),
        "skull_stripped": (data * brain, template.affine, "brain only, skull and scalp removed"),
    }
    for scale in (0.88, 1.08):
        scaled = template.affine.copy()
        scaled[:3] *= scale
        heads[f"scaled{scale}"] = (data, scaled, f"head scaled x{scale}")
    axial = resampled(template, (0.5, 0.5, 5.0))
    heads["axial_5mm"] = (axial.get_fdata(dtype=np.float32), axial.affine, "clinical axial, 0.5x0.5x5 mm")
    heads["noise"] = (rng.random((160, 192, 160)).astype(np.float32) * 100, np.eye(4), "noise (must fail)")
    heads["inverted"] = (255 - data, template.affine, "inverted contrast, T2-like (must fail)")
    heads["freesurfer"] = (data, template.affine, "FreeSurfer .mgz file")
    heads = {name: head for name, head in heads.items() if names is None or name in names}
    os.makedirs(folder, exist_ok=True)
    for name, (array, affine, _) in heads.items():
        image_class = nib.MGHImage if name == "freesurfer" else nib.Nifti1Image
        nib.save(image_class(np.ascontiguousarray(array, dtype=np.float32), affine), head_file(folder, name))
    return {name: description for name, (_, _, description) in heads.items()}


def head_file(folder: str, name: str) -> str:
    """The file of the copy `name` in `folder`: `.mgz` for the FreeSurfer copy, NIfTI for the others."""
    return os.path.join(folder, f"{name}.mgz" if name == "freesurfer" else f"{name}.nii.gz")


def segment_timed(segmenter, image_file: str) -> dict:
    """The segmenter's result for one head with its `total_s`, or `failed` (the reason) and `total_s`."""
    start = time.perf_counter()
    try:
        result = segmenter(image_file)
    except ValueError as e:
        result = {"failed": str(e)}
    return {**result, "total_s": time.perf_counter() - start}


def in_template_grid(mask_file: str, name: str) -> np.ndarray:
    """A copy's mask on the template's voxel grid with its change undone (nearest neighbour in world space for
    resampled copies)."""
    mask = nib.load(mask_file)
    labels = np.asarray(mask.dataobj)
    if name in (
        "template",
        "bias",
        "contrast",
        "tilted_far",
        "pitched35",
        "turned40",
        "skull_stripped",
        "freesurfer",
    ) or name.startswith(("moved", "scaled")):
        return labels  # the template's voxels: only the header moved them
    if name == "lps":
        return labels[::-1, ::-1]
    if name == "neck":
        return labels[:, :, NECK_MM:]
    if name in ("cut_top", "cut_face_top"):
        shape = nib.load(TEMPLATE).shape
        return np.pad(labels, [(0, 0), (0, shape[1] - labels.shape[1]), (0, shape[2] - labels.shape[2])])
    template = nib.load(TEMPLATE)
    return sample_on_grid(labels, mask.affine, template.affine, template.shape, order=0)


def check(output_dir: str, config_file: str = "configs/inference.yaml", seed: int = 0) -> list[dict]:
    """Segments the template and its copies with the configured head segmenter; prints and returns one row each."""
    inputs, masks = os.path.join(output_dir, "heads"), os.path.join(output_dir, "masks")
    descriptions = make_heads(inputs, seed)
    descriptions.update(make_harder_heads(inputs, seed))
    segmenter = configured_segmenter(config_file, masks)
    rows = []
    for name, description in descriptions.items():
        rows.append({"name": name, "change": description, **segment_timed(segmenter, head_file(inputs, name))})
    reference = in_template_grid(os.path.join(masks, mask_name("template")), "template")
    _print_header("copy", "change", "Dice left / right", "eTIV cm3", STEPS_HEADER, "total s")
    for row in rows:
        if "failed" in row:
            print(f"| {row['name']} | {row['change']} | failed: {row['failed']} | | | {row['total_s']:.2f} |")
            continue
        labels = in_template_grid(os.path.join(masks, mask_name(row["name"])), row["name"])
        for side, side_labels in HEAD_LABELS.items():
            row[f"dice_{side}"] = dice(np.isin(labels, side_labels), np.isin(reference, side_labels))
        steps = " / ".join(f"{row[k]:.2f}" for k in TIME_STEPS)
        print(
            f"| {row['name']} | {row['change']} | {row['dice_left']:.3f} / {row['dice_right']:.3f} | "
            f"{row['etiv_mm3'] / 1000:.0f} | {steps} | {row['total_s']:.2f} |"
        )
    return rows


def label_sides(label_file: str, left_labels, right_labels) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Each side's hippocampus in a label image (where its values are `left_labels` / `right_labels`), and its affine."""
    image = nib.load(label_file)
    labels = np.asarray(image.dataobj)
    return {
        side: np.isin(labels, np.atleast_1d(ids).astype(int))
        for side, ids in (("left", left_labels), ("right", right_labels))
    }, image.affine


def mask_sides(left_file: str, right_file: str, threshold: float = 0.0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Each side's hippocampus from a pair of masks (where the value exceeds `threshold`), and their affine."""
    images = {side: nib.load(f) for side, f in (("left", left_file), ("right", right_file))}
    return {side: np.asarray(image.dataobj) > threshold for side, image in images.items()}, images["left"].affine


def side_dice(sides: dict, affine: np.ndarray, reference: dict, reference_affine: np.ndarray) -> dict[str, float]:
    """Dice of each side on the grid of `sides`, the reference resampled onto it (nearest neighbour, world space)."""
    return {
        side: dice(inside, _nearest_on_grid(reference[side], reference_affine, affine, inside.shape))
        for side, inside in sides.items()
    }


BORDER_COLUMNS = ("dice", "amygdala_fp_share", "anterior_mm", "posterior_mm", "tail_missed")


def border_scores(
    inside: np.ndarray,
    affine: np.ndarray,
    reference: np.ndarray,
    reference_affine: np.ndarray,
    amygdala: np.ndarray | None = None,
) -> dict[str, float]:
    """Where one side's mask departs from the reference hippocampus, on the mask's grid (the reference resampled onto
    it, nearest neighbour, world space): `dice`; `amygdala_fp_share`, the share of its false-positive voxels inside the
    reference's amygdala (nan without one); along the reference's long axis (its first principal axis in world mm,
    pointing anterior), `anterior_mm` and `posterior_mm`, how far the mask's ends (98th and 2nd percentiles) lie beyond
    the reference's (negative: short of them); `tail_missed`, the share of the reference's posterior-most fifth (of
    that length) the mask misses."""
    truth = _nearest_on_grid(reference, reference_affine, affine, inside.shape)
    scores = dict.fromkeys(BORDER_COLUMNS, float("nan"))
    scores["dice"] = dice(inside, truth)
    false_positive = inside & ~truth
    if amygdala is not None and false_positive.any():
        in_amygdala = _nearest_on_grid(amygdala, reference_affine, affine, inside.shape)
        scores["amygdala_fp_share"] = float((false_positive & in_amygdala).sum() / false_positive.sum())
    if not (truth.any() and inside.any()):
        return scores
    truth_voxels = np.argwhere(truth)
    truth_points = nib.affines.apply_affine(affine, truth_voxels)
    centre = truth_points.mean(0)
    axis = np.linalg.svd(truth_points - centre, full_matrices=False)[2][0]
    axis = axis if axis[1] >= 0 else -axis  # RAS: +y is anterior
    along_truth = (truth_points - centre) @ axis
    along_mask = (nib.affines.apply_affine(affine, np.argwhere(inside)) - centre) @ axis
    (posterior, anterior), (mask_posterior, mask_anterior) = (
        np.percentile(a, [2, 98]) for a in (along_truth, along_mask)
    )
    scores["anterior_mm"] = float(mask_anterior - anterior)
    scores["posterior_mm"] = float(posterior - mask_posterior)
    tail = truth_voxels[along_truth <= posterior + (anterior - posterior) / 5]
    scores["tail_missed"] = float(1 - inside[tuple(tail.T)].mean())
    return scores


def side_border_scores(
    sides: dict, affine: np.ndarray, reference: dict, reference_affine: np.ndarray, amygdala: dict | None = None
) -> dict[str, dict[str, float]]:
    """`border_scores` of each side."""
    return {
        side: border_scores(inside, affine, reference[side], reference_affine, amygdala and amygdala[side])
        for side, inside in sides.items()
    }


def compare(
    masks: str,
    reference: str,
    reference_suffix: str = ".nii.gz",
    left_labels=(17,),
    right_labels=(53,),
    left_suffix: str | None = None,
    right_suffix: str | None = None,
    threshold: float = 0.0,
    left_amygdala=(18,),
    right_amygdala=(54,),
) -> list[dict]:
    """Per side, `border_scores` (Dice, the share of false positives in the amygdala, the overshoot of each end, the
    missed tail) and volumes of each head mask `masks/<case>_seg.nii.gz` against a reference on the mask's grid: a
    label image `reference/<case><reference_suffix>` whose `left_labels` and `right_labels` mark the hippocampi and
    `left_amygdala` and `right_amygdala` the amygdalae (FreeSurfer's and FastSurfer's aseg: 17/53 and 18/54; DLMUSE:
    48/47 and 32/31), or, with `left_suffix` and `right_suffix`, a pair of masks `reference/<case><left_suffix>` and
    `<right_suffix>` holding the hippocampus where the value exceeds `threshold` (hippodeep's: `_mask_L.nii.gz`,
    `_mask_R.nii.gz`, 127; no amygdala)."""
    rows = []
    for folder, _, files in sorted(os.walk(masks)):
        for name in sorted(f for f in files if f.endswith(MASK_SUFFIX)):
            mask_file = os.path.join(folder, name)
            case = os.path.relpath(mask_file, masks)[: -len(MASK_SUFFIX)]
            base = os.path.join(reference, case)
            amygdala = None
            if left_suffix and right_suffix:
                if not (os.path.isfile(base + left_suffix) and os.path.isfile(base + right_suffix)):
                    continue
                truth, truth_affine = mask_sides(base + left_suffix, base + right_suffix, threshold)
            elif os.path.isfile(base + reference_suffix):
                truth, truth_affine = label_sides(base + reference_suffix, left_labels, right_labels)
                amygdala = label_sides(base + reference_suffix, left_amygdala, right_amygdala)[0]
            else:
                continue
            ours, affine = label_sides(mask_file, HEAD_LABELS["left"], HEAD_LABELS["right"])
            if not ours["right"].any():
                continue  # a crop's mask (labels 1 and 2) has no right side; a head's always has one
            scores = side_border_scores(ours, affine, truth, truth_affine, amygdala)
            voxel, truth_voxel = (abs(np.linalg.det(a[:3, :3])) for a in (affine, truth_affine))
            row = {"case": case}
            for side in ours:
                row.update({f"{key}_{side}": value for key, value in scores[side].items()})
                row.update(
                    {
                        f"{side}_mm3": float(ours[side].sum() * voxel),
                        f"{side}_reference_mm3": float(truth[side].sum() * truth_voxel),
                    }
                )
            rows.append(row)
    print(
        "| case | Dice left / right | volume left / right mm3 | reference left / right mm3 | "
        "false positives in the amygdala L / R | anterior end beyond the reference's mm L / R | "
        "posterior end beyond mm L / R | tail fifth missed L / R |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['case']} | {_pair(row, 'dice', '.3f')} | {row['left_mm3']:.0f} / {row['right_mm3']:.0f} | "
            f"{row['left_reference_mm3']:.0f} / {row['right_reference_mm3']:.0f} | "
            f"{_pair(row, 'amygdala_fp_share', '.2f')} | {_pair(row, 'anterior_mm', '+.1f')} | "
            f"{_pair(row, 'posterior_mm', '+.1f')} | {_pair(row, 'tail_missed', '.2f')} |"
        )
    if rows:
        print(
            f"mean Dice left / right: {np.mean([r['dice_left'] for r in rows]):.3f} / "
            f"{np.mean([r['dice_right'] for r in rows]):.3f} over {len(rows)} heads"
        )
        print("mean per side: " + ", ".join(f"{key} {_side_mean(rows, key):.3f}" for key in BORDER_COLUMNS))
    return rows


def _pair(row: dict, key: str, spec: str) -> str:
    """`row`'s left and right values of `key`, formatted."""
    return " / ".join(
        "n/a" if np.isnan(row[f"{key}_{side}"]) else format(row[f"{key}_{side}"], spec) for side in ("left", "right")
    )


def _side_mean(rows: list[dict], key: str) -> float:
    """The mean of `key` over both sides of `rows`, ignoring missing values."""
    values = [row[f"{key}_{side}"] for row in rows for side in ("left", "right")]
    return float(np.nanmean(values)) if not np.all(np.isnan(values)) else float("nan")


def _nearest_on_grid(inside: np.ndarray, affine: np.ndarray, target_affine: np.ndarray, shape) -> np.ndarray:
    """`inside` (a boolean image with `affine`) on the grid of `target_affine` and `shape`, nearest neighbour, computed
    only in the target box that holds it."""
    result = np.zeros(shape, dtype=bool)
    if not inside.any():
        return result
    sampled = sample_near(inside.astype(np.uint8), affine, target_affine, shape, nonzero_box(inside), margin=1, order=0)
    if sampled is not None:
        region, values = sampled
        result[region] = values > 0
    return result


# a reference's (left, right) hippocampus and (left, right) amygdala labels, by its file's suffix
REFERENCE_LABELS = {"_dlmuse.nii.gz": ((48, 47), (32, 31)), "_aseg.nii.gz": ((17, 53), (18, 54))}


def _reference_labels(labels_dir: str, case: str) -> tuple[str, tuple[int, int], tuple[int, int]] | None:
    """`labels_dir/<case>_dlmuse.nii.gz` (DLMUSE) or `<case>_aseg.nii.gz` (FreeSurfer; for a FreeSurfer `<x>_brain`,
    the subject's `<x>_aseg.nii.gz`), with its hippocampus and amygdala labels."""
    stems = [case] + ([case[: -len("_brain")]] if case.endswith("_brain") else [])
    for stem in stems:
        for suffix, (hippocampus, amygdala) in REFERENCE_LABELS.items():
            if os.path.isfile(os.path.join(labels_dir, stem + suffix)):
                return os.path.join(labels_dir, stem + suffix), hippocampus, amygdala
    return None


def real_heads(
    data_dir: str, output_dir: str, config_file: str = "configs/inference.yaml", overrides: dict | None = None
) -> list[dict]:
    """Segments the real heads of `data_dir/images` (the layout of `../shared/data/real_heads`, see its README) and
    prints, per head: Dice per side against the reference labels (`labels/`) and against hippodeep's masks
    (`hippodeep/<case>_mask_L/R.nii.gz`, > 127), hippodeep's own Dice against the reference labels, eTIV beside
    hippodeep's (`hippodeep/volumes.csv`), and the time of each step, start-up (configuration, weights) apart; then,
    per labelled side, both tools' `border_scores` against the reference. `overrides` are config ids to set."""
    import csv

    start = time.perf_counter()
    segmenter = configured_segmenter(config_file, output_dir, overrides)
    startup_s = time.perf_counter() - start
    with open(os.path.join(data_dir, "hippodeep", "volumes.csv"), newline="") as f:
        hippodeep_etiv = {row["case_file"]: float(row["etiv_mm3"]) for row in csv.DictReader(f)}
    rows = []
    for name in sorted(f for f in os.listdir(os.path.join(data_dir, "images")) if f.endswith(".nii.gz")):
        case = name[: -len(".nii.gz")]
        row = {"case": case, **segment_timed(segmenter, os.path.join(data_dir, "images", name))}
        rows.append(row)
        if "failed" in row:
            continue
        row["hippodeep_etiv_mm3"] = hippodeep_etiv.get(name, float("nan"))
        ours, affine = label_sides(os.path.join(output_dir, mask_name(case)), *HEAD_LABELS.values())
        prefix = os.path.join(data_dir, "hippodeep", case)
        theirs, their_affine = mask_sides(prefix + "_mask_L.nii.gz", prefix + "_mask_R.nii.gz", 127)
        row["vs_hippodeep"] = side_dice(ours, affine, theirs, their_affine)
        reference = _reference_labels(os.path.join(data_dir, "labels"), case)
        if reference:
            truth, truth_affine = label_sides(reference[0], *reference[1])
            amygdala = label_sides(reference[0], *reference[2])[0]
            row["borders"] = side_border_scores(ours, affine, truth, truth_affine, amygdala)
            row["hippodeep_borders"] = side_border_scores(theirs, their_affine, truth, truth_affine, amygdala)
            row["vs_reference"] = {side: scores["dice"] for side, scores in row["borders"].items()}
            row["hippodeep_vs_reference"] = {side: scores["dice"] for side, scores in row["hippodeep_borders"].items()}
    _print_real_heads(rows, startup_s)
    _print_borders(rows)
    return rows


def _print_real_heads(rows: list[dict], startup_s: float) -> None:
    def pair(scores: dict | None) -> str:
        return f"{scores['left']:.3f} / {scores['right']:.3f}" if scores else ""

    _print_header(
        "head",
        "Dice L / R vs reference",
        "vs hippodeep",
        "hippodeep vs reference",
        "eTIV / hippodeep's cm3",
        STEPS_HEADER,
        "total s",
    )
    for row in rows:
        if "failed" in row:
            print(f"| {row['case']} | failed: {row['failed']} | | | | | {row['total_s']:.1f} |")
            continue
        etiv, theirs = row["etiv_mm3"] / 1000, row["hippodeep_etiv_mm3"] / 1000
        print(
            f"| {row['case']} | {pair(row.get('vs_reference'))} | {pair(row['vs_hippodeep'])} | "
            f"{pair(row.get('hippodeep_vs_reference'))} | {etiv:.0f} / {theirs:.0f} ({100 * (etiv / theirs - 1):+.1f}%) | "
            f"{' / '.join(f'{row[k]:.1f}' for k in TIME_STEPS)} | {row['total_s']:.1f} |"
        )
    done = [row for row in rows if "failed" not in row]
    median_s = np.median([r["total_s"] for r in done]) if done else 0.0
    print(
        f"{len(done)} of {len(rows)} heads segmented; start-up {startup_s:.1f} s; median {median_s:.1f} s per head"
        if done
        else f"0 of {len(rows)} heads segmented"
    )
    for key, label in (
        ("vs_reference", "ours vs reference"),
        ("hippodeep_vs_reference", "hippodeep vs reference"),
        ("vs_hippodeep", "ours vs hippodeep"),
    ):
        scored = [row[key] for row in done if key in row]
        if scored:
            print(
                f"mean Dice left / right, {label}: {np.mean([s['left'] for s in scored]):.3f} / "
                f"{np.mean([s['right'] for s in scored]):.3f} (min {min(min(s.values()) for s in scored):.3f}, "
                f"{len(scored)} heads)"
            )


def _print_borders(rows: list[dict]) -> None:
    """Per labelled side, this bundle's and hippodeep's `border_scores` against the reference, and their means."""
    labelled = [row for row in rows if "borders" in row]
    if not labelled:
        return
    titles = (
        "Dice",
        "false positives in the amygdala",
        "anterior end beyond the reference's mm",
        "posterior end beyond mm",
        "tail fifth missed",
    )
    specs = (".3f", ".2f", "+.1f", "+.1f", ".2f")
    print("\nPer side against the reference labels, this bundle / hippodeep:\n")
    print("| head | side | " + " | ".join(titles) + " |")
    print("|---|---|" + "---|" * len(titles))

    def cells(ours: dict, theirs: dict) -> str:
        return " | ".join(
            f"{format(ours[key], spec)} / {format(theirs[key], spec)}" for key, spec in zip(BORDER_COLUMNS, specs)
        )

    for row in labelled:
        for side in ("left", "right"):
            print(f"| {row['case']} | {side} | {cells(row['borders'][side], row['hippodeep_borders'][side])} |")
    means = [
        {
            key: float(np.nanmean([row[tool][side][key] for row in labelled for side in ("left", "right")]))
            for key in BORDER_COLUMNS
        }
        for tool in ("borders", "hippodeep_borders")
    ]
    print(f"| **mean** ({2 * len(labelled)} sides) | | {cells(*means)} |")
    worst = min(row["borders"][side]["dice"] for row in labelled for side in ("left", "right"))
    print(
        "mean per side, this bundle: "
        + ", ".join(f"{key} {means[0][key]:.3f}" for key in BORDER_COLUMNS)
        + f", min dice {worst:.3f}"
    )


def beside_hippodeep(hippodeep: str, images: str, output_dir: str) -> dict[str, float]:
    """Wall time of hippodeep (`python hippodeep.py HEAD ...`, its own script, on copies of the NIfTI heads of `images`)
    and then of the README's inference command on the same heads (`--report false`), one after the other on this
    machine, each from a fresh process: start-up included, as a user meets it."""
    import shutil
    import subprocess
    import sys

    from scripts.qc.calibration import segment_folder

    heads = sorted(f for f in os.listdir(images) if f.endswith((".nii", ".nii.gz")))
    copies = os.path.join(output_dir, "hippodeep")
    os.makedirs(copies, exist_ok=True)
    for name in heads:
        shutil.copy(os.path.join(images, name), copies)
    times = {}
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, os.path.abspath(hippodeep), *heads], cwd=copies, check=True, stdout=subprocess.DEVNULL
    )
    times["hippodeep_s"] = time.perf_counter() - start
    start = time.perf_counter()
    segment_folder(images, os.path.join(output_dir, "bundle"))
    times["bundle_s"] = time.perf_counter() - start
    print(
        f"{len(heads)} heads: hippodeep {times['hippodeep_s']:.1f} s, this bundle {times['bundle_s']:.1f} s "
        f"({times['bundle_s'] / times['hippodeep_s']:.2f} times hippodeep's)"
    )
    return times


def _check_cli(output_dir: str, config_file: str = "configs/inference.yaml", seed: int = 0) -> None:
    check(output_dir, config_file, seed)  # prints the table once (fire would echo the rows again)


def _compare_cli(
    masks: str,
    reference: str,
    reference_suffix: str = ".nii.gz",
    left_labels=(17,),
    right_labels=(53,),
    left_suffix: str | None = None,
    right_suffix: str | None = None,
    threshold: float = 0.0,
    left_amygdala=(18,),
    right_amygdala=(54,),
) -> None:
    compare(
        masks,
        reference,
        reference_suffix,
        left_labels,
        right_labels,
        left_suffix,
        right_suffix,
        threshold,
        left_amygdala,
        right_amygdala,
    )


def _real_heads_cli(
    data_dir: str, output_dir: str, config_file: str = "configs/inference.yaml", overrides: dict | None = None
) -> None:
    real_heads(data_dir, output_dir, config_file, overrides)


def _beside_hippodeep_cli(hippodeep: str, images: str, output_dir: str) -> None:
    beside_hippodeep(hippodeep, images, output_dir)


if __name__ == "__main__":
    import fire

    fire.Fire(
        {
            "check": _check_cli,
            "compare": _compare_cli,
            "real_heads": _real_heads_cli,
            "beside_hippodeep": _beside_hippodeep_cli,
        }
    )
