"""The dense probe: configs/probe.json on real CT with the encoder really frozen, the head's resampling, and the
probe-curve command on tiny pretraining runs."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from monai.bundle import ConfigWorkflow
from pgl_bundle.experiments.probe_curve import probe_curve
from pgl_bundle.experiments.runner import checkpoints_by_iteration
from pgl_bundle.networks import DenseProbe, PGLResNetEncoder, feature_grid
from pgl_bundle.transfer import load_online_encoder, load_pretrained_encoder

LABELS = ["background", "tumour"]
TINY = {
    "encoder_layers": [1, 1, 1, 1],
    "encoder_block": "basic",
    "encoder_width": [16, 16, 32, 32],
    "patch_size": [64, 64, 16],
    "label_names": LABELS,
    "num_workers": 0,
    "batch_size": 1,
    "num_samples": 2,
}


def probe_workflow(repo_root, tmp_path, shared_data, **overrides) -> ConfigWorkflow:
    sts = shared_data / "sts"
    cases = ["STS_001", "STS_002", "STS_030"]  # two training cases, one test case
    items = [{"image": str(sts / c / "CT_image.nii.gz"), "label": str(sts / c / "CT_mask.nii.gz")} for c in cases]
    (tmp_path / "dataset.json").write_text(json.dumps({"training": items}))
    configs = [str(repo_root / "configs" / c) for c in ("train.json", "evaluate.json", "probe.json")]
    workflow = ConfigWorkflow(
        config_file=configs,
        workflow_type="train",
        logging_file=False,
        meta_file=str(repo_root / "configs" / "metadata.json"),
        bundle_root=str(tmp_path),
        dataset_dir=str(tmp_path / "dataset.json"),
        num_val_cases=0,
        num_test_cases=1,
        probe_iterations=3,
        **TINY,
        **overrides,
    )
    workflow.initialize()
    return workflow


def test_probe_workflow_trains_only_the_head(repo_root, tmp_path, shared_data):
    """End to end on real CT: the head learns, the encoder (weights and BatchNorm statistics) does not move, gets no
    gradient and stays in eval mode through the trainer's network.train(); the test Dice per case is written."""
    workflow = probe_workflow(repo_root, tmp_path, shared_data)
    assert workflow.check_properties() == []
    network = workflow.parser.get_parsed_content("network")
    encoder_before = {k: v.clone() for k, v in network.encoder.state_dict().items()}
    head_before = {k: v.clone() for k, v in network.head.state_dict().items()}
    workflow.parser.get_parsed_content("train#trainer").run()
    # the head's learning rate decays on a cosine to 0 at the last of probe_iterations (3 here)
    assert workflow.parser.get_parsed_content("optimizer").param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-9)
    assert not network.encoder.training and all(p.grad is None for p in network.encoder.parameters())
    changed = [k for k, v in network.encoder.state_dict().items() if not torch.equal(v, encoder_before[k])]
    assert changed == [], f"frozen encoder changed: {changed[:5]}"
    assert any("running_mean" in k for k in encoder_before)  # the BatchNorm statistics are among those compared
    assert any(not torch.equal(v, head_before[k]) for k, v in network.head.state_dict().items() if "classifiers" in k)
    workflow.parser.get_parsed_content("validate#evaluator").run()
    with open(tmp_path / "eval" / "probe" / "val_mean_dice_raw.csv") as f:
        rows = list(csv.reader(f))
    assert len(rows) == 2 and rows[1][0].endswith("STS_030/CT_image.nii.gz") and 0 <= float(rows[1][-1]) <= 1


def test_feature_grid_reads_each_feature_voxel_at_its_centre():
    """Stride 2 (offset -0.5): feature voxel k is centred on input voxel 2k, so it is read there exactly."""
    features = torch.zeros(1, 1, 4, 1, 1)
    features[0, 0, 2] = 1.0
    grid = feature_grid((8, 1, 1), (4, 1, 1), (2, 1, 1), (-0.5, 0.0, 0.0))
    read = torch.nn.functional.grid_sample(features, grid, align_corners=True)[0, 0, :, 0, 0]
    assert read.tolist() == [0.0, 0.0, 0.0, 0.5, 1.0, 0.5, 0.0, 0.0]


def test_probe_output_covers_the_input(repo_root):
    encoder = PGLResNetEncoder(layers=[1, 1, 1, 1], block="basic", block_inplanes=[8, 8, 16, 16])
    probe = DenseProbe(encoder, num_classes=3).train()
    logits = probe(torch.rand(2, 1, 32, 32, 16))
    assert logits.shape == (2, 3, 32, 32, 16) and logits.requires_grad
    assert [n for n, p in probe.named_parameters() if p.requires_grad] == [
        n for n, _ in probe.named_parameters() if n.startswith("head.")
    ]


@pytest.fixture(scope="module")
def tiny_curve(shared_data, tmp_path_factory):
    """Both methods pretrained here for 2 iterations on two small CTs (a checkpoint at each: an epoch is one batch),
    probed at 0 and 2 with one seed."""
    output_dir = tmp_path_factory.mktemp("probe_curve")
    table = probe_curve(
        labelled=str(shared_data / "sts"),
        output_dir=str(output_dir),
        unlabelled=[str(shared_data / "sts" / "STS_00[34]" / "CT_image.nii.gz")],
        iterations=[0, 2],
        seeds=[0],
        num_train_cases=2,
        num_test_cases=1,
        probe_iterations=2,
        preset="tiny",
        parallel=3,  # the three probes at once, as on a GPU
    )
    return output_dir, table


def test_curve_writes_csv_table_and_plot(tiny_curve):
    output_dir, table = tiny_curve
    with open(output_dir / "probe_curve.csv") as f:
        rows = list(csv.DictReader(f))
    points = sorted({(r["method"], int(r["iteration"])) for r in rows})
    assert points == [("byol", 2), ("pgl", 2), ("random", 0)]
    assert all(r["case"] == "STS_030/CT_image.nii.gz" and 0 <= float(r["dice"]) <= 1 for r in rows)
    lines = open(table).read().splitlines()
    assert lines[0] == "| method | 0 (random init) | 2 |" and lines[2].startswith("| pgl | ")
    png = output_dir / "probe_curve.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 1000


def test_curve_probes_the_checkpoint_of_each_iteration(tiny_curve, repo_root):
    """The probe at iteration 2 read the full checkpoint of iteration 2, whose online encoder is the final one, not a
    fresh random initialisation."""
    output_dir, _ = tiny_curve
    run = output_dir / "pretrain" / "pgl"
    checkpoints = checkpoints_by_iteration(str(run))
    assert 2 in checkpoints  # the epoch saver keeps only the newest epoch, the iteration saver every requested one
    log = (output_dir / "probes" / "pgl_it2_seed0" / "log.txt").read_text()
    assert f"--pretraining_checkpoint {checkpoints[2]}" in log

    def probe():
        return DenseProbe(PGLResNetEncoder(layers=[1, 1, 1, 1], block="basic", block_inplanes=[16, 16, 32, 32]), 2)

    final = load_pretrained_encoder(probe(), run / "models" / "pretrained_encoder.pt")
    at_2 = load_online_encoder(probe(), checkpoints[2])
    assert all(torch.equal(v, at_2.encoder.state_dict()[k]) for k, v in final.encoder.state_dict().items())
    torch.manual_seed(0)
    assert not torch.equal(probe().encoder.conv1.weight, at_2.encoder.conv1.weight)


def test_finished_probes_are_skipped(tiny_curve, shared_data):
    output_dir, _ = tiny_curve
    result = output_dir / "probes" / "byol_it2_seed0" / "eval" / "probe" / "val_mean_dice_raw.csv"
    stamp = result.stat().st_mtime_ns
    probe_curve(
        labelled=str(shared_data / "sts"),
        output_dir=str(output_dir),
        iterations=[0, 2],
        seeds=[0],
        num_train_cases=2,
        num_test_cases=1,
        probe_iterations=2,
        preset="tiny",
        pgl_run=str(output_dir / "pretrain" / "pgl"),
        byol_run=str(output_dir / "pretrain" / "byol"),
    )
    assert result.stat().st_mtime_ns == stamp


def test_missing_checkpoint_is_named(tiny_curve, shared_data):
    output_dir, _ = tiny_curve
    with pytest.raises(FileNotFoundError, match=r"pgl/models/checkpoints: no checkpoint at iteration\(s\) \[3\]"):
        probe_curve(
            labelled=str(shared_data / "sts"),
            output_dir=str(output_dir),
            iterations=[3],
            seeds=[0],
            preset="tiny",
            pgl_run=str(output_dir / "pretrain" / "pgl"),
        )


def test_report_only_runs_nothing_and_names_the_unfinished(tiny_curve, shared_data):
    output_dir, _ = tiny_curve
    table = probe_curve(
        labelled=str(shared_data / "sts"),
        output_dir=str(output_dir),
        iterations=[0, 2],
        seeds=[0, 1],
        preset="tiny",
        report_only=True,
    )
    assert not (output_dir / "probes" / "random_it0_seed1").exists()
    text = open(table).read()
    assert "| pgl | " in text and "(1 seeds, " in text
    assert "left out: random_it0_seed1, pgl_it2_seed1, byol_it2_seed1." in text
