"""MONAI Label's own tasks on this bundle (monailabel 0.8.5): ``BundleTrainTask`` with a ``LocalDatastore``, then
``BundleInferTask`` on the model it trained.

monailabel is not a dependency of the bundle (it pins torchvision and a server stack), so this is a script, not a
test: run it in the MONAI Label environment of docs/README.md ("MONAI Label"), from the repository root:

    /path/to/venv/bin/python scripts/check_monailabel.py --output /tmp/ml_check

It lays out a MONAI Label datastore (images, ``labels/final``) of STS CT, copies this bundle's configs into a fresh
bundle folder (its ``metadata.json`` labels set to the STS ones, as the docs ask of a bundle with other labels), and
calls the train task twice as the monaibundle app does: first with no weights (from scratch), then again, when the
task prepends a ``CheckpointLoader`` for the ``models/model.pt`` that the first call wrote. Then the infer task
segments one of the CTs with that model: the label map must have the CT's shape and affine and only the bundle's
label ids. The small encoder comes in through the hooks MONAI Label's tasks read the bundle's configs with
(``_update_overrides``, ``_load_bundle_config``), as an app adds its own settings. Stops with an error naming the
failed check.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import fire
import nibabel as nib
import numpy as np
from monailabel.datastore.local import LocalDatastore
from monailabel.tasks.infer.bundle import BundleInferTask
from monailabel.tasks.train.bundle import BundleTrainTask

SMALL = {
    "encoder_layers": [1, 1, 1, 1],
    "encoder_block": "basic",
    "encoder_width": [16, 32, 64, 128],
    "decoder_channels": [64, 32, 16, 16, 8],
    "label_names": ["background", "tumour"],
    "patch_size": [64, 64, 16],
    "num_workers": 0,
    "val_interval": 4,  # an epoch of the task's max_epochs: 4 iterations, not 200 (minutes on a CPU)
}


class SmallBundleTrainTask(BundleTrainTask):
    """The stock task with the small CPU network, as an app would add its own settings."""

    def _update_overrides(self, overrides: dict) -> None:
        overrides.update(SMALL)


class SmallBundleInferTask(BundleInferTask):
    """The stock task with ``settings`` (the small CPU network) joining inference.json as the task reads it."""

    def __init__(self, path: str, settings: dict) -> None:
        self.settings = settings
        super().__init__(path, conf={})

    def _load_bundle_config(self, path, config):
        parser = super()._load_bundle_config(path, config)
        parser.update(self.settings)
        return parser


def _check(passed: bool, message: str) -> None:
    if not passed:
        raise SystemExit(f"check failed: {message}")


def _set_labels(bundle: str, label_names: list[str]) -> None:
    """``outputs.pred`` of the bundle's metadata.json for ``label_names`` (MONAI Label reads its labels there)."""
    path = os.path.join(bundle, "configs", "metadata.json")
    with open(path) as f:
        metadata = json.load(f)
    pred = metadata["network_data_format"]["outputs"]["pred"]
    pred["num_channels"] = len(label_names)
    pred["channel_def"] = {str(i): name for i, name in enumerate(label_names)}
    with open(path, "w") as f:
        json.dump(metadata, f, indent=4)


def main(output: str, data: str = "", cases: tuple = ("STS_019", "STS_008", "STS_025")) -> None:
    """``data``: the STS folder (default ``$PGL_DATA_DIR/sts``, ``PGL_DATA_DIR`` by default ``../shared/data``)."""
    logging.basicConfig(level=logging.INFO)
    data = data or os.path.join(os.environ.get("PGL_DATA_DIR", "../shared/data"), "sts")
    studies, bundle = os.path.join(output, "studies"), os.path.join(output, "model", "pgl")
    shutil.rmtree(output, ignore_errors=True)
    os.makedirs(os.path.join(studies, "labels", "final"))
    for case in cases:
        for name, link in (
            ("CT_image", f"{studies}/{case}.nii.gz"),
            ("CT_mask", f"{studies}/labels/final/{case}.nii.gz"),
        ):
            source = os.path.abspath(f"{data}/{case}/{name}.nii.gz")
            _check(os.path.isfile(source), f"{source}: no such file (set PGL_DATA_DIR or --data)")
            os.symlink(source, link)
    shutil.copytree("configs", os.path.join(bundle, "configs"))
    _set_labels(bundle, SMALL["label_names"])
    datastore = LocalDatastore(studies, extensions=("*.nii.gz",), auto_reload=False)
    print(f"datastore: {len(datastore.datalist())} labelled images")

    task = SmallBundleTrainTask(bundle, conf={})
    _check(task.is_valid(), "BundleTrainTask did not accept the bundle")
    request = {"model": "pgl", "max_epochs": 1, "val_split": 0.34, "device": "cpu", "multi_gpu": False}
    # "pretrained": False fails in monailabel 0.8.5 itself (os.path.exists(None) in _load_checkpoint); the default
    # True with no models/model.pt yet trains from scratch
    task({**request, "pretrained": True}, datastore)
    model = os.path.join(bundle, "models", "model.pt")
    _check(os.path.isfile(model), f"training from scratch wrote no {model}")
    print(f"from scratch: {model} written")
    first = os.path.getmtime(model)
    task({**request, "pretrained": True}, datastore)
    _check(os.path.getmtime(model) > first, f"training from {model} did not rewrite it")
    print(f"from models/model.pt: {model} rewritten")

    image = f"{studies}/{cases[0]}.nii.gz"
    _infer(bundle, image, SMALL)
    # as if trained at 2 x 2 x 3 mm: the plan beside the model says so, inference resamples first and Spacingd meets
    # the request's image_path (see docs/README.md)
    plan = os.path.join(bundle, "models", "model.json")
    with open(plan) as f:
        planned = json.load(f)
    with open(plan, "w") as f:
        json.dump({**planned, "pixdim": [2.0, 2.0, 3.0]}, f)
    _infer(bundle, image, SMALL)


def _infer(bundle: str, image: str, settings: dict) -> None:
    """One request to the infer task with ``settings``; the label map must lie on ``image``'s grid."""
    infer = SmallBundleInferTask(bundle, settings)
    _check(infer.is_valid(), "BundleInferTask did not accept the bundle")
    label_file, result = infer({"image": image, "device": "cpu"})
    _check(bool(label_file) and os.path.isfile(label_file), f"the infer task returned no label file ({label_file})")
    ct, labels = nib.load(image), nib.load(label_file)
    ids = [int(i) for i in np.unique(np.asarray(labels.dataobj))]
    _check(labels.shape == ct.shape, f"label map shape {labels.shape}, the CT's {ct.shape}")
    _check(
        np.allclose(labels.affine, ct.affine, atol=1e-3), f"label map affine\n{labels.affine}\nthe CT's\n{ct.affine}"
    )
    _check(set(ids) <= set(range(len(settings["label_names"]))), f"label ids {ids}, not of {settings['label_names']}")
    print(f"inference: {label_file} has the shape {labels.shape} and affine of {image}")
    print(f"  label ids {ids}; labels {result['label_names']}; seconds {result['latencies']['total']}")


if __name__ == "__main__":
    fire.Fire(main)
