"""configs/train.json as MONAI Label's ``BundleTrainTask`` runs it, and the MONAI Label environment's pins, without
monailabel or a server (scripts/check_monailabel.py runs the server)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import tomllib
import torch
from monai.bundle import ConfigParser
from monai.bundle import run as bundle_run
from monai.transforms import AsDiscreted
from pgl_bundle.errors import BadInputError
from pgl_bundle.transfer import PLAN_DEFAULTS, write_plan

ENCODER = {"encoder_layers": [1, 1, 1, 1], "encoder_block": "basic", "encoder_width": [16, 32, 64, 128]}
LABELS = ["background", "tumour"]


def _train_config(repo_root, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(repo_root / "configs" / "train.json"))
    parser.update(overrides)
    return parser


def _model(repo_root, root) -> str:
    """A model.pt of the small network and its plan in ``root/models``, as a fine-tuning run leaves them."""
    network = _train_config(repo_root, **ENCODER, label_names=LABELS).get_parsed_content("network_def")
    path = root / "models" / "model.pt"
    path.parent.mkdir(parents=True)
    torch.save(network.state_dict(), path)
    write_plan(path, {**PLAN_DEFAULTS, **ENCODER})
    return str(path)


def _restoring(repo_root, model: str) -> list:
    """train#handlers as MONAI Label's BundleTrainTask passes them when models/model.pt exists."""
    loader = {"_target_": "CheckpointLoader", "load_path": model, "load_dict": {"model": "$@network"}, "strict": False}
    return [loader, *_train_config(repo_root).get("train#handlers")]


def test_the_trainer_option_val_interval_sets_the_epoch(repo_root):
    """MONAI Label shows ``displayable_configs`` among the trainer's options and passes the request's values back: an
    epoch (its max_epochs) is val_interval iterations, so a request makes a short run without editing train.json."""
    parser = _train_config(repo_root, displayable_configs={"val_interval": 3})
    assert parser.get_parsed_content("train#trainer#epoch_length") == 3
    assert list(_train_config(repo_root).get("displayable_configs")) == ["val_interval"]


def test_training_from_a_model_builds_the_architecture_of_its_plan(repo_root, tmp_path):
    """With the CheckpointLoader MONAI Label prepends for models/model.pt, the encoder comes from models/model.json,
    not from train.json's defaults (a ResNet-50), and the model loads strictly."""
    model = _model(repo_root, tmp_path)
    parser = _train_config(
        repo_root, bundle_root=str(tmp_path), label_names=LABELS, **{"train#handlers": _restoring(repo_root, model)}
    )
    assert {k: parser.get_parsed_content("plan")[k] for k in ENCODER} == ENCODER
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(model, weights_only=True), strict=True)


def test_a_model_that_does_not_fit_stops_the_run_before_any_data_is_read(repo_root, tmp_path):
    """Other decoder channels than the model's: the run stops naming the model, before the datalists' (missing) files
    are read; MONAI Label's loader would fail only once the datasets were cached."""
    model = _model(repo_root, tmp_path)
    missing = [{"image": str(tmp_path / "absent.nii.gz"), "label": str(tmp_path / "absent_label.nii.gz")}]
    overrides = {
        "bundle_root": str(tmp_path),
        "label_names": LABELS,
        "decoder_channels": [32, 32, 16, 16, 16],
        "device": torch.device("cpu"),
        "num_workers": 0,
        "train#trainer#max_epochs": 1,
        "train#dataset#data": missing,
        "validate#dataset#data": missing,
        "train#handlers": _restoring(repo_root, model),
    }
    config = str(repo_root / "configs" / "train.json")
    with pytest.raises(RuntimeError) as raised:  # MONAI's "Failed to evaluate" around the bundle's error
        bundle_run(run_id="run", init_id=None, final_id=None, config_file=config, logging_file=False, **overrides)
    assert isinstance(raised.value.__cause__, BadInputError)
    assert str(raised.value.__cause__).startswith(f"{model}: does not fit the network")


def _pins(lines) -> dict[str, str]:
    """``name==version`` lines (comments, blank lines and local folders left out), names normalised."""
    requirements = [line.split("#")[0].strip() for line in lines]
    pins = [r.split("==") for r in requirements if r and not r.startswith("./")]
    return {re.sub(r"[-_.]+", "-", name).lower(): version for name, version in pins}


def test_the_monailabel_requirements_pin_each_package_once_and_agree_with_the_project(repo_root):
    """requirements-monailabel.txt installs beside the project without resolution (`pip install --no-deps -r`): each
    line a pin or a folder of the repository, no package twice, none at another version than the project's own."""
    lines = (repo_root / "requirements-monailabel.txt").read_text().splitlines()
    requirements = [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+==[^=\s]+", r) or (repo_root / r).is_dir() for r in requirements)
    pins = _pins(lines)
    assert len(pins) == len([r for r in requirements if "==" in r])
    project = _pins(tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]["dependencies"])
    differing = {name: (version, pins[name]) for name, version in project.items() if pins.get(name, version) != version}
    assert differing == {}
    metadata = json.loads((repo_root / "configs" / "metadata.json").read_text())
    assert pins["monailabel"] == metadata["supported_apps"]["monai-label"]


def test_label_maps_come_out_in_the_bundles_output_dtype(repo_root, tmp_path):
    """MONAI Label writes the prediction in its own dtype (its requests carry no output dtype): the argmax of
    inference.json gives the uint8 that its SaveImaged writes on the command line."""
    parser = ConfigParser()
    parser.read_config(str(repo_root / "configs" / "inference.json"))
    parser.update({"bundle_root": str(tmp_path)})
    post = parser.get_parsed_content("postprocessing").transforms
    argmax = next(t for t in post if isinstance(t, AsDiscreted))
    pred = argmax({"pred": torch.rand(3, 8, 8, 4)})["pred"]
    assert pred.dtype == torch.uint8 and torch.equal(pred.unique(), torch.tensor([0, 1, 2], dtype=torch.uint8))
    assert np.dtype(parser.get_parsed_content("output_dtype")) == np.uint8
