"""train.yaml resolves, splits reproducibly and preprocesses as documented; metadata.json is valid."""

import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.metrics import compute_dice
from monai.transforms import Resize

from conftest import BUNDLE_DIR
from scripts import find_bundle_error
from scripts.data.msd import load_training_list, split_dataset, write_split

RUN_IDS = {"initialize", "run", "training", "evaluating", "finalize"}


def parse_train_config(dataset_dir, tmp_path, configs=("train.yaml",), **overrides):
    parser = ConfigParser()
    parser.read_config([os.path.join(BUNDLE_DIR, "configs", name) for name in configs])
    parser.read_meta(os.path.join(BUNDLE_DIR, "configs", "metadata.json"))
    parser.update(
        {
            "bundle_root": BUNDLE_DIR,
            "dataset_dir": dataset_dir,
            "output_dir": str(tmp_path / "output"),
            "ckpt_dir": str(tmp_path / "models"),
            **overrides,
        }
    )
    parser.parse()
    return parser


def config_ids(config, prefix=""):
    items = config.items() if isinstance(config, dict) else enumerate(config) if isinstance(config, list) else []
    for key, value in items:
        id_ = f"{prefix}#{key}" if prefix else str(key)
        yield id_
        yield from config_ids(value, id_)


@pytest.mark.parametrize(
    "configs",
    [
        ("train.yaml",),
        ("train.yaml", "train_native.yaml"),
        ("train.yaml", "evaluate.yaml"),
        ("train.yaml", "train_native.yaml", "dev_split.yaml"),
        ("inference.yaml",),
        ("inference.yaml", "inference_tf.yaml"),
        ("inference.yaml", "inference_ts.yaml"),
    ],
)
def test_every_config_id_resolves(configs, synthetic_task, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # every file is found from bundle_root, whatever the working directory
    overrides = {"ckpt_file": os.path.join(BUNDLE_DIR, "models", "model.ts")} if "inference_ts.yaml" in configs else {}
    parser = parse_train_config(synthetic_task, tmp_path, configs, **overrides)
    ids = [i for i in config_ids(parser.config) if i.split("#")[0] not in RUN_IDS and i != "_meta_"]
    assert any(i.endswith("evaluator") for i in ids)
    for id_ in ids:
        try:
            parser.get_parsed_content(id_)
        except RuntimeError as error:  # only a checkpoint loader may fail: no weights are written here
            assert "no such weights or checkpoint file" in str(find_bundle_error(error)), (id_, error)
    assert isinstance(parser.get_parsed_content("network"), torch.nn.Module)
    assert not (tmp_path / "models" / "model.pt").exists()  # resolving must not train


def test_split_is_deterministic_and_complete(synthetic_task, tmp_path):
    cases = load_training_list(synthetic_task)
    first = split_dataset(cases, split_seed=3, train_split=0.75)
    write_split(first, str(tmp_path))
    again = split_dataset(cases, split_seed=3, train_split=0.75)
    other = split_dataset(cases, split_seed=4, train_split=0.75)
    assert first == again
    assert first["validation"] != other["validation"]
    images = [c["image"] for c in first["training"] + first["validation"]]
    assert len(first["training"]) == 9 and len(first["validation"]) == 3 and len(set(images)) == 12
    with open(tmp_path / "split.json") as f:
        written = json.load(f)
    assert written == first


def test_split_ignores_listing_order(synthetic_task, tmp_path):
    shuffled = tmp_path / "task"
    shutil.copytree(synthetic_task, shuffled)
    with open(shuffled / "dataset.json") as f:
        meta = json.load(f)
    meta["training"].reverse()
    with open(shuffled / "dataset.json", "w") as f:
        json.dump(meta, f)
    names = lambda split: [os.path.basename(c["image"]) for c in split["validation"]]  # noqa: E731
    reordered, original = load_training_list(str(shuffled)), load_training_list(synthetic_task)
    assert names(split_dataset(reordered, 7)) == names(split_dataset(original, 7))


def test_dev_split_never_uses_the_validation_cases(synthetic_task, tmp_path):
    usual = parse_train_config(synthetic_task, tmp_path, ("train.yaml",), train_split=0.75).get_parsed_content("split")
    dev = parse_train_config(
        synthetic_task, tmp_path, ("train.yaml", "dev_split.yaml"), train_split=0.75, dev_train_split=0.5
    ).get_parsed_content("split")
    images = lambda cases: sorted(c["image"] for c in cases)  # noqa: E731
    assert images(dev["training"] + dev["validation"]) == images(usual["training"])
    assert dev["training"] and dev["validation"]


def test_folds_validate_every_case_once(synthetic_task, tmp_path):
    """configs/fold.yaml: the folds' validation parts cover every labelled case exactly once, each fold trains on
    the rest, and each fold has its own weights."""
    folds = [
        parse_train_config(synthetic_task, tmp_path, ("train.yaml", "train_native.yaml", "fold.yaml"), fold=k)
        for k in range(5)
    ]
    splits = [parser.get_parsed_content("split") for parser in folds]
    images = lambda cases: sorted(c["image"] for c in cases)  # noqa: E731
    everything = images(load_training_list(synthetic_task))
    assert images(sum((split["validation"] for split in splits), [])) == everything
    for split in splits:
        assert split["validation"] and images(split["training"] + split["validation"]) == everything
    assert len({parser.get_parsed_content("ckpt_file") for parser in folds}) == 5


def _label_round_trip_dice(label, mode, size):
    one_hot = lambda t: torch.nn.functional.one_hot(t.long()[0], 3).permute(3, 0, 1, 2)[None]  # noqa: E731
    back = Resize(label.shape[1:], mode=mode)(Resize(size, mode=mode)(label))
    return compute_dice(one_hot(back), one_hot(label), include_background=False)[0]


def test_label_resampling_keeps_structures(synthetic_task, tmp_path):
    """`nearest` shifts labels by half a voxel (Dice ~0.72 after a round trip); `nearest-exact` does not."""
    parser = parse_train_config(synthetic_task, tmp_path)
    resize = next(t for t in parser.get_parsed_content("preprocessing").transforms if type(t).__name__ == "Resized")
    label_mode = dict(zip(resize.keys, resize.mode))["label"]
    size = parser.get_parsed_content("input_shape")
    labels = [
        torch.as_tensor(np.asarray(nib.load(os.path.join(synthetic_task, c["label"])).dataobj)[None].astype("float32"))
        for c in json.load(open(os.path.join(synthetic_task, "dataset.json")))["training"][:6]
    ]
    configured = torch.stack([_label_round_trip_dice(lab, label_mode, size) for lab in labels]).mean(0)
    nearest = torch.stack([_label_round_trip_dice(lab, "nearest", size) for lab in labels]).mean(0)
    assert (configured > 0.88).all(), configured
    assert (nearest < 0.85).all(), "the check must be able to tell nearest from nearest-exact"


def test_preprocessing_output_and_constant_image(synthetic_task, tmp_path):
    parser = parse_train_config(synthetic_task, tmp_path)
    preprocessing = parser.get_parsed_content("preprocessing")
    case = parser.get_parsed_content("split")["training"][0]
    out = preprocessing(dict(case))
    assert out["image"].shape == out["label"].shape == (1, 32, 32, 32)
    assert abs(float(out["image"].mean())) < 1e-4 and abs(float(out["image"].std()) - 1) < 1e-2
    assert set(torch.unique(out["label"]).tolist()) == {0.0, 1.0, 2.0}

    normalize = next(t for t in preprocessing.transforms if type(t).__name__ == "NormalizeIntensityd")
    constant = normalize({"image": torch.full((1, 32, 32, 32), 7.0)})["image"]
    assert torch.equal(constant, torch.zeros_like(constant))  # zeros, not NaN

    # a constant scan has nothing to segment: the pipeline says so instead of predicting on zeros
    constant_file = tmp_path / "constant.nii.gz"
    nib.save(nib.Nifti1Image(np.full((35, 50, 40), 7.0, dtype=np.float32), np.eye(4)), str(constant_file))
    with pytest.raises(RuntimeError) as error:  # MONAI wraps the transform's ValueError
        preprocessing({"image": str(constant_file)})
    assert "constant" in str(error.value.__cause__)


@pytest.mark.parametrize("device_cache", ["auto", "true"])
def test_the_data_path_follows_the_device(device_cache, synthetic_task, tmp_path):
    """On CPU, auto keeps the plain DataLoader; the device path caches on the device and uses a ThreadDataLoader.
    Either way the trainer gets plain tensors: MetaTensor batches cost 16% of a training step."""
    from monai.data import ThreadDataLoader
    from monai.transforms import ToDeviced

    parser = parse_train_config(
        synthetic_task, tmp_path, ("train.yaml", "train_native.yaml"), device_cache=device_cache
    )
    on_device = device_cache == "true"
    assert isinstance(parser.get_parsed_content("train#dataloader"), ThreadDataLoader) == on_device
    transforms = parser.get_parsed_content("train#preprocessing").transforms
    assert any(isinstance(t, ToDeviced) for t in transforms) == on_device
    first_random = next(i for i, t in enumerate(transforms) if type(t).__name__.startswith("Rand"))
    cached = transforms[:first_random]  # what CacheDataset keeps: plain tensors, on the device on the device path
    assert any(type(t).__name__ == "EnsureTyped" for t in cached)
    assert any(isinstance(t, ToDeviced) for t in cached) == on_device
    batch = next(iter(parser.get_parsed_content("train#dataloader")))
    assert type(batch["image"]) is torch.Tensor and type(batch["label"]) is torch.Tensor


@pytest.mark.parametrize("channels_last", ["true", "false"])
def test_network_weights_follow_channels_last(channels_last, synthetic_task, tmp_path):
    """Training's and inference's networks hold their 3D convolution weights in the chosen memory layout, and the
    layout changes no output beyond rounding."""
    from scripts.networks.vnet import VNet

    layout = torch.channels_last_3d if channels_last == "true" else torch.contiguous_format
    training = parse_train_config(
        synthetic_task, tmp_path, ("train.yaml", "train_native.yaml"), channels_last=channels_last
    )
    inference = parse_train_config(synthetic_task, tmp_path, ("inference.yaml",), channels_last=channels_last)
    image = torch.randn(1, 1, 24, 32, 24)
    for parser in (training, inference):
        network = parser.get_parsed_content("network").eval()
        weights = [p for p in network.parameters() if p.dim() == 5]
        assert weights and all(p.is_contiguous(memory_format=layout) for p in weights)
        plain = VNet(1, 3, full_res_skip=True).eval()
        plain.load_state_dict({k: v.contiguous() for k, v in network.state_dict().items()})
        assert all(p.is_contiguous() for p in plain.parameters())
        with torch.no_grad():
            assert torch.allclose(network(image), plain(image), atol=1e-4)


def test_configs_and_metadata_name_the_labels_of_scripts_labels():
    """The labels are defined once (scripts/labels.py): train.yaml's class names, metadata.json's output channels and
    its label descriptions, and the synthetic task's dataset.json say the same."""
    import yaml

    from scripts.data.synthetic import LABELS
    from scripts.labels import CLASS_NAMES, structures

    with open(os.path.join(BUNDLE_DIR, "configs", "train.yaml")) as f:
        assert tuple(yaml.safe_load(f)["class_names"]) == CLASS_NAMES
    with open(os.path.join(BUNDLE_DIR, "configs", "metadata.json")) as f:
        metadata = json.load(f)
    channels = metadata["network_data_format"]["outputs"]["pred"]["channel_def"]
    assert [channels[str(i)] for i in range(len(channels))] == list(CLASS_NAMES)
    crop = ", ".join(["0 background", *(f"{label} {part} hippocampus" for label, _, part in structures("crop"))])
    head = ", ".join(["0 background", *(f"{label} {side} {part}" for label, side, part in structures("head"))])
    assert metadata["label_classes"] == crop
    assert metadata["pred_classes"] == f"crop inputs: {crop}; whole-head inputs: {head} hippocampus"
    assert [name.lower() for _, name in sorted(LABELS.items())] == list(CLASS_NAMES)


def test_the_card_names_the_current_version():
    """Every place the model card names the bundle's version (its header line and its citation) says
    metadata.json's."""
    import re

    with open(os.path.join(BUNDLE_DIR, "configs", "metadata.json")) as f:
        version = json.load(f)["version"]
    with open(os.path.join(BUNDLE_DIR, "docs", "README.md"), encoding="utf-8") as f:
        card = f.read()
    named = re.findall(r"Version (\d+\.\d+\.\d+)", card)
    assert len(named) >= 2 and set(named) == {version}, named


def test_the_card_fits_the_templates_length():
    """The model card stays within the template's 300 lines: details live in docs/*.md."""
    with open(os.path.join(BUNDLE_DIR, "docs", "README.md"), encoding="utf-8") as f:
        assert len(f.read().splitlines()) <= 300
