"""BIDS inputs and BIDS-Derivatives outputs: the layout (checked by the BIDS validator), participant and session
selection, a single scan as input, volumes.tsv, and the cohort report rendered by headless Chromium."""

import csv
import glob
import json
import os
import re
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from conftest import BUNDLE_DIR
from scripts import BundleError
from tools.head_check import make_heads
from test_inference import SINGLE_MODEL, run_inference

SCANS = {
    "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz": "template",
    "sub-01/ses-2/anat/sub-01_ses-2_T1w.nii.gz": "2mm",
    "sub-02/anat/sub-02_run-1_T1w.nii.gz": "moved0",
}
MASKS = {scan: scan.replace("_T1w.nii.gz", "_desc-hippocampus_dseg.nii.gz") for scan in SCANS}


@pytest.fixture(scope="module")
def bids_dataset(tmp_path_factory):
    """Two subjects' whole heads, the first with two sessions."""
    folder = tmp_path_factory.mktemp("bids")
    heads, root = folder / "heads", folder / "rawdata"
    make_heads(str(heads))
    root.mkdir()
    (root / "dataset_description.json").write_text(json.dumps({"Name": "synthetic", "BIDSVersion": "1.10.0"}))
    for scan, head in SCANS.items():
        os.makedirs(os.path.dirname(root / scan), exist_ok=True)
        shutil.copy(heads / f"{head}.nii.gz", root / scan)
    return root


@pytest.fixture(scope="module")
def bids_run(bids_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("bids_out") / "hippocampus"
    result = run_inference(bids_dataset, out, *SINGLE_MODEL)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return out


def test_bids_input_gets_a_derivatives_layout_the_validator_accepts(bids_dataset, bids_run):
    out = bids_run
    written = sorted(
        os.path.relpath(p, out) for p in glob.glob(str(out / "**" / "*"), recursive=True) if os.path.isfile(p)
    )
    expected = {
        "dataset_description.json",
        "README",
        "desc-hippocampus_dseg.tsv",
        "volumes.tsv",
        "report.html",
        *MASKS.values(),
        *(m.replace(".nii.gz", ".json") for m in MASKS.values()),
        *(f"{m.split('/')[0]}/figures/{os.path.basename(m).replace('.nii.gz', '.png')}" for m in MASKS.values()),
    }
    assert set(written) == expected
    assert os.path.isfile(out / ".bidsignore")
    for scan, mask in MASKS.items():
        assert nib.load(str(out / mask)).shape == nib.load(str(bids_dataset / scan)).shape
        assert set(np.unique(np.asarray(nib.load(str(out / mask)).dataobj))) == {0, 1, 2, 3, 4}

    description = json.loads((out / "dataset_description.json").read_text())
    with open(os.path.join(BUNDLE_DIR, "configs", "metadata.json")) as f:
        version = json.load(f)["version"]
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"][0]["Version"] == version
    sidecar = json.loads((out / MASKS["sub-02/anat/sub-02_run-1_T1w.nii.gz"].replace(".nii.gz", ".json")).read_text())
    assert sidecar["Sources"] == ["bids:raw:sub-02/anat/sub-02_run-1_T1w.nii.gz"]
    assert sidecar["BundleVersion"] == version and sidecar["QC"] in ("pass", "review", "fail")
    assert sidecar["Registration"]["MutualInformation"] > 0.25
    with open(out / "desc-hippocampus_dseg.tsv") as f:
        look_up = list(csv.DictReader(f, delimiter="\t"))
    assert [(row["index"], row["abbreviation"]) for row in look_up] == [
        ("1", "LHA"),
        ("2", "LHP"),
        ("3", "RHA"),
        ("4", "RHP"),
    ]

    errors = validator_errors(out)
    assert not errors, errors


def validator_errors(folder):
    """The BIDS validator's errors on `folder`; without any, its exit status must be 0."""
    validator = shutil.which("bids-validator-deno", path=os.path.dirname(sys.executable))
    result = subprocess.run([validator, str(folder), "--format", "json"], capture_output=True, text=True, timeout=300)
    issues = json.loads(result.stdout)["issues"]["issues"]
    errors = [issue for issue in issues if issue["severity"] == "error"]
    assert errors or result.returncode == 0, result.stderr[-2000:]
    return errors


def test_volumes_tsv_has_participants_sessions_and_etiv_fractions(bids_run):
    with open(bids_run / "volumes.tsv", newline="") as f:
        rows = {row["case"]: row for row in csv.DictReader(f, delimiter="\t")}
    assert sorted(rows) == sorted(SCANS)
    assert [(rows[s]["participant_id"], rows[s]["session_id"]) for s in sorted(SCANS)] == [
        ("sub-01", "ses-1"),
        ("sub-01", "ses-2"),
        ("sub-02", "n/a"),
    ]
    for row in rows.values():
        for side in ("left", "right"):
            assert float(row[f"{side}_total_etiv_fraction"]) == pytest.approx(
                float(row[f"{side}_total_mm3"]) / float(row["etiv_mm3"]), rel=1e-4
            )
        assert row["qc"] in ("pass", "review", "fail")


def test_participant_and_session_labels_select_scans(bids_dataset, tmp_path):
    from scripts.inference.inputs import Inputs

    def chosen(**labels):
        return sorted(
            os.path.relpath(p, bids_dataset) for p in Inputs(str(bids_dataset), str(tmp_path), **labels).paths
        )

    assert chosen(participant_label="02") == ["sub-02/anat/sub-02_run-1_T1w.nii.gz"]
    assert chosen(participant_label="01 sub-02") == sorted(SCANS)
    assert chosen(participant_label="01", session_label="2") == ["sub-01/ses-2/anat/sub-01_ses-2_T1w.nii.gz"]
    with pytest.raises(BundleError, match="--participant_label 07"):
        Inputs(str(bids_dataset), str(tmp_path), participant_label="01 07").check()
    # through the CLI: the selected participant only, and a label that selects nothing stops with its name
    result = run_inference(
        bids_dataset, tmp_path / "out", "--participant_label", "02", "--report", "false", *SINGLE_MODEL
    )
    assert result.returncode == 0, result.stderr[-3000:]
    masks = glob.glob(str(tmp_path / "out" / "**" / "*_dseg.nii.gz"), recursive=True)
    assert [os.path.relpath(p, tmp_path / "out") for p in masks] == [MASKS["sub-02/anat/sub-02_run-1_T1w.nii.gz"]]
    result = run_inference(bids_dataset, tmp_path / "none", "--session_label", "9")
    assert result.returncode != 0 and "--session_label 9: no T1w image of that session" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_single_scan_is_an_input(synthetic_task, bids_dataset, tmp_path):
    crop = sorted(glob.glob(os.path.join(synthetic_task, "imagesTr", "*.nii.gz")))[0]
    result = run_inference(crop, tmp_path / "out", "--report", "false", *SINGLE_MODEL)
    assert result.returncode == 0, result.stderr[-3000:]
    name = os.path.basename(crop).replace(".nii.gz", "_seg.nii.gz")
    assert sorted(os.listdir(tmp_path / "out")) == [name, "volumes.csv"]
    assert nib.load(str(tmp_path / "out" / name)).shape == nib.load(crop).shape
    # a scan inside a BIDS dataset keeps its BIDS name and folder
    from scripts.inference.inputs import Inputs

    scan = str(bids_dataset / "sub-01" / "ses-2" / "anat" / "sub-01_ses-2_T1w.nii.gz")
    inputs = Inputs(scan, str(tmp_path / "bids_out"))
    assert inputs.paths == [scan]
    assert inputs.mask_path(scan) == str(tmp_path / "bids_out" / MASKS["sub-01/ses-2/anat/sub-01_ses-2_T1w.nii.gz"])


def test_bids_layout_needs_bids_names(synthetic_task, tmp_path):
    crop = sorted(glob.glob(os.path.join(synthetic_task, "imagesTr", "*.nii.gz")))[0]
    result = run_inference(crop, tmp_path / "out", "--output_layout", "bids", *SINGLE_MODEL)
    assert (
        result.returncode != 0 and "is not a BIDS T1w file name" in result.stderr and "Traceback" not in result.stderr
    )
    result = run_inference(os.path.dirname(crop), tmp_path / "out", "--participant_label", "01")
    assert result.returncode != 0 and "select in a BIDS dataset" in result.stderr


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# appended to a copy of the report: where the flagged case's row and the plots are, once the page has rendered
MEASURE = """<script>window.addEventListener("load", () => {
  const box = (e) => { const r = e.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom].map(Math.round); };
  const rows = [...document.querySelectorAll("#review tr.review")];
  document.body.insertAdjacentHTML("beforeend", "<pre id='measured'>" + JSON.stringify({
    flagged: rows.map((r) => [r.cells[0].textContent, box(r), r.querySelector("img").naturalWidth]),
    plots: [...document.querySelectorAll(".plots svg")].map(box)}) + "</pre>");
});</script>"""


def chromium(*args):
    return subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1280,1600",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium (Debian's package, installed by .ci/run): the report is not rendered"
)
def test_report_shows_the_flagged_case_first_and_both_plots(bids_dataset, bids_run, tmp_path):
    """The run's own table with one case marked for review and one failure, rendered by Chromium: the flagged row,
    its picture, and both plots with the flagged case in red are on the screen."""
    from PIL import Image

    from scripts.inference.report import FLAGGED_COLOUR, OK_COLOUR, write_report

    from scripts.qc.check import CaseRow

    with open(bids_run / "volumes.tsv", newline="") as f:
        rows = [
            CaseRow.from_columns({k: "" if v == "n/a" else v for k, v in row.items()})
            for row in csv.DictReader(f, delimiter="\t")
        ]
    for row in rows:
        row.qc, row.reasons = "pass", []
    flagged = rows[1].case
    rows[1].qc, rows[1].reasons = "review", ["left anterior 900 mm3 outside 1000-2400"]
    from scripts.inference.inputs import Inputs

    inputs = Inputs(str(bids_dataset), str(bids_run))
    pictures = {inputs.case(path): inputs.qc_png_path(path) for path in inputs.paths}
    assert sorted(pictures) == sorted(row.case for row in rows) and all(map(os.path.isfile, pictures.values()))
    report = tmp_path / "report.html"
    write_report(str(report), rows, [("sub-03/anat/sub-03_T1w.nii.gz", "ValueError: noise")], pictures, "test")
    page = report.read_text()
    assert not re.search(
        r"(src|href)=[\"']?https?:|url\((?!#)|@import", page
    )  # nothing to fetch: one self-contained file
    measured = tmp_path / "measured.html"
    measured.write_text(page.replace("</body>", MEASURE + "</body>"))
    dom = chromium("--virtual-time-budget=5000", "--dump-dom", f"file://{measured}").stdout
    layout = json.loads(re.search(r"<pre id=\"measured\">(.*?)</pre>", dom).group(1))
    ((name, (left, top, right, bottom), picture_width),) = layout["flagged"]
    assert name == flagged and picture_width > 100
    assert len(layout["plots"]) == 2
    shot = tmp_path / "shot.png"
    chromium(f"--screenshot={shot}", f"file://{measured}")
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)

    def pixels_of(box, colour, tolerance=60):
        l, t, r, b = box
        rgb = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])
        return int((np.abs(pixels[t:b, l:r] - rgb).sum(-1) < tolerance).sum())

    assert bottom < pixels.shape[0], "the flagged row is below the first screen"
    row_area = (right - left) * (bottom - top)
    assert pixels_of((left, top, right, bottom), "#fde2e1", tolerance=12) > 0.3 * row_area  # the review row's colour
    for plot in layout["plots"]:  # the markers of the cases, the flagged one in red
        assert pixels_of(plot, OK_COLOUR) > 20 and pixels_of(plot, FLAGGED_COLOUR) > 20
