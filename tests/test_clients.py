"""MONAI's own clients load the bundle: MONAI Label's BundleInferTask and MONAI Deploy's MonaiBundleInferenceOperator
build their pipelines from a few ids of `configs/inference.yaml` and `metadata.json`; their masks equal the command
line's, and those ids equal the recipe's training chain."""

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigItem, ConfigParser
from monai.data import MetaTensor
from monai.transforms import LoadImaged, SaveImaged
from monai.utils import ensure_tuple

from conftest import BUNDLE_DIR, REPO_DIR
from scripts.engine import amp
from scripts.qc.calibration import dice
from scripts.recipe import load

CONFIGS = os.path.join(BUNDLE_DIR, "configs")
TEMPLATE = os.path.join(BUNDLE_DIR, "atlas", "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
MONAI_LABEL_PYTHON = os.path.join(REPO_DIR, ".venv-monailabel", "bin", "python")
# each inference chain and the training chain of its recipe
RECIPES = {
    "native": (["inference.yaml"], ["train.yaml", "train_native.yaml"]),
    "tf": (["inference.yaml", "inference_tf.yaml"], ["train.yaml"]),
}
# bf16 autocast against fp32 (assert_within_bf16_rounding). On 9 Task04 crops, each at 1 and 2 threads, bf16 moved at
# most 7 voxels, each where fp32's two highest probabilities were within 0.013, and no label's Dice fell below 0.9986
# (AMD EPYC, bf16 emulated). The bounds leave about 4x and 3x that room; a pipeline drift moves whole boundary layers
# (hundreds of voxels, margins up to 1).
BF16_TIE = 0.05
MIN_BF16_DICE = 0.995


def parse(config_files, **overrides):
    return load(BUNDLE_DIR, [os.path.join("configs", name) for name in config_files], overrides)


def metadata():
    with open(os.path.join(CONFIGS, "metadata.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def crop(tmp_path_factory):
    """A Task04-sized crop of the shipped template around its left hippocampus, stored in LPS voxel order, and the
    command line's masks of it: in fp32 with `models/model.pt` ("pt") and `models/model.ts` (configs/inference_ts.yaml,
    "ts"), and where the CPU has native bf16, in bf16 with `models/model.pt` on all the machine's cores ("pt_bf16").
    The clients get the single model (`network_def`, `models/model.pt`), as the command line with `--ensemble false`."""
    folder = tmp_path_factory.mktemp("client_crop")
    template = nib.load(TEMPLATE)
    centre = (np.linalg.inv(template.affine) @ [-26.7, -22.2, -14.8, 1])[:3]
    start = np.round(centre - [18, 26, 20]).astype(int)
    data = np.asarray(template.dataobj, dtype=np.float32)[
        start[0] : start[0] + 36, start[1] : start[1] + 52, start[2] : start[2] + 40
    ]
    affine = template.affine.copy()
    affine[:3, 3] = (template.affine @ [start[0] + 35, start[1], start[2], 1])[:3]
    affine[:3, 0] *= -1  # x runs right to left: the bundle reorients and must map the mask back
    path = str(folder / "crop.nii.gz")
    nib.save(nib.Nifti1Image(data[::-1].copy(), affine), path)
    masks = {}
    runs = [
        ("pt", "configs/inference.yaml", "false", None),
        ("ts", "['configs/inference.yaml','configs/inference_ts.yaml']", "false", None),
    ]
    if amp.cpu_has_native_bf16():
        runs.append(
            (
                "pt_bf16",
                "configs/inference.yaml",
                "true",
                {**os.environ, "OMP_NUM_THREADS": str(len(os.sched_getaffinity(0)))},
            )
        )
    for name, configs, bf16, env in runs:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "monai.bundle",
                "run",
                "--config_file",
                configs,
                "--dataset_dir",
                path,
                "--output_dir",
                str(folder / name),
                "--report",
                "false",
                "--cpu_bf16",
                bf16,
                "--ensemble",
                "false",
            ],
            cwd=BUNDLE_DIR,
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        masks[name] = np.asarray(nib.load(str(folder / name / "crop_seg.nii.gz")).dataobj)
        assert set(np.unique(masks[name])) == {0, 1, 2}  # both parts found, so equal masks mean something
    return path, masks


def assert_within_bf16_rounding(mask: np.ndarray, fp32_mask: np.ndarray, fp32_probabilities: np.ndarray) -> None:
    """`mask`, made with bf16 autocast, is the fp32 pipeline's mask but for bf16's rounding: each label's Dice with
    `fp32_mask` is at least MIN_BF16_DICE, and a voxel may take another label only where fp32's two highest class
    probabilities are within BF16_TIE of each other. A drifting pipeline (another transform, another inverse) moves
    voxels far from any tie and fails."""
    moved = mask != fp32_mask
    top_two = np.sort(fp32_probabilities, axis=0)[-2:]
    margins = (top_two[1] - top_two[0])[moved]
    assert np.all(margins < BF16_TIE), f"{moved.sum()} voxels moved, fp32 margins up to {margins.max():.3f}"
    for label in (1, 2):
        assert dice(mask == label, fp32_mask == label) >= MIN_BF16_DICE, (label, int(moved.sum()))


def monai_label_mask(image: str, device, cpu_bf16: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The mask and class probabilities on the scan's grid as MONAI Label 0.8.5's BundleInferTask makes them
    (monailabel/tasks/infer/bundle.py and basic_infer.py):
    a ConfigParser on the bundle with `bundle_root` set; `network_def` with `models/model.pt`'s "model" weights;
    the request's device replacing `device`; `preprocessing` with each LoadImaged reading every key it lists and
    returning metadata; the inferer on the batched image; `postprocessing` without SaveImaged; the channel dropped.
    (It also adds `image_path` to the data, which MONAI 1.5.2 and later's Spacingd takes for metadata: the real
    client's test below runs with MONAI 1.5.1.) `cpu_bf16` is the config's own switch: fp32 unless asked."""
    parser = ConfigParser()
    parser.read_config(os.path.join(CONFIGS, "inference.yaml"))
    parser.config.update({"bundle_root": BUNDLE_DIR, "cpu_bf16": cpu_bf16})
    network = parser.get_parsed_content("network_def", instantiate=True)
    formats = metadata()["network_data_format"]
    image_key, pred_key = next(iter(formats["inputs"])), next(iter(formats["outputs"]))
    checkpoint = torch.load(os.path.join(BUNDLE_DIR, "models", "model.pt"), map_location="cpu")
    weights = checkpoint.get("model", checkpoint)
    assert set(weights) == set(network.state_dict())  # MONAI Label loads non-strict: a mismatch would pass silently
    network.load_state_dict(weights)
    network = network.to(torch.device(device)).eval()

    parser.config.update({"device": device})
    parser.ref_resolver.items["device"] = ConfigItem(config=device, id="device")
    data = {image_key: image}
    for transform in parser.get_parsed_content("preprocessing", instantiate=True).transforms:
        if isinstance(transform, LoadImaged):
            assert all(key in data for key in transform.keys)  # its loader reads every listed key
            transform._loader.image_only = False
        data = transform(data)
    inferer = parser.get_parsed_content("inferer", instantiate=True)
    with torch.no_grad():
        data[pred_key] = inferer(data[image_key][None].to(torch.device(device)), network)[0]
    for transform in parser.get_parsed_content("postprocessing", instantiate=True).transforms:
        if not isinstance(transform, SaveImaged):
            data = transform(data)
    return np.asarray(data[pred_key][0]), np.asarray(data["probabilities"])


def monai_deploy_mask(image: str, cpu_bf16: bool = False) -> np.ndarray:
    """The mask as MONAI Deploy's MonaiBundleInferenceOperator makes it from a bundle folder
    (monai/deploy/operators/monai_bundle_inference_operator.py): `metadata.json` and `inference.yaml` parsed with no
    `bundle_root`; `models/model.ts`; `device` and `inferer` from the config; `preprocessing` and `postprocessing` less
    the transforms named LoadImage* or SaveImage*, run on a MetaTensor as its loaders give it (W, H, D, no channel);
    `cpu_bf16` as for MONAI Label's."""
    parser = ConfigParser()
    parser.read_meta(f=metadata())
    parser.read_config([os.path.join(CONFIGS, "inference.yaml")])
    parser["cpu_bf16"] = cpu_bf16
    parser.parse()
    device = parser.get_parsed_content("device")
    inferer = parser.get_parsed_content("inferer")

    def without_io(name):
        transforms = parser.get_parsed_content(name).transforms
        return [t for t in transforms if not any(io in type(t).__name__ for io in ("LoadImage", "SaveImage"))]

    network = torch.jit.load(os.path.join(BUNDLE_DIR, "models", "model.ts"), map_location=device).eval()
    scan = nib.load(image)
    meta = {
        "affine": torch.as_tensor(scan.affine),
        "original_affine": scan.affine,
        "space": "RAS",
        "spatial_shape": np.asarray(scan.shape),
        "original_channel_dim": "no_channel",
        "filename_or_obj": image,
    }
    inputs = {"image": MetaTensor(torch.as_tensor(np.asarray(scan.dataobj)), meta=meta)}
    for transform in without_io("preprocessing"):
        inputs = transform(inputs)
    with torch.no_grad():
        logits = inferer(inputs=inputs["image"][None].to(device), network=network)
    outputs = {"pred": ensure_tuple(logits)[0], **inputs}
    for transform in without_io("postprocessing"):
        outputs = transform(outputs)
    return np.squeeze(np.asarray(outputs["pred"]), 0)


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")], ids=["string", "torch.device"])
def test_monai_label_way_gives_the_command_line_mask(crop, device, tmp_path, monkeypatch):
    """In fp32 the same pipeline gives the same mask, whatever the process, its thread count or the weights' layout."""
    monkeypatch.chdir(tmp_path)
    image, masks = crop
    assert np.array_equal(monai_label_mask(image, device)[0], masks["pt"])
    assert os.listdir(tmp_path) == []


def test_monai_deploy_way_gives_the_command_line_mask(crop, tmp_path, monkeypatch):
    """It loads `models/model.ts` where the bundle has one: the command line's TorchScript config's mask."""
    monkeypatch.chdir(tmp_path)  # the operator never sets bundle_root
    image, masks = crop
    assert np.array_equal(monai_deploy_mask(image), masks["ts"])
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(not amp.cpu_has_native_bf16(), reason="no native bf16 on this CPU (emulated, it runs ~80x slower)")
def test_bf16_masks_differ_from_fp32_only_by_rounding(crop):
    """bf16 autocast (the default on CPUs with native bf16) on one thread in this process, and on all cores in the
    command line: different kernels and summation orders, so boundary voxels may move, but only near-ties."""
    image, masks = crop
    fp32_mask, fp32_probabilities = monai_label_mask(image, "cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        bf16_mask, _ = monai_label_mask(image, "cpu", cpu_bf16=True)
    finally:
        torch.set_num_threads(threads)
    for mask in (bf16_mask, masks["pt_bf16"]):
        assert_within_bf16_rounding(mask, fp32_mask, fp32_probabilities)
    for label in (1, 2):
        assert dice(bf16_mask == label, masks["pt_bf16"] == label) >= MIN_BF16_DICE


def test_metadata_names_what_the_clients_read():
    """MONAI Label takes the image and prediction keys and the label names from `network_data_format`."""
    formats = metadata()["network_data_format"]
    assert list(formats["inputs"]) == ["image"] and list(formats["outputs"]) == ["pred"]
    assert formats["outputs"]["pred"]["channel_def"] == {"0": "background", "1": "anterior", "2": "posterior"}
    parser = parse(["inference.yaml"])
    keys = {key for t in parser.get_parsed_content("preprocessing").transforms for key in t.keys}
    assert keys == {"image"}
    assert [t.keys for t in parser.get_parsed_content("postprocessing").transforms if hasattr(t, "keys")][0] == (
        "pred",
    )


@pytest.mark.skipif(
    not os.path.exists(MONAI_LABEL_PYTHON),
    reason="MONAI Label's own environment is absent (bash tests/clients/setup_monailabel.sh)",
)
def test_real_monai_label_gives_the_command_line_mask(crop, tmp_path):
    image, masks = crop
    result = subprocess.run(
        [
            MONAI_LABEL_PYTHON,
            os.path.join(REPO_DIR, "tests", "clients", "monailabel_infer.py"),
            BUNDLE_DIR,
            image,
            str(tmp_path / "label.nii.gz"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["labels"] == {"anterior": 1, "posterior": 2}
    label = nib.load(str(tmp_path / "label.nii.gz"))
    mask = np.asarray(label.dataobj).astype(np.uint8)
    if amp.cpu_bf16("auto"):  # the real client runs the config's defaults: bf16 where the CPU has it
        assert_within_bf16_rounding(mask, *monai_label_mask(image, "cpu"))
    else:
        assert np.array_equal(mask, masks["pt"])
    assert np.allclose(label.affine, nib.load(image).affine)


@pytest.mark.parametrize("recipe", RECIPES)
def test_inference_ids_equal_the_recipe_training_chain(recipe, synthetic_task):
    """The network, preprocessing, inferer and mapping back to the scan written out in inference.yaml do what the
    recipe's training configs do, so the two cannot drift apart."""
    inference_files, training_files = RECIPES[recipe]
    inference = parse(inference_files)
    training = parse(training_files, dataset_dir=synthetic_task)
    network = inference.get_parsed_content("network_def")
    assert repr(network) == repr(training.get_parsed_content("network_def"))

    image = os.path.join(synthetic_task, "imagesTr", sorted(os.listdir(os.path.join(synthetic_task, "imagesTr")))[0])
    ours = inference.get_parsed_content("preprocessing")({"image": image})
    theirs = training.get_parsed_content("preprocessing")({"image": image})
    assert torch.equal(ours["image"], theirs["image"])
    assert torch.allclose(ours["image"].affine, theirs["image"].affine)
    assert [op["class"] for op in ours["image"].applied_operations] == [
        op["class"] for op in theirs["image"].applied_operations
    ]

    network.eval()
    with torch.no_grad():
        logits = inference.get_parsed_content("inferer")(ours["image"][None], network)[0]
        assert torch.equal(logits, training.get_parsed_content("inferer")(ours["image"][None], network)[0])
    back = inference.get_parsed_content("postprocessing").transforms[:2]  # softmax, then back to the scan's grid
    mapped = {"pred": logits, "image": ours["image"]}
    for transform in back:
        mapped = transform(mapped)
    expected = {"pred": logits, "image": theirs["image"]}
    for transform in training.get_parsed_content("probabilities_to_scan"):
        expected = transform(expected)
    assert torch.allclose(mapped["pred"], expected["pred"])


def test_command_line_overrides_reach_what_they_name():
    parser = parse(["inference.yaml"], tta_flip_axes=[], cpu_bf16="false", channels_last="false")
    inferer = parser.get_parsed_content("inferer")
    assert inferer.inferer.inferer.spatial_axes == [] and inferer.enabled is False
    weights = [p for p in parser.get_parsed_content("network").parameters() if p.dim() == 5]
    assert all(p.is_contiguous() for p in weights)


def test_a_whole_head_given_to_a_client_is_refused_by_name(tmp_path):
    """MONAI Label and Deploy run the crop pipeline alone: a whole head gets a reason, never a crop's mask of it."""
    template = nib.load(TEMPLATE)
    head = str(tmp_path / "head.nii.gz")
    nib.save(
        nib.Nifti1Image(
            np.asarray(template.dataobj, dtype=np.float32)[::2, ::2, ::2], template.affine @ np.diag([2, 2, 2, 1])
        ),
        head,
    )
    with pytest.raises(Exception, match="no hippocampus crop.*command line"):
        monai_label_mask(head, "cpu")
