"""The BIDS App (`scripts.inference.bids_app`) and the image (Dockerfile): participant jobs at once into one output
folder, then the group level, against one BIDS run of the command line; wrong calls; the docs' Docker commands run as
written, as a cluster runs them (read-only, any uid, no network), where a Docker daemon and the image's base are here
(tests/services/docker_image.sh); and the documented SLURM job array, where a SLURM node is idle
(tests/services/slurm_node.sh). .ci/run runs both set-ups."""

import csv
import filecmp
import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest

from conftest import BUNDLE_DIR, REPO_DIR, template_crop
from scripts import atomic_write
from scripts.inference.bids import participant_table
from scripts.inference.tables import write_table
from scripts.labels import PARTS, SIDES
from scripts.qc.calibration import dice
from scripts.qc.check import CaseRow
from test_bids import validator_errors
from test_documented_commands import fenced_commands
from test_inference import run_inference
from tools.head_check import make_heads

SCANS = {"01": "template", "02": "moved0"}  # participant: the head it has
MASK = "sub-{0}/anat/sub-{0}_desc-hippocampus_dseg.nii.gz"
IMAGE = "vnet-hippocampus"
STAND_IN_BASE = "vnet-base:bookworm"  # tests/services/docker_image.sh's, where no registry is reachable
DOCS = ("README.md", "bundle/docs/README.md")
ANY_UID = "12345:12345"


def app(*args):
    """The BIDS App's command line, started."""
    return subprocess.Popen(
        [sys.executable, "-m", "scripts.inference.bids_app", *map(str, args)],
        cwd=BUNDLE_DIR,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finished(process, timeout=300):
    log, _ = process.communicate(timeout=timeout)
    return process.returncode, log


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A BIDS dataset of two participants' whole heads, and a plain folder of a crop and a head."""
    root = tmp_path_factory.mktemp("bids_app")
    make_heads(str(root / "heads"))
    bids = root / "rawdata"
    for subject, head in SCANS.items():
        (bids / f"sub-{subject}" / "anat").mkdir(parents=True)
        shutil.copy(root / "heads" / f"{head}.nii.gz", bids / f"sub-{subject}" / "anat" / f"sub-{subject}_T1w.nii.gz")
    (bids / "dataset_description.json").write_text(json.dumps({"Name": "synthetic", "BIDSVersion": "1.10.0"}))
    scans = root / "scans"
    scans.mkdir()
    nib.save(nib.Nifti1Image(template_crop(), np.eye(4)), str(scans / "crop.nii.gz"))
    shutil.copy(root / "heads" / "template.nii.gz", scans / "head.nii.gz")
    return {"root": root, "bids": bids, "scans": scans}


def cli_run(source, out):
    result = run_inference(source, out)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return out


@pytest.fixture(scope="module")
def command_line(data):
    """One BIDS run of the command line."""
    return cli_run(data["bids"], data["root"] / "cli_bids")


@pytest.fixture(scope="module")
def app_run(data):
    """Both participants' jobs at once into one folder, then the group level."""
    out = data["root"] / "app"
    jobs = [app(data["bids"], out, "participant", "--participant_label", subject) for subject in SCANS]
    logs = [finished(job) for job in jobs]
    for status, log in logs:
        assert status == 0, log[-4000:]
    before_group = {path: os.stat(path).st_mtime_ns for path in glob.glob(str(out / "sub-*" / "anat" / "*.nii.gz"))}
    status, log = finished(app(data["bids"], out, "group"))
    assert status == 0, log[-4000:]
    return {"out": out, "before_group": before_group, "logs": [log for _, log in logs]}


def tsv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def test_participant_jobs_at_once_then_group_equal_one_command_line_run(data, command_line, app_run):
    out, cli = app_run["out"], command_line
    for subject in SCANS:
        assert filecmp.cmp(out / MASK.format(subject), cli / MASK.format(subject), shallow=False)
        sidecar = MASK.format(subject).replace(".nii.gz", ".json")
        assert json.loads((out / sidecar).read_text()) == json.loads((cli / sidecar).read_text())
        assert len(tsv(out / f"sub-{subject}" / f"sub-{subject}_desc-hippocampus_volumes.tsv")) == 1
    # each job wrote its participant's table; the group wrote the cohort's, byte for byte the command line's
    assert all(
        f"volumes in sub-{s}/sub-{s}_desc-hippocampus_volumes.tsv" in log for s, log in zip(SCANS, app_run["logs"])
    )
    assert (out / "volumes.tsv").read_bytes() == (cli / "volumes.tsv").read_bytes()
    for name in ("dataset_description.json", "README", ".bidsignore", "desc-hippocampus_dseg.tsv"):
        assert (out / name).read_bytes() == (cli / name).read_bytes(), name
    report = (out / "report.html").read_text()
    assert all(f"sub-{s}_T1w" in report for s in SCANS)
    # the group segments nothing: the masks stand as the participant jobs wrote them
    assert {p: os.stat(p).st_mtime_ns for p in app_run["before_group"]} == app_run["before_group"]
    assert not glob.glob(str(out / "**" / "*.tmp"), recursive=True)
    assert not validator_errors(out)


def test_group_names_the_participants_without_output(data, app_run, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(app_run["out"], partial, ignore=shutil.ignore_patterns("sub-02", "volumes.tsv", "report.html"))
    status, log = finished(app(data["bids"], partial, "group"))
    assert status == 1 and "sub-02_T1w.nii.gz: no mask from the participant level" in log, log[-3000:]
    assert [row["participant_id"] for row in tsv(partial / "volumes.tsv")] == ["sub-01"]
    assert "sub-02" in (partial / "report.html").read_text()


def test_the_group_flags_the_cohorts_outliers_as_one_run_does(tmp_path):
    """21 participants' tables (no segmentation): the group flags the one whose left hippocampus is 60% larger, in
    volumes.tsv and in its mask's sidecar, as a command-line run of them would (scripts.qc.check's cohort rule)."""
    bids, out = tmp_path / "bids", tmp_path / "out"
    (bids).mkdir()
    (bids / "dataset_description.json").write_text(json.dumps({"Name": "cohort", "BIDSVersion": "1.10.0"}))
    rng = np.random.default_rng(0)
    for i in range(21):
        subject = f"{i:02d}"
        scan = bids / f"sub-{subject}" / "anat" / f"sub-{subject}_T1w.nii.gz"
        mask = out / MASK.format(subject)
        for path in (scan, mask):
            path.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), str(path))
        mask.with_suffix("").with_suffix(".json").write_text(json.dumps({"QC": "pass", "QCReasons": []}))
        volumes = {f"{side} {part}": 1700 + 50 * rng.standard_normal() for side in SIDES for part in PARTS}
        if i == 20:
            volumes = {name: value * (1.6 if name.startswith("left") else 1) for name, value in volumes.items()}
        row = CaseRow(case=os.path.relpath(scan, bids), kind="head", volumes=volumes, etiv_mm3=1.5e6)
        write_table(participant_table(str(out), subject), [row], bids=True)
    status, log = finished(app(bids, out, "group", "--report", "false"))
    assert status == 0, log[-3000:]
    flagged = {row["participant_id"]: row["qc_reasons"] for row in tsv(out / "volumes.tsv") if row["qc"] != "pass"}
    assert list(flagged) == ["sub-20"] and "cohort outlier" in flagged["sub-20"]
    sidecar = json.loads((out / MASK.format("20")).with_suffix("").with_suffix(".json").read_text())
    assert sidecar["QC"] == "review" and "cohort outlier" in sidecar["QCReasons"][-1]


@pytest.mark.parametrize(
    "call, problem",
    [
        (("{scans}", "{out}", "participant"), "is not a BIDS dataset: it has no dataset_description.json"),
        (("{bids}", "{out}", "participant", "--participant_label", "07"), "--participant_label 07: no T1w image"),
        (("{bids}", "{out}", "group"), "does not exist: run the participant level into it first"),
        (("{bids}", "{out}", "participant", "--no_such_option", "1"), "unrecognized argument --no_such_option"),
        (("{bids}", "{out}"), "the following arguments are required: analysis_level"),
    ],
    ids=["not BIDS", "unknown label", "group first", "unknown option", "no level"],
)
def test_a_wrong_call_is_one_line_that_names_it(data, tmp_path, call, problem):
    words = [word.format(out=tmp_path / "out", **data) for word in call]
    status, log = finished(app(*words), timeout=120)
    assert status != 0 and log.strip().count("\n") == 0 and problem in log, log
    assert not os.path.exists(tmp_path / "out")


def test_version_and_help():
    with open(os.path.join(BUNDLE_DIR, "configs", "metadata.json")) as f:
        metadata = json.load(f)
    status, log = finished(app("--version"))
    assert status == 0 and log.strip() == f"{metadata['name']} {metadata['version']}"
    status, log = finished(app("--help"))
    assert status == 0 and "{participant,group}" in log and "--participant_label" in log


def test_dataset_files_are_written_once(tmp_path):
    for text in ("first", "second"):
        with atomic_write(str(tmp_path / "file"), "w", exclusive=True) as f:
            f.write(text)
    assert (tmp_path / "file").read_text() == "first" and os.listdir(tmp_path) == ["file"]


# --- the image: the docs' Docker commands, as written -------------------------------------------------------------


def docker_commands():
    """The Docker commands of README.md and the card (the same ones, in the same order)."""
    found = [
        [c for c in fenced_commands(open(os.path.join(REPO_DIR, doc)).read()) if c.startswith("docker ")]
        for doc in DOCS
    ]
    assert found[0] == found[1] and found[0], found
    return found[0]


def daemon_and_base():
    """Why the image cannot be built and run here, or None."""
    if not shutil.which("docker") or subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        return "no Docker daemon here (tests/services/docker_image.sh, a step of .ci/run, starts one)"
    if subprocess.run(["docker", "image", "inspect", STAND_IN_BASE], capture_output=True).returncode != 0:
        return (
            f"no base image: no registry is reachable, and {STAND_IN_BASE} (tests/services/docker_image.sh) is absent"
        )
    return None


def concrete(command, places):
    """The command with the docs' placeholders filled in (`IN:/data/in` too, and the user's ids with another uid's);
    the build gets the stand-in base, through the Dockerfile's one build argument, and the host's network."""
    words = []
    for word in shlex.split(command):
        name, colon, rest = word.partition(":")
        words.append(places["UID"] if word == "$(id -u):$(id -g)" else places.get(name, name) + colon + rest)
    if words[:2] == ["docker", "build"]:
        words[2:2] = ["--network", "host", "--build-arg", f"BASE_IMAGE={STAND_IN_BASE}"]
    return words


@pytest.fixture(scope="module")
def image_runs(data):
    """The docs' Docker commands run in order (a build, a folder, participant jobs at once, the group)."""
    reason = daemon_and_base()
    if reason:
        pytest.skip(reason)
    places = {"IN": str(data["scans"]), "BIDS": str(data["bids"]), "UID": ANY_UID}
    for name in ("OUT", "DERIVATIVES"):
        places[name] = str(data["root"] / f"image_{name.lower()}")
        os.makedirs(places[name])
        os.chmod(places[name], 0o777)  # the uid the container runs as writes there

    def inputs():  # every file and folder of the inputs, with its modification time
        return {p: os.stat(p).st_mtime_ns for n in ("IN", "BIDS") for p in glob.glob(f"{places[n]}/**", recursive=True)}

    before = inputs()
    logs, pending = [], []
    for command in docker_commands() + [None]:
        if command is None or " participant " not in command:  # participant jobs run at once; the rest in turn
            for waited, job in pending:
                status, log = finished(job, timeout=900)
                assert status == 0, f"{waited}\n{log[-4000:]}"
                logs.append((waited, log))
            pending = []
        if command is not None:
            words = concrete(command, places)
            job = subprocess.Popen(words, cwd=REPO_DIR, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            pending.append((command, job))
    assert not pending
    assert inputs() == before
    return {"places": places, "logs": logs}


def dice_per_label(a, b):
    a, b = (np.asarray(nib.load(str(path)).dataobj) for path in (a, b))
    return {label: dice(a == label, b == label) for label in np.unique(b) if label}


def test_the_image_segments_a_folder_as_the_command_line_does(data, image_runs):
    cli = cli_run(data["scans"], data["root"] / "cli_folder")
    held = subprocess.run(
        ["docker", "run", "--rm", "--entrypoint", "ls", IMAGE, "/opt/vnet/bundle"], capture_output=True
    )
    assert held.stdout.decode().split() == [
        "LICENSE",
        "atlas",
        "configs",
        "docs",
        "large_files.yml",
        "models",
        "scripts",
    ]
    out = image_runs["places"]["OUT"]
    for case in ("crop", "head"):
        written = os.path.join(out, f"{case}_seg.nii.gz")
        assert os.stat(written).st_uid == int(ANY_UID.split(":")[0])
        # the same torch release (its CUDA build, on the CPU) and bf16 where the CPU has it: identical here
        assert min(dice_per_label(written, cli / f"{case}_seg.nii.gz").values()) >= 0.999


def test_the_image_as_a_bids_app_equals_the_command_line(data, command_line, image_runs):
    out, cli = image_runs["places"]["DERIVATIVES"], command_line
    for subject in SCANS:
        assert (
            min(dice_per_label(os.path.join(out, MASK.format(subject)), cli / MASK.format(subject)).values()) >= 0.999
        )
    # the volumes within 0.1%: the same code's bf16 box volumes moved by 1 mm3 on one of the 9 dev heads when run from
    # another folder, so byte equality is the host's test (test_participant_jobs_at_once_then_group_...)
    image_rows, cli_rows = tsv(os.path.join(out, "volumes.tsv")), tsv(cli / "volumes.tsv")
    assert [row["case"] for row in image_rows] == [row["case"] for row in cli_rows]
    for image_row, cli_row in zip(image_rows, cli_rows):
        assert image_row.keys() == cli_row.keys() and image_row["qc"] == cli_row["qc"]
        for key in (key for key in cli_row if key.endswith("_mm3")):
            assert float(image_row[key]) == pytest.approx(float(cli_row[key]), rel=1e-3), key
    assert os.path.getsize(os.path.join(out, "report.html")) > 0 and not validator_errors(out)
    owners = {os.stat(p).st_uid for p in glob.glob(os.path.join(out, "**", "*"), recursive=True)}
    assert owners == {int(ANY_UID.split(":")[0])}


# --- a cluster: the documented SLURM job array against a one-node SLURM ------------------------------------------


def test_the_slurm_job_array_then_group_equal_one_command_line_run(data, command_line):
    if (
        not shutil.which("sinfo")
        or "idle" not in subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True).stdout
    ):
        pytest.skip("no idle SLURM node here (tests/services/slurm_node.sh, a step of .ci/run, starts a one-node one)")
    with open(os.path.join(BUNDLE_DIR, "docs", "usage.md")) as f:
        (command,) = [c for c in fenced_commands(f.read()) if "slurm_bids_app.sh" in c]
    out = data["root"] / "slurm"
    words = [{"BIDS": str(data["bids"]), "OUT": str(out)}.get(word, word) for word in shlex.split(command)]
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])  # the tasks' python
    result = subprocess.run(words, cwd=BUNDLE_DIR, capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = re.search(r"array (\d+) .*group job (\d+)", result.stdout).groups()
    for _ in range(600):
        if not subprocess.run(["squeue", "-h", "-j", ",".join(jobs)], capture_output=True, text=True).stdout.strip():
            break
        time.sleep(1)
    logs = "".join(open(p).read() for p in sorted(glob.glob(str(out / "logs" / "*.log"))))
    assert sorted(os.listdir(out / "logs")) == ["group.log", "participant_0.log", "participant_1.log"], logs[-3000:]
    assert (out / "volumes.tsv").read_bytes() == (command_line / "volumes.tsv").read_bytes(), logs[-3000:]
    assert all(f"volumes in sub-{s}/sub-{s}_desc-hippocampus_volumes.tsv" in logs for s in SCANS)
