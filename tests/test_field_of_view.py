"""Heads whose field of view cuts the brain, through the command line: the cut named in QC, the eTIV withheld
(never a wrong number, never 0), the hippocampi still segmented where their boxes are covered."""

import nibabel as nib
import numpy as np
import pytest
import yaml

from conftest import BUNDLE_DIR
from scripts.imaging import sample_on_grid
from test_heads import read_volumes
from test_inference import run_inference
from tools.field_of_view import cut
from tools.head_check import TEMPLATE, dice

# the template cut at its top, at its left side (its left hippocampus's box still inside) and to a 70 mm slab:
# (face, amount), the face QC names
CUTS = {"top20": (("top", 0.2), "its top"), "left12": (("left", 0.12), "its left"), "slab70": (("slab", 70), "its top")}


@pytest.fixture(scope="module")
def cut_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("field_of_view")
    inputs = folder / "in"
    inputs.mkdir()
    template = nib.load(TEMPLATE)
    data = np.asarray(template.dataobj, dtype=np.float32)
    nib.save(nib.Nifti1Image(data, template.affine), str(inputs / "full.nii.gz"))
    with open(f"{BUNDLE_DIR}/configs/inference.yaml") as f:
        centres = yaml.safe_load(f)["head"]["box_centers"]
    hippocampi = np.zeros(data.shape, np.uint8)  # the slab is centred on the hippocampi
    for centre in centres.values():
        hippocampi[tuple(np.rint(nib.affines.apply_affine(np.linalg.inv(template.affine), centre)).astype(int))] = 1
    for name, (where, _) in CUTS.items():
        nib.save(nib.Nifti1Image(*cut(data, template.affine, *where, hippocampi)), str(inputs / f"{name}.nii.gz"))
    result = run_inference(inputs, folder / "out")
    return folder / "out", result, result.stdout + result.stderr


def _in_template_grid(mask_file):
    mask = nib.load(mask_file)
    template = nib.load(TEMPLATE)
    return sample_on_grid(np.asarray(mask.dataobj), mask.affine, template.affine, template.shape, order=0)


def test_cut_fields_of_view_are_named_and_their_etiv_withheld(cut_run):
    output, result, log = cut_run
    assert result.returncode == 0, log[-3000:]
    assert "Traceback" not in log
    rows = read_volumes(output)
    assert "field of view" not in rows["full.nii.gz"]["qc_reasons"]
    assert float(rows["full.nii.gz"]["etiv_mm3"]) > 1_000_000
    for name, (_, face) in CUTS.items():
        row = rows[f"{name}.nii.gz"]
        assert f"the field of view cuts the brain at {face}" in row["qc_reasons"], (name, row["qc_reasons"])
        assert "eTIV withheld" in row["qc_reasons"] and row["qc"] != "pass"
        assert row["etiv_mm3"] == "", (name, row["etiv_mm3"])
        assert float(row["left_total_mm3"]) > 2000 and float(row["right_total_mm3"]) > 2000
    assert "eTIV withheld" in (output / "report.html").read_text()


def test_cut_heads_masks_match_the_full_heads_where_the_boxes_are_covered(cut_run):
    output, _, log = cut_run
    full = _in_template_grid(str(output / "full_seg.nii.gz"))
    for name in CUTS:
        labels = _in_template_grid(str(output / f"{name}_seg.nii.gz"))
        for side_labels in ([1, 2], [3, 4]):
            score = dice(np.isin(labels, side_labels), np.isin(full, side_labels))
            assert score >= 0.9, (name, side_labels, score, log[-2000:])
