"""Unit tests of the bundle for the MONAI model zoo's CI (a file of the zoo pull request, not of the bundle).

In a model-zoo pull request this file is ``ci/unit_tests/test_ct_pgl_ssl_segmentation.py``; the zoo's GPU premerge
job runs it from the zoo's root with ``python ci/unit_tests/runner.py --b ct_pgl_ssl_segmentation``. Every stage runs
through ``ConfigWorkflow`` (properties checked, as the zoo's other bundle tests do) on the bundle's embedded synthetic
CT phantoms, with a small network so that it also runs on CPU: pretraining, fine-tuning from the pretrained encoder,
evaluation and inference of the fine-tuned model. docs/README.md ("Model-zoo CI checks") has the run here.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import unittest

import torch
from monai.bundle import ConfigWorkflow
from utils import check_workflow

BUNDLE = os.path.join("models", "ct_pgl_ssl_segmentation")
sys.path.insert(0, os.path.abspath(BUNDLE))  # the configs import the bundle's own package, pgl_bundle, from it

# the smallest network that still runs every stage: 8-wide basic blocks, the pretraining strides (16, 16, 8) unchanged
SMALL = {
    "encoder_layers": [1, 1, 1, 1],
    "encoder_block": "basic",
    "encoder_width": [8, 8, 8, 8],
    "patch_size": [32, 32, 16],
    "num_workers": 0,
}
NETWORK = {**SMALL, "decoder_channels": [8, 8, 8, 8, 8]}  # the segmentation network: train, evaluate, infer
SEGMENTATION = {**NETWORK, "batch_size": 1, "num_samples": 1, "cache_rate": 0.0}
ORDER = ("pretrain", "train", "evaluate", "infer")


def test_order(name1: str, name2: str) -> int:
    """Run the stages in workflow order: each one uses the weights the one before it wrote."""

    def rank(name: str) -> int:
        return next(i for i, stage in enumerate(ORDER) if f"test_{stage}" in name)

    return rank(name1) - rank(name2)


def workflow(bundle_root: str, workflow_type: str, configs: list[str], **override) -> ConfigWorkflow:
    return ConfigWorkflow(
        workflow_type=workflow_type,
        config_file=[os.path.join(BUNDLE, "configs", name) for name in configs],
        logging_file=os.path.join(BUNDLE, "configs", "logging.conf"),
        meta_file=os.path.join(BUNDLE, "configs", "metadata.json"),
        bundle_root=bundle_root,
        **override,
    )


class TestCTPGLSSLSegmentation(unittest.TestCase):
    """The four stages in one output folder (``bundle_root``): synthetic data, weights and outputs are shared."""

    @classmethod
    def setUpClass(cls):
        cls.bundle_root = tempfile.mkdtemp()
        cls.models = os.path.join(cls.bundle_root, "models")

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.bundle_root)

    def test_pretrain_config(self):
        override = {**SMALL, "num_volumes": 2, "batch_size": 1, "max_epochs": 1, "hidden_channels": 32}
        check_workflow(workflow(self.bundle_root, "train", ["pretrain.json"], **override), check_properties=True)
        encoder = torch.load(os.path.join(self.models, "pretrained_encoder.pt"), weights_only=True)
        self.assertTrue(encoder and all(torch.isfinite(value).all() for value in encoder.values()))

    def test_train_config(self):
        override = {**SEGMENTATION, "num_iterations": 4, "val_interval": 2, "num_val_cases": 1}
        override["pretrained_encoder"] = os.path.join(self.models, "pretrained_encoder.pt")
        check_workflow(workflow(self.bundle_root, "train", ["train.json"], **override), check_properties=True)
        self.assertTrue(os.path.isfile(os.path.join(self.models, "model.pt")))

    def test_evaluate_config(self):
        # evaluate.json overlays train.json, so the workflow is the train one (as in the zoo's other bundle tests)
        override = {**SEGMENTATION, "num_val_cases": 1}
        configs = ["train.json", "evaluate.json"]
        check_workflow(workflow(self.bundle_root, "train", configs, **override), check_properties=True)
        self.assertTrue(os.path.isfile(os.path.join(self.bundle_root, "eval", "metrics.csv")))

    def test_infer_config(self):
        check_workflow(workflow(self.bundle_root, "infer", ["inference.json"], **NETWORK), check_properties=True)
        masks = [name for _, _, files in os.walk(os.path.join(self.bundle_root, "eval")) for name in files]
        self.assertTrue(any(name.endswith("_seg.nii.gz") for name in masks), masks)


if __name__ == "__main__":
    loader = unittest.TestLoader()
    loader.sortTestMethodsUsing = test_order
    unittest.main(testLoader=loader)
