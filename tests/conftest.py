import os
import shutil
import subprocess
import sys

import pytest

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLE_DIR = os.path.join(REPO_DIR, "bundle")
REAL_DATA_DIR = os.path.join(os.path.dirname(REPO_DIR), "shared", "data", "Task04_Hippocampus")


def files_under(*folders):
    """(path, modification time) of every file under `folders` (caches left out): to show that nothing was written."""
    return {
        (os.path.join(d, f), os.stat(os.path.join(d, f)).st_mtime_ns)
        for folder in folders
        for d, _, names in os.walk(folder)
        if "__pycache__" not in d
        for f in names
    }


# make the bundle's `scripts` package importable from tests run at the repo root
sys.path.insert(0, BUNDLE_DIR)

MAX_WORKERS = 4
WORKER_MEMORY_GIB = 6  # a worker's whole-head or torchrun tests peak at about this


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (pytest.ini): one worker per core, as many as memory allows, at most MAX_WORKERS."""
    cores = len(os.sched_getaffinity(0))
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return max(1, min(cores, MAX_WORKERS, int(memory_gib // WORKER_MEMORY_GIB)))


# with several workers, each one's torch (and the command lines it starts) gets its share of the cores: more threads
# than cores make every torch process wait on the others
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // WORKERS))


@pytest.fixture(scope="session")
def synthetic_task(tmp_path_factory):
    """A small synthetic MSD task folder shared by the tests that only read it."""
    from scripts.data.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(str(tmp_path_factory.mktemp("synthetic") / "Task04_Hippocampus"), num_cases=12)


def template_crop(size=(40, 56, 48)):
    """A Task04-like crop of the shipped MNI152 template around its left hippocampus (centred on inference.yaml's
    `head#box_centers`), as a float array on the template's 1 mm grid: the shipped model segments it, where a
    synthetic scan may give it nothing to find."""
    import nibabel as nib
    import numpy as np
    import yaml

    template = nib.load(os.path.join(BUNDLE_DIR, "atlas", "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"))
    with open(os.path.join(BUNDLE_DIR, "configs", "inference.yaml")) as f:
        centre = yaml.safe_load(f)["head"]["box_centers"]["left"]
    middle = np.rint(nib.affines.apply_affine(np.linalg.inv(template.affine), centre)).astype(int)
    box = tuple(slice(m - n // 2, m - n // 2 + n) for m, n in zip(middle, size))
    return np.asarray(template.dataobj, dtype=np.float32)[box]


def copy_bundle(dest):
    shutil.copytree(BUNDLE_DIR, dest, ignore=shutil.ignore_patterns("__pycache__", "output", "eval", "*.pt", "*.ts"))
    return str(dest)


def run_bundle(bundle_dir, *args, timeout=600):
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", *args],
        cwd=bundle_dir,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.fixture(scope="session")
def trained_bundle(synthetic_task, tmp_path_factory):
    """A copy of the bundle with no weights, trained 2 epochs (tf recipe, the CPU data path) through the command line:
    read by the training and robustness tests."""
    bundle = copy_bundle(tmp_path_factory.mktemp("copy") / "bundle")
    log = run_bundle(
        bundle,
        "training",
        "--config_file",
        "configs/train.yaml",
        "--dataset_dir",
        synthetic_task,
        "--epochs",
        "2",
        "--device_cache",
        "false",
    )
    return bundle, log
