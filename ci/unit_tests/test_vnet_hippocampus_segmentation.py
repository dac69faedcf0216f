# The bundle's unit test in the MONAI model zoo's form: a pull request adds it as ci/unit_tests/test_<bundle>.py, and
# the zoo's ci/unit_tests/runner.py runs it from the zoo's root, where the bundle is models/<bundle>.
# tests/test_model_zoo.py runs it the same way on a pull-request-shaped copy of the bundle.

import os
import shutil
import sys
import tempfile
import unittest

from monai.bundle import ConfigWorkflow
from utils import check_workflow

BUNDLE_ROOT = os.path.join("models", "vnet_hippocampus_segmentation")


def workflow(workflow_type: str, configs: list, **override) -> ConfigWorkflow:
    return ConfigWorkflow(
        workflow_type=workflow_type,
        config_file=[os.path.join(BUNDLE_ROOT, "configs", name) for name in configs],
        meta_file=os.path.join(BUNDLE_ROOT, "configs", "metadata.json"),
        logging_file=os.path.join(BUNDLE_ROOT, "configs", "logging.conf"),
        bundle_root=BUNDLE_ROOT,
        **override,
    )


class TestVNetHippocampusSegmentation(unittest.TestCase):
    """Train the shipped recipe for one epoch on a small synthetic Task04-like task, evaluate it, and segment the
    task's test images with the inference config, each workflow checked for MONAI's bundle properties."""

    def setUp(self):
        sys.path.insert(0, os.path.abspath(BUNDLE_ROOT))  # the bundle's own scripts
        from scripts.data.synthetic import make_synthetic_dataset

        self.work_dir = tempfile.mkdtemp()
        self.dataset_dir = make_synthetic_dataset(os.path.join(self.work_dir, "task"), num_cases=6)
        self.ckpt_file = os.path.join(self.work_dir, "model.pt")

    def tearDown(self):
        shutil.rmtree(self.work_dir)
        sys.path.remove(os.path.abspath(BUNDLE_ROOT))

    def test_train_evaluate_infer(self):
        common = {"dataset_dir": self.dataset_dir, "ckpt_file": self.ckpt_file}
        recipe = ["train.yaml", "train_native.yaml"]
        trained = os.path.join(self.work_dir, "train")
        check_workflow(workflow("train", recipe, epochs=1, output_dir=trained, **common), check_properties=True)
        self.assertTrue(os.path.isfile(self.ckpt_file))

        evaluated = os.path.join(self.work_dir, "eval")
        check_workflow(workflow("train", [*recipe, "evaluate.yaml"], output_dir=evaluated, **common))
        self.assertTrue(os.listdir(evaluated))

        masks = os.path.join(self.work_dir, "masks")
        inputs = os.path.join(self.dataset_dir, "imagesTs")
        infer = workflow("infer", ["inference.yaml"], dataset_dir=inputs, output_dir=masks, ckpt_file=self.ckpt_file)
        check_workflow(infer, check_properties=True)
        written = sorted(name for name in os.listdir(masks) if name.endswith("_seg.nii.gz"))
        expected = sorted(name.replace(".nii.gz", "_seg.nii.gz") for name in os.listdir(inputs))
        self.assertEqual(written, expected)


if __name__ == "__main__":
    unittest.main()
