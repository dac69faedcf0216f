"""Every command written in README.md, the model card bundle/docs/README.md, the other bundle/docs/*.md files and the
config headers runs as written, in document order, on a copy of the bundle: placeholders (D, IN, OUT, N, ...) become
synthetic data, and training runs are cut to one epoch through the command line. Commands that cannot run here are
listed in NOT_RUN with the reason."""

import csv
import glob
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from conftest import BUNDLE_DIR, REPO_DIR, files_under

DOCS = (
    "README.md",
    "bundle/docs/README.md",  # the card, then the files it links to
    *sorted(
        os.path.relpath(doc, REPO_DIR)
        for doc in glob.glob(os.path.join(REPO_DIR, "bundle", "docs", "*.md"))
        if os.path.basename(doc) != "README.md"
    ),
)
NOT_RUN = {
    "cd bundle": "every command runs in (a copy of) the bundle folder",
    "bash demo.sh": "the set-up-and-run command itself: it installs the environment these tests run in",
    ".venv/bin/python -m pytest tests": "the test command itself",
    "python -m scripts.data.download": "needs the internet (MSD download)",
    "docker": "run by tests/test_bids_app.py, in order, as written, where a Docker daemon runs",
    "apptainer": "Apptainer cannot be installed here (documented as untested)",
    "slurm_bids_app.sh": "run by tests/test_bids_app.py against a one-node SLURM, where one runs",
    "--source github": "needs the internet (GitHub release)",
    "--nnodes=2": "needs two machines",
    "tools.head_check check": "a measurement: segments 25 whole heads (minutes); tests/test_heads.py checks its parts",
    "tools.failure_set": "a measurement on the real dev heads (150 heads, about 15 minutes); tests/test_failure_set.py "
    "checks its copies",
    "tools.repeatability": "a measurement on the real dev heads (72 heads, 2 minutes); tests/test_repeatability.py "
    "checks its copies",
    "tools.check_pins": "asks the package index (the network) which Python versions each pin installs on",
    "tests/clients/setup_monailabel.sh": "builds MONAI Label's own environment (8.2 GB, minutes)",
    "tests/clients/monailabel_infer.py": "runs in MONAI Label's environment: tests/test_clients.py runs it where that exists",
}
# shortened through the command line: flag -> value (replaced where the command sets it, else appended)
SHORTER = {
    "monai.bundle run training": {"--epochs": "1"},
    "scripts.engine.benchmark": {"--warmup_steps": "1", "--steps": "2", "--batch_size": "2"},
    "scripts.qc robustness": {"--cases": "2", "--degradations": "clean,2mm,5mm_slices_z,5mm_slabs_nearest_z"},
    "scripts.qc folds": {"--degradations": "5mm_slices_z"},
    "tools.report_timing": {"--cases": "3"},
}
# shortened through the environment
SHORTER_ENV = {
    "scripts/engine/gpu_benchmark.sh": {
        "STEPS": "2",
        "WARMUP": "1",
        "EPOCHS": "0",
        "BATCH": "2",
        "WORKERS": "0",
        "RECIPES": "native",
    }
}


def fenced_commands(text):
    """Shell commands of the fenced code blocks, continuation lines joined, comments dropped."""
    commands, inside, pending = [], False, ""
    for line in text.splitlines():
        if line.startswith("```"):
            inside = not inside
            continue
        if not inside:
            continue
        pending += re.split(r"(?:^|\s)#\s", line)[0].rstrip()  # a comment line, or a comment after a command
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        words = shlex.split(pending)
        if words:
            commands.append(shlex.join(words))
        pending = ""
    return commands


def header_commands(text):
    """Commands in a config's header comment: lines `#   python ...` / `#   torchrun ...` and their continuations."""
    commands, pending = [], None
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        body = line[1:].strip()
        if pending is None and not body.startswith(("python ", "torchrun ")):
            continue
        pending = (pending or "") + body
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        commands.append(shlex.join(shlex.split(pending)))
        pending = None
    return commands


def documented_commands():
    found = []
    for doc in DOCS:
        with open(os.path.join(REPO_DIR, doc), encoding="utf-8") as f:
            found += [(doc, command) for command in fenced_commands(f.read())]
    for config in sorted(glob.glob(os.path.join(BUNDLE_DIR, "configs", "*.yaml"))):
        with open(config, encoding="utf-8") as f:
            found += [(f"configs/{os.path.basename(config)}", c) for c in header_commands(f.read())]
    unique = {}
    for where, command in found:
        unique.setdefault(same_run(command), (where, command))
    return list(unique.values())


# placeholders that the tests fill with the same data: commands that differ only in these run once
SAME_DATA = {"/data/Task04_Hippocampus": "D", "DATASET_DIR": "D"}


def same_run(command):
    return shlex.join(SAME_DATA.get(word, word) for word in shlex.split(command))


COMMANDS = documented_commands()


def test_the_docs_hold_the_commands_users_need():
    text = "\n".join(command for _, command in COMMANDS)
    for needed in (
        "run training",
        "--resume true",
        "run evaluating",
        "multi_gpu_train.yaml",
        "multi_gpu_evaluate.yaml",
        "multi_gpu_inference.yaml",
        "inference_tf.yaml",
        "inference_ts.yaml",
        "ckpt_export",
        "onnx_export",
        "verify_net_in_out",
        "verify_metadata",
        "tools.package",
        "monai.bundle download --name",
    ):
        assert needed in text, needed


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, synthetic_task):
    root = tmp_path_factory.mktemp("documented")
    bundle = root / "bundle"
    shutil.copytree(BUNDLE_DIR, bundle, ignore=shutil.ignore_patterns("__pycache__", "output", "eval", "dist"))
    scans = root / "scans"  # two labelled cases, so that an overlay can draw label and mask of one
    scans.mkdir()
    for image in sorted(glob.glob(os.path.join(synthetic_task, "imagesTr", "*.nii.gz")))[:2]:
        shutil.copy(image, scans)
    bids = root / "bids" / "sub-01" / "anat"
    bids.mkdir(parents=True)
    shutil.copy(sorted(glob.glob(str(scans / "*.nii.gz")))[0], bids / "sub-01_T1w.nii.gz")
    (root / "bids" / "dataset_description.json").write_text(json.dumps({"Name": "synthetic", "BIDSVersion": "1.10.0"}))
    schema = os.path.join(REPO_DIR, "..", "shared", "monai", "meta_schema_20240725.json")
    (root / "schema").mkdir()
    if os.path.isfile(schema):
        shutil.copy(schema, root / "schema")
    return {
        "root": root,
        "bundle": bundle,
        "task": synthetic_task,
        "scans": scans,
        "outputs": [],
        "case": os.path.basename(sorted(glob.glob(str(scans / "*.nii.gz")))[0])[: -len(".nii.gz")],
        "zip": None,
        "schema": os.path.isfile(schema),
    }


def placeholders(ws, out):
    return {
        "/data/Task04_Hippocampus": ws["task"],
        "D": ws["task"],
        "IN": str(ws["scans"]),
        "COHORT": str(ws["scans"]),
        "BIDS": str(ws["root"] / "bids"),
        "OUT": out,
        "SCHEMA_DIR": str(ws["root"] / "schema"),
        "/path/to/the.zip": str(ws["zip"]),
        "OUT_DIR": str(ws["root"] / "gpu_benchmark"),
        "DATASET_DIR": ws["task"],
    }


def concrete(command, ws, out):
    """The command's words with placeholders filled in and runs shortened."""
    words = shlex.split(command)
    names = placeholders(ws, out)
    filled = []
    for word in words:
        for name, value in names.items():
            if word == name or word.startswith(name + "/"):
                word = value + word[len(name) :]
                break
            if word.startswith("file://" + name):
                word = "file://" + value
        word = word.replace("=N", "=2").replace("CASE", ws["case"])
        filled.append(word)
    for pattern, flags in SHORTER.items():
        if pattern in command:
            for flag, value in flags.items():
                if flag in filled:
                    filled[filled.index(flag) + 1] = value
                else:
                    filled += [flag, value]
    if "--resume" in filled:
        filled[filled.index("--epochs") + 1] = "2"  # one epoch more than the run it resumes
    program = {
        "python": [sys.executable],
        "torchrun": [sys.executable, "-m", "torch.distributed.run"],
        "bash": ["bash"],
    }
    return program[filled[0]] + filled[1:]


@pytest.mark.parametrize("where, command", COMMANDS, ids=[f"{w}: {c[:60]}" for w, c in COMMANDS])
def test_documented_command_runs(where, command, workspace):
    skip = next((reason for key, reason in NOT_RUN.items() if key in command), None)
    if skip:
        pytest.skip(skip)
    if "verify_metadata" in command and not workspace["schema"]:
        pytest.skip("../shared/monai/meta_schema_20240725.json is absent (verify_metadata would download it)")
    writes_masks = ("monai.bundle run" in command and "inference" in command) or (
        "bids_app" in command and " participant" in command
    )
    out = (
        str(workspace["root"] / f"out{len(workspace['outputs'])}")
        if writes_masks or not workspace["outputs"]
        else workspace["outputs"][-1]
    )
    if writes_masks:
        workspace["outputs"].append(out)
    words = concrete(command, workspace, out)
    before = files_under(workspace["bundle"] / "models", workspace["bundle"] / "output")
    env = dict(
        os.environ,
        PYTHONPATH=str(workspace["bundle"]),
        PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
    )  # `python` in a shell script is this one
    for pattern, variables in SHORTER_ENV.items():
        if pattern in command:
            env.update(variables)
    result = subprocess.run(words, cwd=workspace["bundle"], capture_output=True, text=True, timeout=600, env=env)
    log = result.stdout + result.stderr
    assert result.returncode == 0, f"{where}: {shlex.join(words)}\n{log[-4000:]}"
    if writes_masks:
        assert glob.glob(os.path.join(out, "**", "*seg.nii.gz"), recursive=True) and "0 failed" in log, log[-2000:]
        assert os.path.isfile(os.path.join(out, "report.html")) or "--report false" in command or "bids_app" in command
    if "bids_app" in command and " group" in command:
        assert os.path.isfile(os.path.join(out, "volumes.tsv")) and os.path.isfile(os.path.join(out, "report.html"))
    if "run training" in command:
        assert re.search(r"Epoch: \d+/\d+, Iter: \d+/\d+ -- train_loss", log), log[-2000:]
    if "scripts.data.check_dataset" in command:
        assert re.search(r"all \d+ cases OK", result.stdout), log[-2000:]
    if "run evaluating" in command:
        assert "Evaluation of" in log, log[-2000:]
    if "scripts.engine.benchmark" in command or "gpu_benchmark.sh" in command:
        check_benchmark_results(command, words, workspace, log, before)
    if "scripts.qc robustness" in command:
        with open(os.path.join(out, "robustness.csv"), newline="") as f:
            table = list(csv.DictReader(f))
        assert [row["degradation"] for row in table] == SHORTER["scripts.qc robustness"]["--degradations"].split(",")
        assert all(0 <= float(row["dice_posterior"]) <= 1 for row in table) and "5mm_slices_z" in result.stdout
    if "tools.report_timing" in command:
        assert os.path.getsize(os.path.join(out, "report.html")) > 0 and "pictures_s" in result.stdout
    if "tools.package" in command:
        workspace["zip"] = result.stdout.strip().splitlines()[-1]


def check_benchmark_results(command, words, ws, log, before):
    """The benchmark's JSON records (no speed asserted), and nothing written into the bundle."""
    if "gpu_benchmark.sh" in command:
        out = words[words.index("scripts/engine/gpu_benchmark.sh") + 1]
        results = {
            mode: json.load(open(os.path.join(out, f"native_{mode}_workers0.json"))) for mode in ("train", "predict")
        }
        assert "| native | train | 0 |" in log, log[-2000:]  # its full training: the training commands above
    else:
        results = {"train": json.load(open(ws["bundle"] / words[words.index("--output_json") + 1]))}
        assert (
            "efficiency (pipeline / model only)" in log
            and files_under(ws["bundle"] / "models", ws["bundle"] / "output") == before
        )
    for mode, result in results.items():
        assert result["mode"] == mode and result["steps"] == 2 and result["warmup_steps"] == 1
        for key in (
            "pipeline_img_per_s",
            "model_only_img_per_s",
            "efficiency",
            "pipeline_ms_per_step",
            "model_only_channels_last_img_per_s",
            "model_only_contiguous_img_per_s",
        ):
            assert isinstance(result[key], float) and math.isfinite(result[key]) and result[key] > 0, key
        assert result["efficiency"] == pytest.approx(result["pipeline_img_per_s"] / result["model_only_img_per_s"])
        assert 0 < result["pipeline_data_ms_per_step"] < result["pipeline_ms_per_step"]
        # the config's layout (channels-last) is the efficiency's; the other one is timed apart
        assert result["channels_last"] is True
        assert result["model_only_img_per_s"] == result["model_only_channels_last_img_per_s"]
        latencies = [result.get(key) for key in ("latency_ms_p50", "latency_ms_p90", "latency_ms_p99")]
        assert (
            (latencies == sorted(latencies) and all(v > 0 for v in latencies))
            if mode == "predict"
            else latencies == [None] * 3
        )
        if "DATASET_DIR" in command and mode == "train":
            assert 0 < result["epoch_s"] < result["epoch_with_validation_s"]
