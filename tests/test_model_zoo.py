"""MONAI model zoo's own checks on the bundle as a pull request would carry it, offline: `tools.package --pull_request`
makes the folder (no large files) and large_files.yml with URLs on a local HTTP server holding the release's large
files; the zoo's ci/ scripts and hook list come from ../shared/peers/monai-model-zoo as they are. Substitutes for what
needs a network: the PR's diff is the whole bundle, the metadata schema is put where `prepare_schema.py` downloads
it, `models/model_info.json` lists no earlier release, the pre-commit hooks run from the `pre-commit-hooks` wheel of
the zoo's rev instead of a clone of its repository, and `verify_properties.py`'s app properties (a git clone) are
MONAI's own Meta and Infer properties."""

import functools
import http.server
import os
import shutil
import subprocess
import sys
import threading

import pytest
import yaml

from conftest import BUNDLE_DIR, REPO_DIR

SHARED = os.path.join(os.path.dirname(REPO_DIR), "shared")
MODEL_ZOO = os.path.join(SHARED, "peers", "monai-model-zoo")
SCHEMA = os.path.join(SHARED, "monai", "meta_schema_20240725.json")
NAME = "vnet_hippocampus_segmentation"
UNIT_TEST = os.path.join(REPO_DIR, "ci", "unit_tests", f"test_{NAME}.py")
# pre-commit-hooks' console scripts and the file types its manifest gives each hook id
HOOK_ENTRIES = {
    "check-added-large-files": ("check-added-large-files", []),
    "check-case-conflict": ("check-case-conflict", []),
    "check-docstring-first": ("check-docstring-first", ["python"]),
    "check-executables-have-shebangs": ("check-executables-have-shebangs", ["text", "executable"]),
    "check-toml": ("check-toml", ["toml"]),
    "check-yaml": ("check-yaml", ["yaml"]),
    "detect-private-key": ("detect-private-key", ["text"]),
    "end-of-file-fixer": ("end-of-file-fixer", ["text"]),
    "forbid-new-submodules": ("forbid-new-submodules", ["directory"]),
    "mixed-line-ending": ("mixed-line-ending", ["text"]),
    "pretty-format-json": ("pretty-format-json", ["json"]),
    "trailing-whitespace": ("trailing-whitespace-fixer", ["text"]),
}

pytestmark = pytest.mark.skipif(
    not (os.path.isdir(MODEL_ZOO) and os.path.isfile(SCHEMA)), reason=f"{MODEL_ZOO} or {SCHEMA} is absent"
)


def run(command, cwd, timeout=600):
    result = subprocess.run(
        command,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, PYTHONPATH="", PYTHONDONTWRITEBYTECODE="1"),
    )
    return result.returncode, result.stdout + result.stderr


@pytest.fixture(scope="module")
def pull_request(tmp_path_factory):
    """(the PR folder, a model-zoo checkout holding a copy of it as models/<name>, the hosted large files' folder)."""
    root = tmp_path_factory.mktemp("model_zoo")
    hosted = root / "dist" / "large_files"
    hosted.mkdir(parents=True)
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(hosted))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    source = root / "bundle"  # packaging rewrites large_files.yml: never in the repository's bundle
    shutil.copytree(BUNDLE_DIR, source, ignore=shutil.ignore_patterns("__pycache__", "output", "eval", "dist"))
    code, log = run(
        [
            sys.executable,
            "-m",
            "tools.package",
            "--output_dir",
            str(root / "dist"),
            "--pull_request",
            "true",
            "--base_url",
            f"http://127.0.0.1:{server.server_address[1]}",
        ],
        cwd=source,
    )
    assert code == 0, log[-3000:]
    folder = root / "dist" / NAME
    zoo = root / "zoo"
    shutil.copytree(os.path.join(MODEL_ZOO, "ci"), zoo / "ci")
    shutil.copy(UNIT_TEST, zoo / "ci" / "unit_tests")
    shutil.copytree(folder, zoo / "models" / NAME)
    (zoo / "models" / "model_info.json").write_text("{}")
    shutil.copy(SCHEMA, zoo / "models" / os.path.basename(SCHEMA))
    yield folder, zoo, hosted
    server.shutdown()


def test_the_pull_request_carries_no_large_file_and_names_each_with_its_url(pull_request):
    folder, _, hosted = pull_request
    with open(folder / "large_files.yml") as f:
        listed = {entry["path"]: entry for entry in yaml.safe_load(f)["large_files"]}
    assert {"models/model.pt", "models/model.ts", "models/model_tf.pt"} <= set(listed)
    for path, entry in listed.items():
        assert not (folder / path).exists(), path
        assert (hosted / os.path.basename(entry["url"])).is_file(), entry["url"]
    too_large = [str(p) for p in folder.rglob("*") if p.is_file() and p.stat().st_size > 1024 * 1024]
    assert too_large == []


def test_verify_bundle_min_then_full_fetches_the_weights_by_url(pull_request):
    _, zoo, _ = pull_request
    code, log = run([sys.executable, "ci/prepare_schema.py", "--l", NAME], cwd=zoo)
    assert code == 0, log[-3000:]
    for mode in ("min", "full"):
        code, log = run([sys.executable, "ci/verify_bundle.py", "--b", NAME, "--mode", mode], cwd=zoo)
        assert code == 0 and "metadata format is verified correctly" in log, log[-4000:]
    assert "Provided TorchScript module is verified correctly" in log and "data shape is verified correctly" in log
    with open(zoo / "models" / NAME / "large_files.yml") as f:
        for entry in yaml.safe_load(f)["large_files"]:  # fetched, and the repository's files byte for byte
            fetched = zoo / "models" / NAME / entry["path"]
            assert fetched.read_bytes() == open(os.path.join(BUNDLE_DIR, entry["path"]), "rb").read(), entry["path"]


def test_infer_properties_with_the_configs_defaults(pull_request):
    """What verify_properties.py checks (create_workflow("infer"), Meta and Infer properties), defaults untouched."""
    _, zoo, _ = pull_request
    bundle = zoo / "models" / NAME
    code, log = run(
        [sys.executable, "-m", "monai.bundle", "download_large_files", "--bundle_path", str(bundle)], cwd=zoo
    )  # as the zoo's CI does first (or verify_bundle.py did)
    assert code == 0, log[-3000:]
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]); import os\n"
        "from monai.bundle import create_workflow\n"
        "from monai.bundle.properties import InferProperties, MetaProperties\n"
        "root = sys.argv[1]\n"
        "flow = create_workflow(workflow_type='infer', config_file=os.path.join(root, 'configs', 'inference.yaml'),"
        " meta_file=os.path.join(root, 'configs', 'metadata.json'),"
        " logging_file=os.path.join(root, 'configs', 'logging.conf'), bundle_root=root)\n"
        "flow.properties = {**MetaProperties, **InferProperties}\n"
        "print('missing:', flow.check_properties())\n"
    )
    code, log = run([sys.executable, "-c", script, str(bundle)], cwd=zoo)
    assert code == 0 and "missing: []" in log, log[-3000:]


def test_model_zoo_unit_test_through_its_runner(pull_request):
    _, zoo, _ = pull_request
    code, log = run([sys.executable, "ci/unit_tests/runner.py", "--b", NAME], cwd=zoo)
    assert code == 0 and "Ran 1 test" in log and "OK" in log, log[-4000:]


def run_hooks(config_file, folder, tmp_path, inside="."):
    """Runs the hooks of a pre-commit config (ids, arguments, excludes as written) on a git checkout holding
    `folder`'s files at `inside`, as pre-commit would, each hook from the pre-commit-hooks wheel; returns (exit code,
    log, files before, files after)."""
    with open(config_file) as f:
        config = yaml.safe_load(f)
    bin_dir = os.path.dirname(sys.executable)
    hooks = []
    for repository in config["repos"]:
        for hook in repository["hooks"]:
            entry, types = HOOK_ENTRIES[hook["id"]]
            hooks.append(
                {
                    "id": hook["id"],
                    "name": hook["id"],
                    "entry": os.path.join(bin_dir, entry),
                    "language": "system",
                    "args": hook.get("args", []),
                    "types": types or ["file"],
                    **({"exclude": hook["exclude"]} if "exclude" in hook else {}),
                }
            )
    local = {"exclude": config.get("exclude", "^$"), "repos": [{"repo": "local", "hooks": hooks}]}
    (tmp_path / "hooks.yaml").write_text(yaml.safe_dump(local))
    checkout = tmp_path / "checkout"
    shutil.copytree(folder, checkout / inside, ignore=shutil.ignore_patterns("__pycache__", "output", "eval", "dist"))
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    for command in (git + ["init", "-q"], git + ["add", "-A"]):
        assert run(command, cwd=checkout)[0] == 0
    before = {p: p.read_bytes() for p in checkout.rglob("*") if p.is_file() and ".git" not in p.parts}
    code, log = run(
        [os.path.join(bin_dir, "pre-commit"), "run", "--config", str(tmp_path / "hooks.yaml"), "--all-files"],
        cwd=checkout,
    )
    return code, log, before, {p: p.read_bytes() for p in before}


def test_pre_commit_hooks_leave_the_pull_request_unchanged(pull_request, tmp_path):
    """The zoo's .pre-commit-config.yaml as it is, on the PR's files."""
    folder, _, _ = pull_request
    code, log, before, after = run_hooks(os.path.join(MODEL_ZOO, ".pre-commit-config.yaml"), folder, tmp_path)
    assert code == 0, log[-4000:]
    assert after == before


def test_repository_hooks_never_touch_the_weights(tmp_path):
    """The repository's .pre-commit-config.yaml (the zoo's hooks, the weights and template left out) on the whole
    bundle, weights included: every file unchanged, the TorchScript still loads."""
    import torch

    code, log, before, after = run_hooks(
        os.path.join(REPO_DIR, ".pre-commit-config.yaml"), BUNDLE_DIR, tmp_path, inside="bundle"
    )
    assert code == 0, log[-4000:]
    assert after == before
    torch.jit.load(str(tmp_path / "checkout" / "bundle" / "models" / "model.ts"))
