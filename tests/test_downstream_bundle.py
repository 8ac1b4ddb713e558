"""The downstream bundle on real CT: train -> evaluate -> infer through `python -m monai.bundle`, the bundle checks
(properties, network I/O, TorchScript export by scripting), MONAI Label's ways of loading it, and a learning sanity
check."""

from __future__ import annotations

import csv
import json
import logging
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.bundle import run as bundle_run
from monai.transforms import Compose, LoadImaged, SaveImaged, Spacingd
from pgl_bundle.networks import SLIDING_WINDOW
from pgl_bundle.transfer import PLAN_DEFAULTS

LABELS = ["background", "tumour"]
# a small network for CPU: one basic block per stage, narrow; the pretraining strides (16, 16, 8) are unchanged
ENCODER = {"encoder_layers": [1, 1, 1, 1], "encoder_block": "basic", "encoder_width": [16, 32, 64, 128]}
SMALL = {
    **ENCODER,
    "decoder_channels": [64, 32, 16, 16, 8],
    "label_names": LABELS,
    "patch_size": [64, 64, 16],
    "num_workers": 0,
}
WITH_PLAN_KEYS = {"pretrain.json", "train.json", "inference.json", "prepare.json", "pretrain_paper.json"}
TRAIN_CASES, VAL_CASES, TEST_CASES = ["STS_019", "STS_025"], ["STS_008"], ["STS_002", "STS_012"]


def cli(overrides: dict) -> list[str]:
    """``--key value`` pairs for `python -m monai.bundle`, values as JSON (which its argument parser reads)."""
    return [arg for key, value in overrides.items() for arg in (f"--{key}", json.dumps(value, separators=(",", ":")))]


def items(shared_data, cases) -> list[dict]:
    sts = shared_data / "sts"
    return [{"image": str(sts / c / "CT_image.nii.gz"), "label": str(sts / c / "CT_mask.nii.gz")} for c in cases]


def write_datalist(path, shared_data, cases) -> str:
    path.write_text(json.dumps({"labels": dict(enumerate(LABELS)), "training": items(shared_data, cases)}))
    return str(path)


def bundle(repo_root, command: str, *args: str, timeout: int = 600) -> str:
    cmd = [sys.executable, "-m", "monai.bundle", command, *args]
    result = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout + result.stderr


def config(repo_root, name: str) -> str:
    return str(repo_root / "configs" / name)


@pytest.fixture(scope="module")
def round_trip(repo_root, shared_data, tmp_path_factory):
    """train -> evaluate -> infer, each a `python -m monai.bundle run` of the bundle's configs."""
    root = tmp_path_factory.mktemp("downstream")
    data = write_datalist(root / "dataset.json", shared_data, TRAIN_CASES + VAL_CASES + TEST_CASES)
    test_data = write_datalist(root / "test.json", shared_data, TEST_CASES)
    # evaluation and inference read the encoder's settings from the plan training wrote (models/model.json)
    common = [
        "--meta_file",
        config(repo_root, "metadata.json"),
        "--logging_file",
        config(repo_root, "logging.conf"),
        "--bundle_root",
        str(root),
        *cli({k: v for k, v in SMALL.items() if k not in ENCODER}),
    ]
    split = cli({"dataset_dir": data, "num_val_cases": len(VAL_CASES), "num_test_cases": len(TEST_CASES)})
    logs = {
        "train": bundle(
            repo_root,
            "run",
            "--config_file",
            config(repo_root, "train.json"),
            *common,
            *split,
            *cli(ENCODER),
            *cli(
                {
                    "num_iterations": 2,
                    "val_interval": 1,
                    "batch_size": 1,
                    "num_samples": 2,
                    "freeze_encoder_iterations": 1,
                }
            ),
        ),
        "evaluate": bundle(
            repo_root,
            "run",
            "--config_file",
            json.dumps([config(repo_root, "train.json"), config(repo_root, "evaluate.json")]),
            *common,
            *split,
        ),
        "infer": bundle(
            repo_root, "run", "--config_file", config(repo_root, "inference.json"), *common, "--dataset_dir", test_data
        ),
    }
    return root, logs


@pytest.mark.parametrize("num_train_cases", [None, 1, 3])
def test_split_keeps_validation_and_test_fixed(repo_root, num_train_cases):
    """Test cases last, validation before them, training from the start: a low-label run is one override."""
    parser = ConfigParser()
    parser.read_config(config(repo_root, "train.json"))
    cases = [{"image": f"case{i}"} for i in range(10)]
    parser.update({"datalist": cases, "num_test_cases": 3, "num_val_cases": 2, "num_train_cases": num_train_cases})
    assert parser.get_parsed_content("test_datalist") == cases[7:]
    assert parser.get_parsed_content("val_datalist") == cases[5:7]
    assert parser.get_parsed_content("train_datalist") == cases[:5][:num_train_cases]
    assert parser.get_parsed_content("train#dataset#data") == cases[:5][:num_train_cases]


def test_train_validates_per_class_and_keeps_the_best_model(round_trip):
    root, logs = round_trip
    assert logs["train"].count("Key metric: val_mean_dice best value") == 2  # validated after each of 2 epochs
    assert "tumour: " in logs["train"]  # the per-class Dice, by label name
    assert "iteration 1: encoder frozen." in logs["train"] and "iteration 2: encoder trainable." in logs["train"]
    assert json.loads((root / "models" / "model.json").read_text())["encoder_width"] == ENCODER["encoder_width"]
    assert "5 volumes to use: shape from" in logs["train"] and "validation: [1/1] 100%" in logs["train"]
    assert json.loads((root / "models" / "train_run.json").read_text())["run_id"]  # the run recorded its folder
    state = torch.load(root / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert any(k.startswith("encoder.layer4.") for k in state) and any(k.startswith("decoder.4.") for k in state)


def test_evaluate_writes_dice_per_case_and_class(round_trip, shared_data):
    root, logs = round_trip
    assert "evaluation: [2/2] 100%" in logs["evaluate"]  # progress, case by case
    with open(root / "eval" / "val_mean_dice_raw.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["filename", "class0", "mean"]  # class0: the first foreground label ("tumour")
    assert [r[0] for r in rows[1:]] == [i["image"] for i in items(shared_data, TEST_CASES)]
    assert all(0.0 <= float(v) <= 1.0 for r in rows[1:] for v in r[1:])
    with open(root / "eval" / "val_mean_dice_summary.csv") as f:
        summary = {r[0]: r[1:] for r in csv.reader(f)}
    assert summary["class"][:2] == ["mean", "median"] and {"class0", "mean"} <= summary.keys()
    assert (root / "eval" / "metrics.csv").read_text().startswith("val_mean_dice,")


def test_inference_writes_masks_on_the_input_grid(round_trip, shared_data):
    root, logs = round_trip
    assert "inference: [2/2] 100%" in logs["infer"]  # progress, case by case
    for case in TEST_CASES:
        image = nib.load(shared_data / "sts" / case / "CT_image.nii.gz")
        pred = nib.load(root / "eval" / case / "CT_image_seg.nii.gz")  # sub-folders kept: every STS image has one name
        assert pred.shape == image.shape
        np.testing.assert_allclose(pred.affine, image.affine, atol=1e-4)
        values = np.unique(np.asarray(pred.dataobj))
        assert set(values.tolist()) <= {0, 1} and pred.get_data_dtype() == np.uint8


def test_torchscript_export_runs_like_the_checkpoint(round_trip, repo_root, shared_data):
    """`ckpt_export` scripts the network (the model zoo's default, no tracing); it segments a CT patch as eagerly."""
    root, _ = round_trip
    ts = root / "models" / "model.ts"
    bundle(
        repo_root,
        "ckpt_export",
        "network_def",
        "--filepath",
        str(ts),
        "--ckpt_file",
        str(root / "models" / "model.pt"),
        "--meta_file",
        config(repo_root, "metadata.json"),
        "--config_file",
        config(repo_root, "inference.json"),
        *cli(SMALL),
    )
    exported = torch.jit.load(str(ts))
    assert "if channels_last:" in exported.encoder.code  # scripted, not traced: the branch is compiled, not unrolled
    parser = ConfigParser()
    parser.read_config(config(repo_root, "inference.json"))
    parser.update(SMALL)
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(root / "models" / "model.pt", map_location="cpu", weights_only=True))
    path = str(shared_data / "sts" / "STS_002" / "CT_image.nii.gz")
    image = parser.get_parsed_content("preprocessing")({"image": path})["image"]  # RAS, HU window to [0, 1]
    x = image[None, :, 40:136, 30:94, 10:34].as_tensor()  # 96 x 64 x 24, not the training patch
    assert x.shape == (1, 1, 96, 64, 24) and 0.0 <= x.min() < x.max() <= 1.0
    with torch.no_grad():
        expected = net.eval()(x)
        torch.testing.assert_close(exported(x), expected)
    assert expected.shape == (1, len(LABELS), 96, 64, 24)


def test_network_matches_its_metadata(repo_root):
    """The shipped network (ResNet-50 encoder, 6 classes) against metadata.json's network_data_format."""
    log = bundle(
        repo_root,
        "verify_net_in_out",
        "network_def",
        "--meta_file",
        config(repo_root, "metadata.json"),
        "--config_file",
        config(repo_root, "inference.json"),
        "--device",
        "cpu",
        "--n",
        "2",
    )
    assert "data shape of network is verified with no error" in log


def test_train_properties(repo_root, tmp_path):
    """The shipped train.json, on its default (synthetic) data, as MONAI's train workflow."""
    workflow = ConfigWorkflow(
        config_file=config(repo_root, "train.json"),
        workflow_type="train",
        meta_file=config(repo_root, "metadata.json"),
        logging_file=False,
        bundle_root=str(tmp_path),
        cache_rate=0,
    )
    workflow.initialize()
    assert workflow.check_properties() == []


def test_infer_properties(round_trip, repo_root, tmp_path):
    root, _ = round_trip
    workflow = ConfigWorkflow(
        config_file=config(repo_root, "inference.json"),
        workflow_type="infer",
        meta_file=config(repo_root, "metadata.json"),
        logging_file=False,
        bundle_root=str(root),
        output_dir=str(tmp_path),  # root/eval holds the round trip's label maps, which a new run does not replace
        **SMALL,
    )
    workflow.initialize()  # loads models/model.pt
    assert workflow.check_properties() == []


def test_inference_preprocessing_tolerates_monai_label_image_path(repo_root, shared_data):
    """MONAI Label adds the string "image_path"; monai 1.6.1's Spacingd would call .update() on it."""
    path = str(shared_data / "sts" / "STS_002" / "CT_image.nii.gz")
    load = LoadImaged("image", image_only=True, ensure_channel_first=True)
    stock = Compose([load, Spacingd("image", (2.0, 2.0, 4.0))])
    with pytest.raises(RuntimeError, match="Spacingd"):  # the trap is real in this MONAI version
        stock({"image": path, "image_path": path})

    parser = ConfigParser()
    parser.read_config(config(repo_root, "inference.json"))
    parser.update({"pixdim": [2.0, 2.0, 4.0]})
    data = parser.get_parsed_content("preprocessing")({"image": path, "image_path": path})
    assert data["image_path"] == path and set(data) == {"image", "image_path"}
    np.testing.assert_allclose(data["image"].pixdim, [2.0, 2.0, 4.0])
    assert data["image"].shape[1:] == (79, 70, 39)  # 161 x 143 x 48 voxels of 0.977 x 0.977 x 3.27 mm


def test_monai_label_infer_task_flow(round_trip, repo_root, shared_data):
    """What MONAI Label's BundleInferTask does with the bundle, step by step (monailabel is not a dependency)."""
    root, _ = round_trip
    metadata = json.loads((repo_root / "configs" / "metadata.json").read_text())
    data_format = metadata["network_data_format"]
    (key_image, _), (key_pred, pred) = (next(iter(data_format[k].items())) for k in ("inputs", "outputs"))
    assert (key_image, key_pred) == ("image", "pred")
    assert pred["channel_def"] == {
        "0": "background",
        "1": "liver",
        "2": "spleen",
        "3": "right kidney",
        "4": "left kidney",
        "5": "aorta",
    }

    parser = ConfigParser()
    parser.read_config(config(repo_root, "inference.json"))
    # resampled on the way in and inverted on the way out, as for a model whose plan says 1.5 x 1.5 x 4 mm
    plan = {**PLAN_DEFAULTS, **ENCODER, "pixdim": [1.5, 1.5, 4.0]}
    parser.config.update({"bundle_root": str(root), **SMALL, "plan": plan})
    network = parser.get_parsed_content("network_def", instantiate=True)
    checkpoint = torch.load(root / "models" / "model.pt", map_location="cpu", weights_only=True)
    network.load_state_dict(checkpoint.get("model", checkpoint), strict=True)
    pre = list(parser.get_parsed_content("preprocessing", instantiate=True).transforms)
    post = [
        t
        for t in parser.get_parsed_content("postprocessing", instantiate=True).transforms
        if not isinstance(t, SaveImaged)
    ]
    inferer = parser.get_parsed_content("inferer", instantiate=True)

    path = str(shared_data / "sts" / "STS_002" / "CT_image.nii.gz")
    data = Compose(pre)({"image": path, "image_path": path, "model": "pgl", "device": "cpu"})
    with torch.no_grad():
        data["pred"] = inferer(data["image"][None], network.eval())[0]
    data = Compose(post)(data)
    assert data["pred"].shape == (1, *nib.load(path).shape) and data["image_path"] == path


def test_monai_label_train_task_flow(round_trip, repo_root, shared_data, tmp_path, caplog):
    """MONAI Label's BundleTrainTask: `run` with these overrides, no `initialize`, a CheckpointLoader prepended."""
    root, _ = round_trip
    parser = ConfigParser()
    parser.read_config(config(repo_root, "train.json"))
    # BundleTrainTask looks for a loader among the handlers with handler.get("_target_"): each must be a component
    assert all(isinstance(h, dict) and "_target_" in h for h in parser.get("train#handlers"))
    loader = {
        "_target_": "CheckpointLoader",
        "load_path": str(root / "models" / "model.pt"),
        "load_dict": {"model": "$@network"},
        "strict": False,
    }
    overrides = {
        "bundle_root": str(tmp_path),
        "train#trainer#max_epochs": 1,  # MONAI Label's "epochs": here, runs of val_interval iterations
        "val_interval": 2,
        "train#dataset#data": items(shared_data, TRAIN_CASES[:1]),
        "validate#dataset#data": items(shared_data, VAL_CASES),
        "device": torch.device("cpu"),
        "train#handlers": [loader, *parser.get("train#handlers")],
    }
    with caplog.at_level(logging.INFO):
        bundle_run(
            run_id="run",
            init_id=None,
            final_id=None,
            meta_file=config(repo_root, "metadata.json"),
            config_file=config(repo_root, "train.json"),
            logging_file=False,
            **SMALL,
            **overrides,
        )
    assert f"Restored all variables from {root / 'models' / 'model.pt'}" in caplog.text
    assert (tmp_path / "models" / "model.pt").is_file()
    assert not (tmp_path / "data").exists()  # the datalists came from MONAI Label: no default data was made


def test_fine_tuning_learns_one_case(repo_root, shared_data, tmp_path):
    """Learning sanity: the whole loop (sampling, loss, optimiser, sliding-window validation) fits one STS case.

    Seeded; 4 mm in-plane so that a 48 x 48 x 16 patch holds most of the tumour and its context, which makes 100
    CPU iterations of the small network enough to reach a Dice of 0.8 on the case it trains on (0.905 measured).
    Validated with windows of the patch: at 4 mm the volume (62 x 62 x 47) is narrower than the default window, which
    would pad it with half a window of constant intensity.
    """
    case = items(shared_data, ["STS_001"])  # a large tumour: 94 x 98 x 31 voxels
    workflow = ConfigWorkflow(
        config_file=config(repo_root, "train.json"),
        workflow_type="train",
        logging_file=False,
        bundle_root=str(tmp_path),
        **{**SMALL, "pixdim": [4.0, 4.0, 3.27], "patch_size": [48, 48, 16], "sw_roi_size": [48, 48, 16]},
        sw_overlap=0.25,
        batch_size=1,
        num_samples=4,
        num_iterations=100,
        val_interval=100,
        seed=0,
        **{"train#dataset#data": case, "validate#dataset#data": case},
    )
    workflow.initialize()
    workflow.run()
    state = workflow.evaluator.state
    assert state.best_metric >= 0.8, f"best val_mean_dice {state.best_metric:.3f} at epoch {state.best_metric_epoch}"


def test_window_and_encoder_are_one_setting_for_every_stage(repo_root):
    """A pretrained encoder expects its pretraining window and arguments: downstream configs take them from its
    adaptation plan (null: not given), with pretrain.json's values as the defaults; no overlay moves them."""
    configs = {c.name: json.loads(c.read_text()) for c in (repo_root / "configs").glob("*.json")}
    assert configs["prepare.json"]["hu_window"] == "%configs/pretrain.json#hu_window"  # a reference, not a copy
    assert {k: configs["pretrain.json"][k] for k in PLAN_DEFAULTS} == PLAN_DEFAULTS
    for name in ("train.json", "inference.json"):
        assert all(configs[name][k] is None for k in PLAN_DEFAULTS), name
    assert not [name for name, c in configs.items() if set(PLAN_DEFAULTS) & set(c) and name not in WITH_PLAN_KEYS]
    shared = ("patch_size", "decoder_channels", "label_names")
    assert {k: configs["inference.json"][k] for k in shared} == {k: configs["train.json"][k] for k in shared}


def test_validation_evaluation_and_inference_share_one_sliding_window(repo_root):
    """Test Dice is measured the way users get their masks: the same window, overlap and blending."""
    inferers = {}
    for name, configs, key in (
        ("validation", ["train.json"], "validate#inferer"),
        ("evaluation", ["train.json", "evaluate.json"], "validate#inferer"),
        ("inference", ["inference.json"], "inferer"),
    ):
        parser = ConfigParser()
        parser.read_config([config(repo_root, c) for c in configs])
        inferer = parser.get_parsed_content(key)
        inferers[name] = [list(inferer.roi_size), inferer.overlap, inferer.sw_batch_size, inferer.mode]
    expected = list(SLIDING_WINDOW.values())
    assert inferers == {"validation": expected, "evaluation": expected, "inference": expected}


def test_encoder_gets_its_own_learning_rate_and_every_group_a_warm_up(repo_root):
    parser = ConfigParser()
    parser.read_config(config(repo_root, "train.json"))
    parser.update(
        {**SMALL, "learning_rate": 1e-3, "encoder_lr_scale": 0.1, "warmup_iterations": 10, "num_iterations": 100}
    )
    net, optimizer = parser.get_parsed_content("network_def"), parser.get_parsed_content("optimizer")
    encoder = [g for g in optimizer.param_groups if g["name"].startswith("encoder")]
    assert {id(p) for g in encoder for p in g["params"]} == {id(p) for p in net.encoder.parameters()}
    peaks = [1e-4 if g["name"].startswith("encoder") else 1e-3 for g in optimizer.param_groups]
    scheduler = parser.get_parsed_content("lr_scheduler")  # per iteration: 0 at the start, the peak after warm-up
    assert [g["lr"] for g in optimizer.param_groups] == [0.0] * len(peaks)
    for _ in range(10):
        optimizer.step()
        scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx(peaks, rel=0.01)
