"""MONAI Label's own train task on this bundle: ``BundleTrainTask`` (monailabel 0.8.5) with a ``LocalDatastore``.

monailabel is not a dependency of the bundle (it pins torchvision and a server stack), so this is a script, not a
test: run it with monailabel importable, e.g. from a virtual environment that sees the project's packages
(docs/README.md, MONAI Label):

    python -m venv --without-pip --system-site-packages /tmp/ml && \\
        python -m pip --python /tmp/ml/bin/python install --no-deps monailabel==0.8.5 watchdog
    PYTHONPATH=$PWD /tmp/ml/bin/python scripts/check_monailabel.py --output /tmp/ml_check

It lays out a MONAI Label datastore (images, ``labels/final``) of STS CT, copies this bundle's configs into a fresh
bundle folder, and calls the task twice as the monaibundle app does: first with no weights (from scratch), then
again, when the task prepends a ``CheckpointLoader`` for the ``models/model.pt`` that the first call wrote. The
small encoder comes in through ``_update_overrides``, the hook MONAI Label gives apps for their own overrides.
"""

from __future__ import annotations

import logging
import os
import shutil

import fire
from monailabel.datastore.local import LocalDatastore
from monailabel.tasks.train.bundle import BundleTrainTask

SMALL = {
    "encoder_layers": [1, 1, 1, 1],
    "encoder_block": "basic",
    "encoder_width": [16, 32, 64, 128],
    "decoder_channels": [64, 32, 16, 16, 8],
    "label_names": ["background", "tumour"],
    "patch_size": [64, 64, 16],
    "num_workers": 0,
}


class SmallBundleTrainTask(BundleTrainTask):
    """The stock task with the small CPU network, as an app would add its own settings."""

    def _update_overrides(self, overrides: dict) -> None:
        overrides.update(SMALL)


def main(output: str, data: str = "../shared/data/sts", cases: tuple = ("STS_019", "STS_008", "STS_025")) -> None:
    logging.basicConfig(level=logging.INFO)
    studies, bundle = os.path.join(output, "studies"), os.path.join(output, "model", "pgl")
    shutil.rmtree(output, ignore_errors=True)
    os.makedirs(os.path.join(studies, "labels", "final"))
    for case in cases:
        os.symlink(os.path.abspath(f"{data}/{case}/CT_image.nii.gz"), f"{studies}/{case}.nii.gz")
        os.symlink(os.path.abspath(f"{data}/{case}/CT_mask.nii.gz"), f"{studies}/labels/final/{case}.nii.gz")
    shutil.copytree("configs", os.path.join(bundle, "configs"))
    datastore = LocalDatastore(studies, extensions=("*.nii.gz",), auto_reload=False)
    print(f"datastore: {len(datastore.datalist())} labelled images")

    task = SmallBundleTrainTask(bundle, conf={})
    assert task.is_valid(), "BundleTrainTask did not accept the bundle"
    request = {"model": "pgl", "max_epochs": 1, "val_split": 0.34, "device": "cpu", "multi_gpu": False}
    # "pretrained": False fails in monailabel 0.8.5 itself (os.path.exists(None) in _load_checkpoint); the default
    # True with no models/model.pt yet trains from scratch
    task({**request, "pretrained": True}, datastore)
    model = os.path.join(bundle, "models", "model.pt")
    print(f"from scratch: {model} written: {os.path.isfile(model)}")
    first = os.path.getmtime(model)
    task({**request, "pretrained": True}, datastore)
    print(f"from models/model.pt: rewritten: {os.path.getmtime(model) > first}")


if __name__ == "__main__":
    fire.Fire(main)
