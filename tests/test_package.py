"""The release zip (tools/package.py): model-zoo layout, no junk, and usable through `monai.bundle download`."""

import glob
import json
import os
import shutil
import subprocess
import sys
import zipfile

import nibabel as nib
import numpy as np
import pytest

from conftest import BUNDLE_DIR

NAME = "vnet_hippocampus_segmentation"
JUNK = [
    "scripts/__pycache__/x.cpython-311.pyc",
    "scripts/stale.pyc",
    "scripts/notes.txt",
    "configs/__pycache__/x.pyc",
    "configs/.hidden.yaml",
    "output/log.txt",
    "output/events.out.tfevents.123.host",
    "eval/x.nii.gz",
    "runs/events.out.tfevents.456.host",
    "models/checkpoint_epoch=2.pt",
    "models/model_key_metric=0.9.pt",
    "models/events.out.tfevents.789.host",
    "docs/draft.docx",
    "docs/.DS_Store",
    ".git/HEAD",
    ".gitignore",
    "train.log",
]

FOLD_FILES = {f"models/folds/fold{k}.pt" for k in range(5)}  # the crops' ensemble


def clean_env():
    """Environment for subprocesses that must see only the unpacked bundle, never the repo's `scripts`."""
    return dict(os.environ, PYTHONPATH="", PYTHONDONTWRITEBYTECODE="1")


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """(zip path, its version) built by the package script of a copy of the bundle with junk files added."""
    root = tmp_path_factory.mktemp("package")
    copy = root / "bundle"
    # never touch the real bundle; skip its own caches/outputs/data so the copy holds only what the test adds
    anywhere = shutil.ignore_patterns("__pycache__", "*.pyc", ".*", "output", "eval", "runs", "dist")
    shutil.copytree(
        BUNDLE_DIR,
        copy,
        ignore=lambda folder, names: anywhere(folder, names)
        | ({"data"} & set(names) if os.path.samefile(folder, BUNDLE_DIR) else set()),
    )  # the bundle's data/, not scripts/data/
    for rel in JUNK:
        (copy / rel).parent.mkdir(parents=True, exist_ok=True)
        (copy / rel).write_bytes(b"junk")
    result = subprocess.run(
        [sys.executable, "-m", "tools.package", "--output_dir", str(root / "dist")],
        cwd=copy,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(copy / "configs" / "metadata.json") as f:
        version = json.load(f)["version"]
    zip_path = root / "dist" / f"{NAME}_v{version}.zip"
    assert result.stdout.strip().splitlines()[-1] == str(zip_path)
    assert zip_path.is_file()

    # run from elsewhere through the file path (`--pull_request false` spelt out): the bundle is found from __file__,
    # and the zip is byte-identical
    again = subprocess.run(
        [sys.executable, str(copy / "tools" / "package.py"), "--output_dir", "dist2", "--pull_request", "false"],
        cwd=root,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert (root / "dist2" / zip_path.name).read_bytes() == zip_path.read_bytes()
    return zip_path, version


def test_zip_layout_and_no_junk(release):
    zip_path, _ = release
    with zipfile.ZipFile(zip_path) as zf:
        assert zf.testzip() is None
        infos = zf.infolist()
    names = [i.filename for i in infos]
    assert names == sorted(names)
    assert {i.date_time for i in infos} == {(1980, 1, 1, 0, 0, 0)}
    assert {n.split("/")[0] for n in names} == {NAME}
    rel = {n[len(NAME) + 1 :] for n in names if not n.endswith("/")}

    required = {
        "configs/train.yaml",
        "configs/inference.yaml",
        "configs/metadata.json",
        "models/model.pt",
        "models/model_tf.pt",
        "large_files.yml",
        "scripts/networks/vnet.py",
        "scripts/__init__.py",
        "scripts/labels.py",
        "scripts/inference/outputs.py",
        "LICENSE",
        "atlas/NOTICE.txt",
        "atlas/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
        "atlas/mni_icbm152_brain_mask_2mm.nii.gz",
    }
    if os.path.isfile(os.path.join(BUNDLE_DIR, "docs", "README.md")):
        required.add("docs/README.md")
    assert required <= rel, required - rel

    for junk in JUNK:
        assert junk not in rel
    for path in rel:
        parts = path.split("/")
        assert not any(p.startswith(".") for p in parts), path
        assert not {"__pycache__", "output", "eval", "runs"} & set(parts), path
        assert not path.endswith(".pyc") and "tfevents" not in path, path
        top = parts[0]
        if top == "models":
            assert path in {"models/model.pt", "models/model_tf.pt", "models/model.ts", *FOLD_FILES}, path
        elif top == "docs":
            assert path.lower().endswith((".md", ".txt", ".png")), path
        elif top == "scripts":
            assert path.endswith((".py", ".sh")), path
        elif top == "atlas":
            assert path.endswith((".nii.gz", ".txt")), path
        else:
            assert top == "configs" or path in ("LICENSE", "large_files.yml"), path


def test_download_by_url_then_inference(release, synthetic_task, tmp_path):
    zip_path, _ = release
    bundles = tmp_path / "bundles"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "download",
            "--name",
            NAME,
            "--url",
            zip_path.as_uri(),
            "--bundle_dir",
            str(bundles),
            "--progress",
            "false",
        ],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    unpacked = bundles / NAME
    assert (unpacked / "configs" / "metadata.json").is_file()
    assert not (unpacked / "models" / "checkpoint_epoch=2.pt").exists()

    # the unpacked bundle, not the repo, provides `scripts`
    which = subprocess.run(
        [sys.executable, "-c", "import scripts; print(scripts.__file__)"],
        cwd=unpacked,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert which.returncode == 0, which.stderr
    assert os.path.realpath(which.stdout.strip()).startswith(os.path.realpath(unpacked) + os.sep)

    out = tmp_path / "out"

    def infer(inputs):
        """The README's inference command in the unpacked bundle, with nothing of this checkout on the path."""
        command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.yaml"]
        command += ["--dataset_dir", str(inputs), "--output_dir", str(out)]
        return subprocess.run(command, cwd=unpacked, env=clean_env(), capture_output=True, text=True, timeout=300)

    result = infer(synthetic_task)
    assert result.returncode == 0, result.stderr[-3000:]
    images = sorted(glob.glob(os.path.join(synthetic_task, "imagesTs", "*.nii.gz")))
    assert images
    for image in images:
        mask = out / os.path.basename(image).replace(".nii.gz", "_seg.nii.gz")
        assert mask.is_file(), mask
        assert nib.load(str(mask)).shape == nib.load(image).shape

    # a whole head through the unpacked bundle: its atlas files came with it
    heads = tmp_path / "heads"
    heads.mkdir()
    shutil.copy(unpacked / "atlas" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz", heads / "head.nii.gz")
    result = infer(heads)
    assert result.returncode == 0, result.stderr[-3000:]
    assert set(np.unique(np.asarray(nib.load(str(out / "head_seg.nii.gz")).dataobj))) == {0, 1, 2, 3, 4}


def test_download_from_github_release_name(release, tmp_path, monkeypatch):
    """`--source github --version V` fetches the asset <name>_v<V>.zip: the package's file name must match it."""
    from monai.bundle import scripts as bundle_scripts

    zip_path, version = release
    requested = []

    def fake_release_url(repo_owner, repo_name, tag_name, filename):
        requested.append(filename)
        return (zip_path.parent / filename).as_uri()

    monkeypatch.setattr(bundle_scripts, "_get_git_release_url", fake_release_url)
    bundle_scripts.download(
        name=NAME,
        version=version,
        source="github",
        repo="owner/repo/hosting_storage_v1",
        bundle_dir=str(tmp_path),
        progress=False,
    )
    assert requested == [zip_path.name]
    assert (tmp_path / NAME / "configs" / "inference.yaml").is_file()
    packaged_model = zip_path.parent.parent / "bundle" / "models" / "model.pt"  # the copy the zip was built from
    assert (tmp_path / NAME / "models" / "model.pt").read_bytes() == packaged_model.read_bytes()


def test_large_files_lists_each_weight_file_with_its_sha256(tmp_path):
    """The committed large_files.yml matches the committed weights, and MONAI's own check agrees."""
    import yaml

    from tools.package import LARGE_FILES_LISTED, sha256

    with open(os.path.join(BUNDLE_DIR, "large_files.yml")) as f:
        listed = {entry["path"]: entry for entry in yaml.safe_load(f)["large_files"]}
    assert set(listed) == set(LARGE_FILES_LISTED)
    for path, entry in listed.items():
        assert entry["hash_type"] == "sha256" and entry["hash_val"] == sha256(os.path.join(BUNDLE_DIR, path)), path
        assert entry["url"].startswith("https://") and entry["url"].endswith(path.replace("/", "_")), entry["url"]
    check = [sys.executable, "-m", "monai.bundle", "download_large_files", "--bundle_path", BUNDLE_DIR]
    result = subprocess.run(check, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "skipped downloading" in result.stdout + result.stderr, result.stderr[-2000:]

    copy = tmp_path / "bundle"
    shutil.copytree(BUNDLE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__", "docs"))
    (copy / "models" / "model_tf.pt").write_bytes(b"changed")
    result = subprocess.run(check[:-1] + [str(copy)], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "model_tf.pt" in result.stdout + result.stderr
