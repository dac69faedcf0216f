"""Build the release zip in MONAI model-zoo layout, the archive that `monai.bundle download --url/--source github` accepts.

`python -m monai.bundle download` unpacks a release zip into `bundle_dir` and expects it to hold exactly one
top-level folder named after the bundle (for `--source github` the asset must also be named
`<name>_v<version>.zip`). A zip of the working folder would instead carry caches, training outputs, extra
checkpoints and hidden files, so this script copies only an allow-list:

    <name>/configs/   every config file
    <name>/models/    model.pt, model_tf.pt and model.ts (no other checkpoints)
    <name>/large_files.yml   each large file (the weights, the MNI152 template) with its URL and SHA-256, as
                             model-zoo bundles list them (written here)
    <name>/docs/      .md, .txt and .png files
    <name>/atlas/     the MNI152 template files whole-head inference registers to (.nii.gz) and their notice (.txt)
    <name>/scripts/   .py and .sh files, at any depth (the maintainers' tools/ stay out)
    <name>/LICENSE

skipping hidden files, `__pycache__`, `*.pyc`, logs, output folders and TensorBoard event files anywhere.
The archive is deterministic: sorted entries, fixed timestamps and permissions.

Run from the bundle folder (the bundle is located from this file, so any working directory works):

    python -m tools.package --output_dir dist
    python -m tools.package --output_dir dist --pull_request true --base_url https://HOST/PATH

which writes `large_files.yml` (URLs under `--base_url`, where the release's large files will live; the model zoo's
hosting by default), then writes and prints `dist/<name>_v<version>.zip`, the version being configs/metadata.json's
"version", or with `--pull_request true` the folder `dist/<name>/` that a model-zoo pull request adds under
`models/`: the same files less the large ones, which `python -m monai.bundle download_large_files --bundle_path
dist/<name>` fetches from their URLs and checks against their hashes.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
import sys
import zipfile

BUNDLE_NAME = "vnet_hippocampus_segmentation"
BUNDLE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if not __package__:  # run by its file path: the bundle's scripts package is not on sys.path yet
    sys.path.insert(0, BUNDLE_DIR)

from scripts import as_bool, atomic_write  # noqa: E402

# the single models and the five cross-validation models the crops' ensemble reads (configs/inference.yaml)
MODEL_FILES = ("model.pt", "model_tf.pt", "model.ts", *(f"folds/fold{k}.pt" for k in range(5)))
TEMPLATE_FILE = "atlas/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
# over the 1 MB a model-zoo pull request may add; the template must stay byte for byte what registration was tuned on
LARGE_FILES_LISTED = (*(f"models/{m}" for m in MODEL_FILES), TEMPLATE_FILE)
LARGE_FILES = "large_files.yml"
# where the model zoo hosts its bundles' large files
RELEASE_BASE_URL = "https://github.com/Project-MONAI/model-zoo/releases/download/hosting_storage_v1"
DOCS_SUFFIXES = (".md", ".txt", ".png")
ATLAS_SUFFIXES = (".nii.gz", ".txt")
REQUIRED = ("configs/metadata.json", "models/model.pt", LARGE_FILES, "LICENSE")
# never packaged, at any depth
EXCLUDED_DIRS = {"__pycache__", "output", "outputs", "eval", "runs", "logs", "log", "dist"}
EXCLUDED_FILES = ("*.pyc", "*.pyo", "*.log", "events.out.tfevents*")
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # the earliest date a zip entry can hold


def _excluded(rel_path: str) -> bool:
    parts = rel_path.split("/")
    if any(p.startswith(".") or p in EXCLUDED_DIRS for p in parts[:-1]):
        return True
    name = parts[-1]
    return name.startswith(".") or any(fnmatch.fnmatch(name, pattern) for pattern in EXCLUDED_FILES)


def _walk(bundle_dir: str, sub: str) -> list[str]:
    """Regular files under bundle_dir/sub as '/'-separated paths relative to bundle_dir (symlinked folders not followed)."""
    found = []
    for root, dirs, files in os.walk(os.path.join(bundle_dir, sub)):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in EXCLUDED_DIRS]
        for f in files:
            full = os.path.join(root, f)
            if os.path.isfile(full):
                found.append(os.path.relpath(full, bundle_dir).replace(os.sep, "/"))
    return found


def list_files(bundle_dir: str = BUNDLE_DIR) -> list[str]:
    """The sorted bundle-relative paths that go into the release zip."""
    bundle_dir = os.path.abspath(os.path.expanduser(str(bundle_dir)))
    files = _walk(bundle_dir, "configs")
    files += [p for p in _walk(bundle_dir, "scripts") if p.endswith((".py", ".sh"))]
    files += [p for p in _walk(bundle_dir, "docs") if p.lower().endswith(DOCS_SUFFIXES)]
    files += [p for p in _walk(bundle_dir, "atlas") if p.lower().endswith(ATLAS_SUFFIXES)]
    files += [f"models/{m}" for m in MODEL_FILES if os.path.isfile(os.path.join(bundle_dir, "models", m))]
    files += [name for name in ("LICENSE", LARGE_FILES) if os.path.isfile(os.path.join(bundle_dir, name))]
    files = sorted(p for p in set(files) if not _excluded(p))
    missing = [r for r in REQUIRED if r not in files]
    if missing:
        raise FileNotFoundError(f"cannot package {bundle_dir}: missing {', '.join(missing)}")
    return files


def bundle_version(bundle_dir: str = BUNDLE_DIR) -> str:
    """The "version" of bundle_dir/configs/metadata.json."""
    with open(os.path.join(bundle_dir, "configs", "metadata.json")) as f:
        version = json.load(f).get("version")
    if not version or not isinstance(version, str):
        raise ValueError(f"configs/metadata.json in {bundle_dir} has no string 'version'")
    return version


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def large_files(bundle_dir: str = BUNDLE_DIR) -> list[str]:
    """The bundle-relative paths of its large files (`LARGE_FILES_LISTED` that exist): in the release zip, named with
    a URL and a hash in large_files.yml, left out of a pull request's folder."""
    return [p for p in LARGE_FILES_LISTED if os.path.isfile(os.path.join(bundle_dir, p))]


def hosted_name(path: str, name: str, version: str) -> str:
    """The file name a large file is hosted under (release assets are one flat folder):
    `<name>_v<version>_models_model.pt` for `models/model.pt`."""
    return f"{name}_v{version}_{path.replace('/', '_')}"


def write_large_files(bundle_dir: str = BUNDLE_DIR, base_url: str = RELEASE_BASE_URL, name: str = BUNDLE_NAME) -> str:
    """`bundle_dir/large_files.yml` in model-zoo's format: each large file's path, URL (its `hosted_name` under
    `base_url`) and SHA-256."""
    version = bundle_version(bundle_dir)
    lines = ["large_files:"]
    for path in large_files(bundle_dir):
        url = f"{base_url.rstrip('/')}/{hosted_name(path, name, version)}"
        digest = sha256(os.path.join(bundle_dir, path))
        lines += [f'- path: "{path}"', f'  url: "{url}"', f'  hash_val: "{digest}"', '  hash_type: "sha256"']
    target = os.path.join(bundle_dir, LARGE_FILES)
    with atomic_write(target, "w") as f:
        f.write("\n".join(lines) + "\n")
    return target


def package(
    output_dir: str = "dist",
    name: str = BUNDLE_NAME,
    bundle_dir: str = BUNDLE_DIR,
    base_url: str = RELEASE_BASE_URL,
    pull_request: bool = False,
) -> str:
    """Write `bundle_dir/large_files.yml` (URLs under `base_url`, where the release's large files will live), then
    `output_dir`/<name>_v<version>.zip with the single top-level folder <name>/, or with `pull_request` the folder
    `output_dir`/<name>/ as a model-zoo pull request carries it (no large files: they are fetched from their URLs)
    and `output_dir`/large_files/ with the large files under their hosted names, to upload to `base_url`; returns
    and prints its path. The zip goes through a temporary file: a failure leaves none."""
    bundle_dir = os.path.abspath(os.path.expanduser(str(bundle_dir)))
    write_large_files(bundle_dir, base_url, name)
    files, version, large = list_files(bundle_dir), bundle_version(bundle_dir), large_files(bundle_dir)
    output_dir = os.path.abspath(os.path.expanduser(str(output_dir)))
    os.makedirs(output_dir, exist_ok=True)
    if pull_request:
        target, hosted = os.path.join(output_dir, name), os.path.join(output_dir, "large_files")
        for folder in (target, hosted):
            shutil.rmtree(folder, ignore_errors=True)
        for rel in files:
            copy = os.path.join(hosted, hosted_name(rel, name, version)) if rel in large else os.path.join(target, rel)
            os.makedirs(os.path.dirname(copy), exist_ok=True)
            shutil.copyfile(os.path.join(bundle_dir, rel), copy)
        print(target)
        return target
    zip_path = os.path.join(output_dir, f"{name}_v{version}.zip")
    with atomic_write(zip_path) as archive, zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for rel in files:
            info = zipfile.ZipInfo(f"{name}/{rel}", date_time=ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = (0o100644 & 0xFFFF) << 16  # regular file, rw-r--r--
            info.create_system = 3  # unix, so the permissions above are honoured
            with open(os.path.join(bundle_dir, rel), "rb") as src, zf.open(info, "w") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
    print(zip_path)
    return zip_path


def _cli(
    output_dir: str = "dist",
    name: str = BUNDLE_NAME,
    bundle_dir: str = BUNDLE_DIR,
    base_url: str = RELEASE_BASE_URL,
    pull_request: bool = False,
) -> None:
    # prints the path once (fire would echo it again); "--pull_request false" arrives as a string
    package(output_dir, name, bundle_dir, base_url, as_bool(pull_request))


_cli.__doc__ = package.__doc__

if __name__ == "__main__":
    import fire

    fire.Fire(_cli)
