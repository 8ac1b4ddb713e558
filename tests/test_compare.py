"""The comparison command end to end on the tiny preset, its selection on validation, the label-budget curve's runs
and their probes, the encoders asked for, the pretraining set without validation and test images, the BYOL config's
properties."""

from __future__ import annotations

import csv
import json
import os
import re
import sys

import pytest
from monai.bundle import ConfigWorkflow
from pgl_bundle.experiments.compare import compare, pretraining_volumes
from pgl_bundle.experiments.encoder_choice import best_iterations
from pgl_bundle.experiments.fine_tunes import Run, curve_runs, probe_runs, select, stretched
from pgl_bundle.experiments.presets import PRESETS, strategy_overrides
from pgl_bundle.experiments.report import verdict, write_report
from pgl_bundle.experiments.runner import best_validation_dice, check_same_settings
from pgl_bundle.experiments.stats import PairedDifference
from pgl_bundle.transfer import PLAN_DEFAULTS, write_plan


@pytest.fixture(scope="module")
def tiny_comparison(shared_data, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("compare")
    results = compare(
        labelled=str(shared_data / "sts"),
        unlabelled=[str(shared_data / "unlabeled")],
        output_dir=str(output_dir),
        preset="tiny",
    )
    return output_dir, results


def test_outputs_have_one_row_per_run_and_test_case_with_the_probe(tiny_comparison):
    output_dir, results = tiny_comparison
    settings = PRESETS["tiny"]
    with open(output_dir / "selection.csv") as f:
        selection = list(csv.DictReader(f))
    assert {(r["encoder"], r["strategy"]) for r in selection} == {("random", "lp-ft"), ("pgl1", "lp-ft")}
    assert all(0.0 <= float(r["best_val_mean_dice"]) <= 1.0 for r in selection)
    with open(output_dir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * settings["num_test_cases"]
    assert {r["encoder"] for r in rows} == {"random", "pgl1"}
    assert all(0.0 <= float(r["dice"]) <= 1.0 and 0.0 <= float(r["probe_dice"]) <= 1.0 for r in rows)
    # the cases are the dataset's last ones, tested through evaluate.json
    assert {os.path.basename(os.path.dirname(r["case"])) for r in rows} == {"STS_029", "STS_030"}
    run = output_dir / "finetune" / "pgl1_lp-ft_x1_n2_seed0"
    log = (run / "log.txt").read_text()
    assert "--linear_probe_iterations 1" in log and f"--model_file {run}/models/linear_probe.pt" in log
    table = open(results).read()
    assert re.search(r"\| pgl1 \| lp-ft \(x1\) \| 2 \| 1 \| [0-9.]+ \| [0-9.]+ \| [0-9.]+ \| [-+0-9.]+ \[", table)
    assert "random: lp-ft (x1); pgl: lp-ft (x1)" in table
    png = output_dir / "results.png"
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"


def test_the_encoders_iteration_is_chosen_by_the_probe_on_validation_cases_only(tiny_comparison):
    output_dir, _ = tiny_comparison
    with open(output_dir / "encoder_choice.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["iteration"]) for r in rows] == [("pgl", "1"), ("pgl", "2")]
    scores = {int(r["iteration"]): float(r["validation_probe_dice"]) for r in rows}
    chosen = [int(r["iteration"]) for r in rows if r["chosen"] == "True"]
    assert chosen == [max(scores, key=lambda i: (scores[i], -i))]
    # the probes train on the selection budget's cases and are scored on the validation case, never a test case
    probed = json.loads((output_dir / "encoder_choice" / "labelled.json").read_text())["training"]
    assert [os.path.basename(os.path.dirname(item["image"])) for item in probed] == ["STS_001", "STS_002", "STS_028"]
    assert (output_dir / "finetune" / f"pgl{chosen[0]}_lp-ft_x1_n2_seed0" / "eval" / "val_mean_dice_raw.csv").is_file()


def test_best_iteration_ties_go_to_the_earlier_one():
    assert best_iterations({("pgl", 500): 0.3, ("pgl", 250): 0.3, ("byol", 500): 0.2, ("byol", 1000): 0.25}) == {
        "pgl": 250,
        "byol": 1000,
    }


def _openkbp_sized(tmp_path):
    """A dataset.json of 90 empty cases: the openkbp preset's split and budgets fit it."""
    dataset = tmp_path / "dataset.json"
    items = [{"image": f"pt_{i}.nii.gz", "label": f"pt_{i}_label.nii.gz"} for i in range(90)]
    for item in items:
        for path in item.values():
            (tmp_path / path).touch()
    dataset.write_text(json.dumps({"training": items}))
    return dataset


def test_openkbp_compares_every_encoder_with_pgls_recipe_and_each_at_its_own_best(tmp_path, monkeypatch):
    dataset = _openkbp_sized(tmp_path)
    stages = {}

    def record(function, jobs, parallel, desc):  # the stages' jobs, none run; random is best with LP-FT
        stages[desc] = [job[0] for job in jobs]
        return [
            0.6 if isinstance(r, Run) and (r.encoder, r.strategy) == ("random", "lp-ft") else 0.5 for r in stages[desc]
        ]

    module = sys.modules["pgl_bundle.experiments.compare"]
    monkeypatch.setattr(module, "run_all", record)
    monkeypatch.setattr(module, "choose_iterations", lambda *args: {"pgl": 1500, "byol": 500})
    compare(str(dataset), output_dir=str(tmp_path / "out"), preset="openkbp", unlabelled=[str(dataset)])
    assert {r.encoder for r in stages["selection"]} == {"random", "pgl1500", "byol500"}
    lengths = [r for r in stages["curve"] if r.iterations]
    assert sorted({(r.encoder, r.strategy, r.budget, r.iterations) for r in lengths}) == [
        (e, "joint", 5, n) for e in ("byol500", "pgl1500", "random") for n in (100, 200, 600)
    ]
    assert len(lengths) == 9 * 3 and stages["curve"][-len(lengths) :] == lengths  # every seed, after the curve
    same_recipe = [r for r in stages["curve"] if (r.strategy, r.scale) == ("joint", 0.1) and not r.iterations]
    assert sorted({(r.encoder, r.budget) for r in same_recipe}) == [
        (e, b) for e in ("byol500", "pgl1500", "random") for b in (2, 5, 10, 20)
    ]
    assert len(same_recipe) == 12 * 3  # every seed
    # every seed at 5 and 20 patients before any run at 2 or 10
    first = [r.budget in (5, 20) for r in stages["curve"] if not r.iterations]
    assert first == sorted(first, reverse=True) and {r.seed for r in stages["curve"] if r.budget == 20} == {0, 1, 2}
    # best against best: random at its own selected recipe, at the selection budget, every seed
    own = [r for r in stages["curve"] if r not in same_recipe and not r.iterations]
    assert sorted((r.encoder, r.strategy, r.scale, r.budget, r.seed) for r in own) == [
        ("random", "lp-ft", 0.1, 5, seed) for seed in (0, 1, 2)
    ]


def test_a_comparison_can_stop_after_its_first_budgets_and_refuses_an_unknown_stop(tmp_path, monkeypatch):
    dataset = _openkbp_sized(tmp_path)
    stages = _record_stages(monkeypatch, {"pgl": 1500, "byol": 500})
    kwargs = {"output_dir": str(tmp_path / "out"), "preset": "openkbp", "unlabelled": [str(dataset)]}
    compare(str(dataset), stop_after="first_budgets", **kwargs)
    # every arm and seed at 5 and 20 patients, PGL's recipe and best against best; no 2, 10 or stretched schedule
    assert {(r.budget, r.iterations) for r in stages["curve"]} == {(5, 0), (20, 0)}
    assert len(stages["curve"]) == 3 * 2 * 3
    with pytest.raises(ValueError, match="stop_after 'first_budget': 'pretrain', 'first_budgets' or ''"):
        compare(str(dataset), stop_after="first_budget", **kwargs)


def test_encoders_are_written_with_their_adaptation_plan(tiny_comparison):
    output_dir, _ = tiny_comparison
    encoder = output_dir / "pretrain" / "pgl" / "encoders" / "iteration_1.pt"
    plan = json.loads(encoder.with_suffix(".json").read_text())
    assert plan["encoder_width"] == PRESETS["tiny"]["model"]["encoder_width"] and plan["patch_size"] == [64, 64, 16]
    # where it came from: the pretraining run's record, at the encoder's own iteration
    assert plan["pretraining"]["iteration"] == 1 and plan["pretraining"]["data"]["num_volumes"] == 3
    assert (
        f"--pretrained_encoder {encoder}"
        in (output_dir / "finetune" / "pgl1_lp-ft_x1_n2_seed0" / "log.txt").read_text()
    )


def test_finished_stages_are_not_recomputed(tiny_comparison, shared_data):
    output_dir, _ = tiny_comparison
    encoder = output_dir / "pretrain" / "pgl" / "encoders" / "iteration_1.pt"
    evaluation = output_dir / "finetune" / "random_lp-ft_x1_n2_seed0" / "eval" / "val_mean_dice_raw.csv"
    stamps = [os.stat(p).st_mtime_ns for p in (encoder, evaluation)]
    compare(
        labelled=str(shared_data / "sts"),
        unlabelled=[str(shared_data / "unlabeled")],
        output_dir=str(output_dir),
        preset="tiny",
    )
    assert [os.stat(p).st_mtime_ns for p in (encoder, evaluation)] == stamps


def test_pretraining_set_leaves_out_validation_and_test_images(shared_data):
    items = [{"image": str(shared_data / "sts" / f"STS_{i:03d}" / "CT_image.nii.gz")} for i in range(1, 31)]
    kept = pretraining_volumes([str(shared_data / "sts"), str(shared_data / "unlabeled")], items, held_out=20)
    names = [os.path.relpath(item["image"], shared_data) for item in kept]
    assert names[:10] == [f"sts/STS_{i:03d}/CT_image.nii.gz" for i in range(1, 11)]
    assert len(names) == 13 and all(n.startswith("unlabeled/") for n in names[10:])


def test_strategy_and_factor_are_selected_on_validation_per_method():
    scores = {
        Run("random", "joint", 0.1, 5, 0): 0.30,
        Run("random", "joint", 1.0, 5, 0): 0.35,
        Run("random", "lp-ft", 1.0, 5, 0): 0.35,  # a tie: the earlier strategy wins
        Run("pgl375", "joint", 1.0, 5, 0): 0.33,
        Run("pgl375", "lp-ft", 0.1, 5, 0): 0.40,
        Run("pgl375", "lp-ft", 0.3, 5, 0): 0.40,  # a tie: the smaller factor wins
    }
    factors, chosen = select(scores)
    assert chosen == {"random": "joint", "pgl": "lp-ft"}
    assert factors == {("random", "joint"): 1.0, ("random", "lp-ft"): 1.0, ("pgl", "joint"): 1.0, ("pgl", "lp-ft"): 0.1}


def test_curve_gives_each_encoder_its_methods_choice_and_byol_pgls():
    factors = {("random", "joint"): 1.0, ("random", "lp-ft"): 0.3, ("pgl", "lp-ft"): 0.1, ("pgl", "joint"): 1.0}
    chosen = {"random": "joint", "pgl": "lp-ft"}
    runs = curve_runs(["random", "pgl375", "byol375"], chosen, factors, ["lp-ft"], [1, 5], {"byol375": [5]}, [0, 1])
    cells = sorted({(r.encoder, r.strategy, r.scale, r.budget) for r in runs})
    assert cells == [
        ("byol375", "lp-ft", 0.1, 5),
        ("pgl375", "lp-ft", 0.1, 1),
        ("pgl375", "lp-ft", 0.1, 5),
        ("random", "joint", 1.0, 1),
        ("random", "joint", 1.0, 5),
        ("random", "lp-ft", 0.3, 1),
        ("random", "lp-ft", 0.3, 5),
    ]
    assert len(runs) == 2 * len(cells)  # every seed


def test_a_stretched_schedule_keeps_the_recipes_proportions():
    schedule = {"num_iterations": 300, "val_interval": 100, "warmup_iterations": 20}
    assert stretched(schedule, 600) == {"num_iterations": 600, "val_interval": 200, "warmup_iterations": 40}
    assert strategy_overrides("lp-ft", {**schedule, **stretched(schedule, 150)})["linear_probe_iterations"] == 50


def test_strategies_resolve_their_phases_from_the_validation_schedule():
    schedule = {"val_interval": 100}
    assert strategy_overrides("lp-ft", schedule) == {
        "linear_probe_iterations": 100,
        "freeze_encoder_iterations": 50,
        "encoder_warmup_iterations": 50,
    }
    assert strategy_overrides("joint", schedule) == {}


def test_unknown_strategy_is_refused(shared_data, tmp_path):
    with pytest.raises(ValueError, match=r"unknown strategies \['lp'\]"):
        compare(str(shared_data / "sts"), output_dir=str(tmp_path), preset="tiny", strategies=["lp"])


def test_byol_config_properties(repo_root, tmp_path):
    configs = [str(repo_root / "configs" / c) for c in ("pretrain.json", "pretrain_byol.json")]
    workflow = ConfigWorkflow(
        config_file=configs,
        workflow_type="train",
        meta_file=str(repo_root / "configs" / "metadata.json"),
        logging_file=str(repo_root / "configs" / "logging.conf"),
        bundle_root=str(tmp_path),  # not the repository's models/, which may hold the quick start's run
    )
    workflow.initialize()
    assert not workflow.check_properties()
    assert workflow.parser.get_parsed_content("network_def").aligner is None


def test_a_training_without_validation_is_an_error_naming_its_log(tmp_path):
    (tmp_path / "log.txt").write_text("Epoch: 1/1, Iter: 1/1 -- train_loss: 1.0\n")
    with pytest.raises(RuntimeError, match=re.escape(f"{tmp_path}/log.txt: the training logged no validation")):
        best_validation_dice(str(tmp_path))


def _write_test(folder, dice: float, cases=("case0", "case1", "case2")):
    """A run's test result as evaluate.json writes it: case ``i`` scores ``dice + 0.01 i``."""
    folder.mkdir(parents=True)
    rows = [f"{case},{dice + 0.01 * i}" for i, case in enumerate(cases)]
    (folder / "val_mean_dice_raw.csv").write_text("filename,mean\n" + "\n".join(rows) + "\n")


def test_report_compares_an_arm_with_the_same_seeds_of_random(tmp_path):
    cases = [f"case{i}" for i in range(6)]
    dice = {("random", 0): 0.30, ("random", 1): 0.90, ("pgl375", 0): 0.40, ("byol375", 0): 0.35}  # random 1 far above
    dice |= {("pgl-openkbp", 0): 0.45, ("byol-openkbp", 0): 0.50}  # encoders pretrained elsewhere
    runs = [Run(encoder, "joint", 1.0, 5, seed) for encoder, seed in dice]
    for run in runs:
        _write_test(tmp_path / run.slug / "eval", dice[run.encoder, run.seed], cases)
    factors, chosen = {("random", "joint"): 1.0, ("pgl", "joint"): 1.0}, {"random": "joint", "pgl": "joint"}
    results = write_report(str(tmp_path), {}, runs, [], lambda run: str(tmp_path / run.slug), factors, chosen)
    row = next(line for line in open(results) if line.startswith("| pgl375 "))
    # pgl375 seed 0 - random seed 0 = +0.100 on every case; with random's seed 1 averaged in it would be -0.200; and
    # PGL - BYOL, same strategy
    assert row.rstrip().endswith("| +0.100 [+0.100, +0.100] | +0.100 [+0.100, +0.100] | +0.050 [+0.050, +0.050] |")
    # an external PGL encoder is set against the BYOL of the same pretraining
    row = next(line for line in open(results) if line.startswith("| pgl-openkbp "))
    assert row.rstrip().endswith("| +0.150 [+0.150, +0.150] | +0.150 [+0.150, +0.150] | -0.050 [-0.050, -0.050] |")


def test_an_encoder_without_a_probe_phase_gets_an_lp_ft_run_whose_probe_the_table_shows(tmp_path):
    factors = {("random", "lp-ft"): 1.0, ("pgl", "joint"): 1.0, ("pgl", "lp-ft"): 0.3}
    chosen = {"random": "lp-ft", "pgl": "joint"}
    curve = curve_runs(["random", "pgl1000", "byol375"], chosen, factors, [], [1, 5], {"byol375": [5]}, [0, 1])
    probes = probe_runs(curve, factors, seed=0)
    # random's LP-FT runs have their own probe; PGL's and BYOL's joint runs get one LP-FT run per budget
    assert probes == [
        Run("pgl1000", "lp-ft", 0.3, 1, 0),
        Run("pgl1000", "lp-ft", 0.3, 5, 0),
        Run("byol375", "lp-ft", 0.3, 5, 0),
    ]
    for run in [r for r in curve if r.encoder == "pgl1000" and r.budget == 5]:
        _write_test(tmp_path / run.slug / "eval", 0.40)
    _write_test(tmp_path / probes[1].slug / "eval", 0.38)
    _write_test(tmp_path / probes[1].slug / "eval_linear_probe", 0.30)
    results = write_report(str(tmp_path), {}, curve, probes, lambda run: str(tmp_path / run.slug), factors, chosen)
    row = next(line for line in open(results) if line.startswith("| pgl1000 | joint"))
    # probe Dice 0.310 (mean of 0.30, 0.31, 0.32); fine-tuned - probe +0.100 on every case
    assert "| 0.310 | +0.100 [+0.100, +0.100] |" in row
    assert any(line.startswith("| pgl1000 | lp-ft (x0.3) | 5 | 1 | 0.390 |") for line in open(results))


def _record_stages(monkeypatch, chosen_iterations=None):
    """Replace compare's stage runner with a recorder (no stage runs; every score 0.5); return ``{stage: jobs}``."""
    stages = {}

    def record(function, jobs, parallel, desc):
        stages[desc] = [job[0] for job in jobs]
        return [0.5] * len(jobs)

    module = sys.modules["pgl_bundle.experiments.compare"]
    monkeypatch.setattr(module, "run_all", record)
    if chosen_iterations:
        monkeypatch.setattr(module, "choose_iterations", lambda *args: chosen_iterations)
    return stages


def test_the_comparison_runs_and_pretrains_only_the_encoders_asked_for(shared_data, tmp_path, monkeypatch):
    stages = _record_stages(monkeypatch)
    kwargs = {"labelled": str(shared_data / "sts"), "output_dir": str(tmp_path), "preset": "gpu-10min"}
    compare(encoders=["random", "pgl150"], **kwargs)
    assert stages["pretrain"] == ["pgl"]  # BYOL's encoder is not asked for
    assert {r.encoder for r in stages["curve"]} == {"random", "pgl150"}
    with pytest.raises(ValueError, match=r"unknown encoders \['pgl500'\]"):
        compare(encoders=["random", "pgl500"], **kwargs)


def test_the_sarcoma_comparison_runs_both_strategies_for_every_arm_recipe_for_recipe(
    shared_data, tmp_path, monkeypatch
):
    stages = _record_stages(monkeypatch, {"pgl": 375, "byol": 750})
    compare(labelled=str(shared_data / "sts"), output_dir=str(tmp_path), preset="cpu")
    assert stages["pretrain"] == ["pgl", "byol"]
    assert sorted({(r.encoder, r.strategy, r.scale) for r in stages["selection"]}) == [
        (e, s, x) for e in ("byol750", "pgl375", "random") for s in ("joint", "lp-ft") for x in (0.1, 1.0)
    ]
    # every score ties: PGL's factors are the smaller ones; every arm runs joint and LP-FT at them, BYOL at 5 cases
    curve = stages["curve"]
    assert {(r.strategy, r.scale) for r in curve} == {("joint", 0.1), ("lp-ft", 0.1)}
    assert sorted({(r.encoder, r.budget) for r in curve}) == [("byol750", 5)] + [
        (e, b) for e in ("pgl375", "random") for b in (1, 2, 5, 10)
    ]
    assert len(curve) == (2 * 4 + 1) * 2 * 3  # (arm, budget) x strategy x seed; no extra probe run is needed


def _external_encoder(folder, plan):
    encoder = folder / "iteration_2000.pt"
    encoder.write_bytes(b"")
    write_plan(encoder, plan)
    return str(encoder)


def test_an_encoder_pretrained_elsewhere_is_fine_tuned_with_pgls_recipe_at_its_budgets(
    shared_data, tmp_path, monkeypatch
):
    stages = _record_stages(monkeypatch, {"pgl": 375, "byol": 750})
    plan = {**PLAN_DEFAULTS, **PRESETS["cpu"]["model"]}
    external = {"pgl-openkbp": _external_encoder(tmp_path, plan)}
    kwargs = {"labelled": str(shared_data / "sts"), "output_dir": str(tmp_path / "out"), "preset": "cpu"}
    compare(external_encoders=external, encoder_budgets={"pgl-openkbp": [2, 5]}, **kwargs)
    assert stages["pretrain"] == ["pgl", "byol"]  # the external encoder is neither pretrained nor selected
    assert "pgl-openkbp" not in {r.encoder for r in stages["selection"]}
    assert sorted((r.strategy, r.scale, r.budget, r.seed) for r in stages["curve"] if r.encoder == "pgl-openkbp") == [
        (s, 0.1, b, seed) for s in ("joint", "lp-ft") for b in (2, 5) for seed in (0, 1, 2)
    ]


def test_an_external_encoder_with_a_bad_name_file_or_plan_is_refused(shared_data, tmp_path):
    kwargs = {"labelled": str(shared_data / "sts"), "output_dir": str(tmp_path / "out"), "preset": "cpu"}
    other_model = _external_encoder(tmp_path, dict(PLAN_DEFAULTS))  # ResNet-50, not the cpu preset's model
    with pytest.raises(ValueError, match="name it <pgl|byol>-<tag>"):
        compare(external_encoders={"openkbp": other_model}, **kwargs)
    with pytest.raises(FileNotFoundError, match="missing.pt: external encoder 'pgl-a' not found"):
        compare(external_encoders={"pgl-a": str(tmp_path / "missing.pt")}, **kwargs)
    with pytest.raises(ValueError, match=r"iteration_2000.pt: its plan differs from the preset's: encoder_layers"):
        compare(external_encoders={"pgl-a": other_model}, **kwargs)


def test_stretched_schedules_get_their_rows_and_a_plot_against_iterations(tmp_path):
    runs = [Run(e, "joint", 0.1, 5, 0, n) for e in ("random", "pgl500") for n in (0, 100, 600)]
    for run in runs:
        _write_test(tmp_path / run.slug / "eval", 0.3 + run.iterations / 2000 + (run.encoder == "pgl500") / 10)
    factors, chosen = {("pgl", "joint"): 0.1}, {"pgl": "joint"}
    curve, lengths = [r for r in runs if not r.iterations], [r for r in runs if r.iterations]
    results = write_report(
        str(tmp_path), {}, curve, lengths, lambda r: str(tmp_path / r.slug), factors, chosen, (), 300
    )
    table = open(results).read().split("\n\n")[0].splitlines()  # the main table, not the decision table
    rows = [line.split(" | ")[:5] for line in table if line.startswith("| pgl500 ")]
    assert rows == [
        ["| pgl500", f"joint{n} (x0.1)", "5", "1", f"{d:.3f}"]
        for n, d in [("", 0.41), (", 100 it", 0.46), (", 600 it", 0.71)]
    ]
    png = tmp_path / "results_iterations.png"
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"


def test_one_strategy_at_two_factors_is_two_rows_each_compared_with_its_own(tmp_path):
    # random at PGL's recipe (joint x0.1) and at its own (joint x1.0): two rows, never averaged into one
    dice = {("random", 0.1): 0.30, ("random", 1.0): 0.50, ("pgl500", 0.1): 0.40}
    runs = [Run(encoder, "joint", scale, 5, seed) for encoder, scale in dice for seed in (0, 1)]
    for run in runs:
        _write_test(tmp_path / run.slug / "eval", dice[run.encoder, run.scale])
    factors = {("random", "joint"): 1.0, ("pgl", "joint"): 0.1}
    chosen = {"random": "joint", "pgl": "joint"}
    results = write_report(str(tmp_path), {}, runs, [], lambda run: str(tmp_path / run.slug), factors, chosen)
    rows = [line.split(" | ")[:5] for line in open(results) if line.startswith("| random ")]
    assert rows == [["| random", "joint (x0.1)", "5", "2", "0.310"], ["| random", "joint (x1)", "5", "2", "0.510"]]
    row = next(line for line in open(results) if line.startswith("| pgl500 "))
    # same recipe: - random x0.1 = +0.100; random's selected recipe: - random x1.0 = -0.100
    assert row.rstrip().endswith("| +0.100 [+0.100, +0.100] | -0.100 [-0.100, -0.100] |  |")


def test_the_decision_table_applies_the_rule_fixed_before_the_results(tmp_path):
    # per seed: random at PGL's recipe (x0.1), random at its own (x1), BYOL and PGL at x0.1
    dice = {0: (0.30, 0.41, 0.395, 0.40), 1: (0.30, 0.34, 0.40, 0.35)}
    arms, runs = [("random", 0.1), ("random", 1.0), ("byol500", 0.1), ("pgl500", 0.1)], []
    for seed, values in dice.items():
        for (encoder, scale), value in zip(arms, values):
            runs.append(Run(encoder, "joint", scale, 5, seed))
            _write_test(tmp_path / runs[-1].slug / "eval", value)
    factors = {("random", "joint"): 1.0, ("pgl", "joint"): 0.1, ("byol", "joint"): 0.1}
    chosen = {"random": "joint", "pgl": "joint", "byol": "joint"}
    text = open(write_report(str(tmp_path), {}, runs, [], lambda r: str(tmp_path / r.slug), factors, chosen)).read()
    decision = text[text.index("Decision, by a rule fixed before any result") :].split("\n\n")[1]
    # ahead by 0.10 and 0.05: better; -0.01 and +0.01: level; +0.005 and -0.05, averaged -0.023: undecided
    assert [line.split(" | ")[3:] for line in decision.splitlines()[2:]] == [
        ["random, same recipe", "+0.075 [+0.075, +0.075]", "+0.100, +0.050", "3 of 3", "better |"],
        ["random, its selected recipe", "+0.000 [+0.000, +0.000]", "-0.010, +0.010", "0 of 3", "level |"],
        ["BYOL, same recipe", "-0.023 [-0.023, -0.023]", "+0.005, -0.050", "0 of 3", "undecided |"],
    ]


def test_the_decision_rule_needs_the_interval_and_every_seed():
    assert verdict(PairedDifference(-0.05, -0.08, -0.02, 0.95, 50), [-0.04, -0.06, -0.05]) == "worse"
    # the interval below 0, one seed ahead: no decision either way
    assert verdict(PairedDifference(-0.05, -0.08, -0.02, 0.95, 50), [-0.04, -0.12, +0.01]) == "undecided"
    assert verdict(PairedDifference(+0.03, +0.01, +0.05, 0.95, 50), [0.03, 0.02, 0.04]) == "better"
    # within +-0.02 but crossing 0: level; wider than that: undecided
    assert verdict(PairedDifference(0.0, -0.019, +0.02, 0.95, 50), [0.01, -0.01, 0.0]) == "level"
    assert verdict(PairedDifference(0.0, -0.021, +0.02, 0.95, 50), [0.01, -0.01, 0.0]) == "undecided"


def test_the_per_class_table_names_the_organs_and_compares_pgl_per_organ(tmp_path):
    cases = [f"pt_{i}" for i in range(4)]
    dice = {"random": (0.2, 0.6), "pgl500": (0.3, 0.5), "byol500": (0.1, 0.5)}  # (brainstem, mandible)
    runs = [Run(encoder, "joint", 0.1, 5, 0) for encoder in dice]
    for run in runs:
        folder = tmp_path / run.slug / "eval"
        folder.mkdir(parents=True)
        a, b = dice[run.encoder]
        rows = [f"{case},{a + i / 100},{b},{(a + i / 100 + b) / 2}" for i, case in enumerate(cases)]
        (folder / "val_mean_dice_raw.csv").write_text("filename,class0,class1,mean\n" + "\n".join(rows) + "\n")
    factors, chosen = {("pgl", "joint"): 0.1}, {"pgl": "joint"}
    results = write_report(
        str(tmp_path), {}, runs, [], lambda r: str(tmp_path / r.slug), factors, chosen, ["brainstem", "mandible"]
    )
    text = open(results).read()
    assert "| encoder | strategy (encoder lr factor) | budget | brainstem | mandible |" in text
    assert "| pgl500 | joint (x0.1) | 5 | 0.315 | 0.500 |" in text
    assert "| pgl500 | joint (x0.1) | 5 | random | +0.100 [+0.100, +0.100] | -0.100 [-0.100, -0.100] |" in text
    assert "| pgl500 | joint (x0.1) | 5 | BYOL | +0.200 [+0.200, +0.200] | +0.000 [+0.000, +0.000] |" in text


def test_the_learning_rate_is_chosen_for_random_on_validation_and_every_later_run_uses_it(
    shared_data, tmp_path, monkeypatch
):
    stages = {}

    def record(function, jobs, parallel, desc):  # no stage runs; at 3e-3 random validates best
        stages[desc] = [job[0] for job in jobs]
        return [0.6 if getattr(run, "learning_rate", 0) == 3e-3 else 0.5 for run in stages[desc]]

    module = sys.modules["pgl_bundle.experiments.compare"]
    monkeypatch.setattr(module, "run_all", record)
    monkeypatch.setattr(module, "choose_iterations", lambda *args: {"pgl": 375, "byol": 750})
    compare(labelled=str(shared_data / "sts"), output_dir=str(tmp_path), preset="cpu")
    assert [(r.encoder, r.strategy, r.scale, r.budget, r.seed) for r in stages["learning rate"]] == [
        ("random", "joint", 1.0, 5, 0)
    ] * 4
    assert [r.learning_rate for r in stages["learning rate"]] == [3e-4, 1e-3, 3e-3, 1e-2]
    later = stages["selection"] + stages["curve"]
    assert {r.learning_rate for r in later} == {3e-3} and all(r.slug.endswith("_lr0.003") for r in later)
    assert (tmp_path / "learning_rate.csv").read_text().splitlines()[1:] == [
        "0.0003,0.5,False",
        "0.001,0.5,False",
        "0.003,0.6,True",
        "0.01,0.5,False",
    ]
    assert "fine-tuning learning rate 0.003 (learning_rate.csv)" in (tmp_path / "results.md").read_text()


def test_a_finished_run_with_other_settings_is_refused_not_reused(shared_data, tmp_path, monkeypatch):
    run = Run("random", "joint", 1.0, 5, 0, learning_rate=3e-4)
    folder = tmp_path / "finetune" / run.slug
    (folder / "models").mkdir(parents=True)
    (folder / "validation.json").write_text('{"best_val_mean_dice": 0.9}')
    command = ["python", "-m", "monai.bundle", "run", "run", "--learning_rate", "0.001", "--seed", "0"]
    (folder / "models" / "train_run.json").write_text(json.dumps({"command": command}))

    def record(function, jobs, parallel, desc):  # runs the finished stage's reuse only
        return [function(*job) if job[0] == run else 0.5 for job in jobs]

    module = sys.modules["pgl_bundle.experiments.compare"]
    monkeypatch.setattr(module, "run_all", record)
    monkeypatch.setattr(module, "choose_iterations", lambda *args: {"pgl": 375, "byol": 750})
    with pytest.raises(
        ValueError, match=rf"{run.slug}: finished with other settings \(.*learning_rate: 0.001 \(now 0.0003\)"
    ):
        compare(labelled=str(shared_data / "sts"), output_dir=str(tmp_path), preset="cpu")
    check_same_settings(str(folder), {"learning_rate": 0.001, "seed": 0, "overwrite": True})  # the same: reused
