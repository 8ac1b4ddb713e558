"""The comparison command end to end on the tiny preset, and the BYOL config's bundle properties."""

from __future__ import annotations

import csv
import os

import pytest
from monai.bundle import ConfigWorkflow

from pgl_bundle.compare import PRESETS, _arms, compare


@pytest.fixture(scope="module")
def tiny_comparison(shared_data, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("compare")
    results = compare(
        labelled=str(shared_data / "sts"), unlabelled=[str(shared_data / "unlabeled")], output_dir=str(output_dir),
        preset="tiny",
    )
    return output_dir, results


def test_outputs_have_one_row_per_arm_and_budget(tiny_comparison):
    output_dir, results = tiny_comparison
    settings = PRESETS["tiny"]
    arms = _arms(settings["pretrain_epochs"], settings["lr_scales"])
    assert {a.init for a in arms} == {"random", "pgl", "byol"}
    with open(output_dir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    cells = {(r["arm"], int(r["budget"])) for r in rows}
    assert cells == {(a.name, n) for a in arms for n in settings["budgets"]}
    assert len(rows) == len(arms) * len(settings["budgets"]) * len(settings["seeds"]) * settings["num_test_cases"]
    assert all(0.0 <= float(r["dice"]) <= 1.0 for r in rows)
    table = open(results).read().splitlines()
    for arm in arms:
        line = next(line for line in table if line.startswith(f"| {arm.name} |"))
        assert line.count("±") == len(settings["budgets"])
    png = output_dir / "results.png"
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"


def test_finished_stages_are_not_recomputed(tiny_comparison, shared_data):
    output_dir, _ = tiny_comparison
    encoder = output_dir / "pretrain" / "pgl_1ep" / "models" / "pretrained_encoder.pt"
    evaluation = next((output_dir / "finetune").glob("random_*")) / "eval" / "val_mean_dice_raw.csv"
    stamps = [os.stat(p).st_mtime_ns for p in (encoder, evaluation)]
    compare(labelled=str(shared_data / "sts"), unlabelled=[str(shared_data / "unlabeled")],
            output_dir=str(output_dir), preset="tiny")
    assert [os.stat(p).st_mtime_ns for p in (encoder, evaluation)] == stamps


def test_byol_config_properties(repo_root):
    configs = [str(repo_root / "configs" / c) for c in ("pretrain.json", "pretrain_byol.json")]
    workflow = ConfigWorkflow(config_file=configs, workflow_type="train",
                              meta_file=str(repo_root / "configs" / "metadata.json"),
                              logging_file=str(repo_root / "configs" / "logging.conf"))
    workflow.initialize()
    assert not workflow.check_properties()
    assert workflow.parser.get_parsed_content("network_def").aligner is None
