"""The crops' ensemble of the cross-validation's fold models and its test-time agreement (the crops' qc_score)."""

import os

import pytest
import torch
from monai.data import MetaTensor
from monai.inferers import SimpleInferer

from conftest import BUNDLE_DIR
from scripts.engine.inferers import EnsembleInferer, FlipAveragingInferer
from scripts.networks.ensemble import Ensemble
from scripts.recipe import load


def conv(seed):
    torch.manual_seed(seed)
    return torch.nn.Conv3d(1, 3, 3, padding=1)


def test_ensemble_averages_its_members_probabilities():
    members = [conv(0), conv(1)]
    x = torch.rand(2, 1, 8, 6, 4)
    expected = (members[0](x).softmax(1) + members[1](x).softmax(1)) / 2
    with torch.no_grad():
        torch.testing.assert_close(Ensemble(members)(x).softmax(1), expected)
        torch.testing.assert_close(Ensemble(members[:1])(x).softmax(1), members[0](x).softmax(1))


def test_one_network_is_flip_averaged_as_before_and_members_agreement_kept():
    """One network: the flip-averaged logits exactly (heads and MONAI's clients get them), no agreement. An ensemble:
    each case's agreement under its file name, 1 for members that agree and below 1 for members that do not."""
    flips = FlipAveragingInferer(SimpleInferer(), [0])
    x = MetaTensor(torch.rand(2, 1, 8, 6, 4), meta={"filename_or_obj": ["a.nii.gz", "b.nii.gz"]})
    network = conv(0).eval()
    with torch.no_grad():
        inferer = EnsembleInferer(flips)
        assert torch.equal(inferer(x, network), flips(x, network)) and inferer.agreement == {}
        inferer = EnsembleInferer(FlipAveragingInferer(SimpleInferer(), []))  # the members see the same view
        inferer(x, Ensemble([network, network]).eval())
        assert inferer.agreement == {"a.nii.gz": 1.0, "b.nii.gz": 1.0}
        inferer(x, Ensemble([network, conv(1), conv(2)]).eval())
        assert all(value < 0.9 for value in inferer.agreement.values()), inferer.agreement


def test_ensemble_members_take_the_flip_views_in_turn():
    """Each member runs once: the first on the input, the second on its mirror image, the third on the input again;
    their probabilities averaged. Without flips every member sees the input as it is."""
    members = [conv(0).eval(), conv(1).eval(), conv(2).eval()]
    x = torch.rand(1, 1, 8, 6, 4)
    with torch.no_grad():
        mirrored = members[1](x.flip(2)).flip(2)
        expected = (members[0](x).softmax(1) + mirrored.softmax(1) + members[2](x).softmax(1)) / 3
        flips = EnsembleInferer(FlipAveragingInferer(SimpleInferer(), [0]))
        torch.testing.assert_close(flips(x, Ensemble(members).eval()).softmax(1), expected)
        plain = EnsembleInferer(FlipAveragingInferer(SimpleInferer(), []))
        expected = sum(member(x).softmax(1) for member in members) / 3
        torch.testing.assert_close(plain(x, Ensemble(members).eval()).softmax(1), expected)


@pytest.mark.parametrize("ensemble", [True, False])
def test_crops_network_is_the_fold_models_unless_ensemble_false(ensemble, synthetic_task, tmp_path):
    crops = os.path.join(synthetic_task, "imagesTr")
    parser = load(BUNDLE_DIR, ["configs/inference.yaml"], {"ensemble": ensemble, "device": "cpu", "dataset_dir": crops})
    network = parser.get_parsed_content("crop_network")
    if not ensemble:
        assert network is parser.get_parsed_content("network")
        return
    # no crops to segment (heads only, or nothing): the folds are not loaded
    empty = load(BUNDLE_DIR, ["configs/inference.yaml"], {"device": "cpu", "dataset_dir": str(tmp_path)})
    assert empty.get_parsed_content("crop_network") is empty.get_parsed_content("network")
    files = parser.get_parsed_content("fold_files")
    assert isinstance(network, Ensemble) and len(network.members) == len(files) == 5
    for member, path in zip(network.members, files):
        assert os.path.isfile(path)
        weights = torch.load(path, map_location="cpu", weights_only=True)
        for name, value in member.state_dict().items():
            torch.testing.assert_close(value, weights[name].to(value.dtype))
    assert parser.get_parsed_content("evaluator").network is network


def first_inference_flags(monkeypatch, module, run) -> list:
    """The flags `run()` gives the first inference command it starts through `module.segment_folder` (stopped there)."""

    class InferenceStartedError(Exception):
        pass

    def segment_folder(images, masks, *overrides, check=True):
        raise InferenceStartedError(overrides)

    monkeypatch.setattr(module, "segment_folder", segment_folder)
    with pytest.raises(InferenceStartedError) as segmented:
        run()
    return list(segmented.value.args[0])


@pytest.mark.parametrize(
    "ckpt_file, ensemble, segmented_by",
    [(None, True, "true"), (None, "false", "false"), ("models/model_tf.pt", True, "false")],
)
def test_robustness_segments_other_weights_alone(
    ckpt_file, ensemble, segmented_by, synthetic_task, tmp_path, monkeypatch
):
    """The robustness benchmark measures the crops' ensemble, the single model with `--ensemble false` (a string on
    the command line), or the weights it is given alone (never the ensemble in their place)."""
    import scripts.qc.robustness as robustness

    overrides = first_inference_flags(
        monkeypatch,
        robustness,
        lambda: robustness.robustness(
            synthetic_task,
            "training",
            str(tmp_path),
            cases=1,
            degradations="clean",
            ckpt_file=ckpt_file,
            ensemble=ensemble,
        ),
    )
    assert overrides[overrides.index("--ensemble") + 1] == segmented_by
    assert ("--ckpt_file" in overrides) == (ckpt_file is not None)


@pytest.mark.parametrize("command", ["evaluate", "folds"])
def test_calibration_passes_other_flags_to_inference(command, synthetic_task, tmp_path, monkeypatch):
    """`python -m scripts.qc evaluate|folds ... --tta_flip_axes "[]"` segments without flips: a flag the command does
    not know goes to the inference command."""
    import importlib

    module = importlib.import_module({"evaluate": "scripts.qc.calibration", "folds": "scripts.qc.folds"}[command])
    run = getattr(module, command)
    overrides = first_inference_flags(
        monkeypatch, module, lambda: run(synthetic_task, output_dir=str(tmp_path), tta_flip_axes=[])
    )
    assert overrides[overrides.index("--tta_flip_axes") + 1] == "[]"


@pytest.mark.parametrize("pair_fold", [None, 1])
def test_pairs_are_the_cases_the_other_model_never_trained_on(pair_fold, synthetic_task, tmp_path, monkeypatch):
    """`scripts.qc folds --pair_with W` pairs W with each case's fold model on the validation split (W trained on
    the training split); with `--pair_fold k` (W trained on fold k's training cases) on fold k's validation cases."""
    import scripts.qc.folds as folds
    from scripts.qc.calibration import split_cases

    def scored(cases, masks):
        return [
            {"case": os.path.basename(c["image"]), "confidence": 0.9, "dice_anterior": 0.9, "dice_posterior": 0.9}
            for c in cases
        ]

    paired = {}
    monkeypatch.setattr(folds, "segment_folder", lambda *args, **kwargs: None)
    monkeypatch.setattr(folds, "score_masks", scored)
    monkeypatch.setattr(folds, "_pairs", lambda cases, *args: paired.setdefault("cases", cases))
    folds.folds(synthetic_task, str(tmp_path), pair_with="W.pt", pair_fold=pair_fold)
    expected = split_cases(os.path.abspath(synthetic_task), "validation", pair_fold)
    assert [c["image"] for c in paired["cases"]] == [c["image"] for c in expected]
    if pair_fold is not None:
        assert expected != split_cases(os.path.abspath(synthetic_task), "validation")
