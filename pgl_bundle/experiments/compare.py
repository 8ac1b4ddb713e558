"""Random vs PGL (vs BYOL) initialisation on labelled CT, across transfer strategies and label budgets: one rerunnable
command for the paper's claim.

    python -m pgl_bundle compare --labelled ../shared/data/sts --output_dir runs/compare --preset cpu \
        --unlabelled "['../shared/data/sts','../shared/data/unlabeled']"

The labelled cases are split once: the last ``num_test_cases`` are the test set, the ``num_val_cases`` before them
the validation set, the first ones the training pool; a budget of ``n`` labelled cases trains on the pool's first
``n`` (smaller budgets are subsets of larger ones). The validation and test images are left out of the pretraining
set. Stages, each a ``python -m monai.bundle run`` in a folder of its own, skipped when its result exists (an
interrupted comparison resumes where it stopped; a finished fine-tune whose recorded command gave any setting another
value, e.g. under an edited preset, stops the comparison instead of being reused):

1. pretrain PGL and BYOL once each, on the same schedule, keeping a full checkpoint at every iteration an encoder is
   taken from; each encoder (``pgl375``: PGL at iteration 375) is written as an encoder file with its adaptation plan;
   where the preset names a method alone (``pgl``), its encoder is the candidate iteration whose dense probe scores
   best on the validation cases (:mod:`.encoder_choice`, ``encoder_choice.csv``);
2. where the preset lists ``learning_rates``, the fine-tuning learning rate: random initialisation, ``joint``, at each
   candidate rate (first seed, selection budget); the best validation Dice gives every later run its rate
   (``learning_rate.csv``): tuned for the baseline, so a gain of a pretrained encoder is not a baseline left
   undertrained;
3. selection, on the first seed and the selection budget only: fine-tune every selection encoder with every
   transfer strategy (:data:`STRATEGIES`: keys of ``configs/train.json``) at every encoder learning-rate factor;
   per encoder, keep the strategy and factor with the best validation Dice (``selection.csv``); no test case is
   seen;
4. the label-budget curve: every encoder (or those of ``encoders``), at its budgets and every seed, with its method's
   selected strategy (and the ``also`` strategies at their best factor); a BYOL encoder takes PGL's selection; where
   an encoder's strategies have no linear-probe phase, one LP-FT run per budget (first seed) gives it a probe; with
   the preset's ``same_recipe`` (``cpu``, ``openkbp``), every encoder, random included, takes that method's strategy
   and factor (recipe for recipe), and each also runs at its own selected recipe at the selection budget (best
   against best); ``schedule_lengths`` reruns the curve's recipe at one budget with stretched schedules; encoders
   pretrained elsewhere (``external_encoders``) join the curve like the method's own (these lists of runs and their
   order: :mod:`.fine_tunes`);
5. test every run of step 4 (with ``test_selection``, of step 3 too) with ``configs/evaluate.json``, whose sliding
   window is inference's; a run with a linear-probe phase also tests its linear probe (the frozen encoder's read-out,
   the floor of its fine-tuning);
6. write ``results.csv`` (one row per run and test case, with the run's probe Dice), ``results.md`` (one table: encoder
   x strategy x budget, mean test Dice over seeds, paired bootstrap intervals against random and BYOL; a decision
   by a fixed rule, :func:`.report.verdict`; Dice per class)
   and ``results.png`` (with stretched schedules, ``results_iterations.png``: test Dice against fine-tuning
   iterations).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

from pgl_bundle.data import load_datalist
from pgl_bundle.errors import BadInputError, require_file
from pgl_bundle.experiments.encoder_choice import choose_iterations
from pgl_bundle.experiments.fine_tunes import (
    Run,
    best_against_best,
    curve_runs,
    method_of,
    probe_runs,
    select,
    selection_runs,
    stretched,
    stretched_runs,
    test_order,
)
from pgl_bundle.experiments.presets import PRESETS, STRATEGIES, strategy_overrides
from pgl_bundle.experiments.report import write_report
from pgl_bundle.experiments.runner import (
    CONFIGS,
    best_validation_dice,
    check_same_settings,
    checkpoints_by_iteration,
    extract_encoder,
    pretrain,
    run_all,
    run_bundle,
    write_datalist,
)
from pgl_bundle.provenance import encoder_plan
from pgl_bundle.transfer import PLAN_DEFAULTS, read_plan

__all__ = ["choose_learning_rate", "compare", "pretraining_volumes"]

logger = logging.getLogger(__name__)


def pretraining_volumes(sources: Sequence[str], labelled: list[dict], held_out: int) -> list[dict]:
    """The pretraining volumes of ``sources`` (folders, dataset.json files, globs or single volumes), without the
    images of the last ``held_out`` labelled cases (validation and test), compared by real path."""
    excluded = {os.path.realpath(item["image"]) for item in labelled[len(labelled) - held_out :]}
    images = []
    for source in sources:
        single = os.path.isfile(source) and not source.endswith(".json")
        images += [{"image": item["image"]} for item in ([{"image": source}] if single else load_datalist(source))]
    kept = [item for item in images if os.path.realpath(item["image"]) not in excluded]
    logger.info(f"pretraining volumes: {len(kept)} ({len(images) - len(kept)} validation or test images left out).")
    return kept


def choose_learning_rate(
    output_dir: str, rates: Sequence[float], budget: int, seed: int, scored: Callable[[list, str], dict]
) -> float:
    """The fine-tuning learning rate among ``rates`` with the best validation Dice of random initialisation and
    ``joint`` (ties: the smaller rate); 0.0 (the preset's rate) without candidates. Writes ``learning_rate.csv``.

    Args:
        output_dir: the comparison's folder.
        rates: the candidate learning rates.
        budget, seed: the selection's budget and first seed.
        scored: ``scored(runs, stage name)``: ``{run: best validation Dice}`` of the runs, run where needed.
    """
    trials = [Run("random", "joint", 1.0, budget, seed, learning_rate=rate) for rate in rates]
    scores = scored(trials, "learning rate")
    if not scores:
        return 0.0
    best = max(scores, key=lambda r: (scores[r], -r.learning_rate)).learning_rate
    with open(os.path.join(output_dir, "learning_rate.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["learning_rate", "best_val_mean_dice", "chosen"])
        writer.writerows((r.learning_rate, v, r.learning_rate == best) for r, v in scores.items())
    return best


def _check_external(external: dict[str, str], plan: dict) -> None:
    """Refuse an external encoder whose name is not ``<pgl|byol>-<tag>``, whose file or plan is missing, or whose
    plan's model or preprocessing differs from ``plan`` (the preset's)."""
    for name, path in external.items():
        if not re.fullmatch("(pgl|byol)-[a-z0-9]+", name):
            raise BadInputError(f"external encoder {name!r}: name it <pgl|byol>-<tag>, e.g. 'pgl-openkbp'.")
        found = read_plan(require_file(path, f"external encoder {name!r}"))
        if found is None:
            raise BadInputError(f"{path}: no adaptation plan beside it (external encoder {name!r}).")
        differ = [f"{k}: {found[k]} (preset: {plan[k]})" for k in PLAN_DEFAULTS if found[k] != plan[k]]
        if differ:
            raise BadInputError(f"{path}: its plan differs from the preset's: {'; '.join(differ)}.")


def compare(
    labelled: str,
    unlabelled: Sequence[str] = (),
    output_dir: str = "runs/compare",
    preset: str = "cpu",
    label_names: Sequence[str] | None = None,
    budgets: Sequence[int] | None = None,
    seeds: Sequence[int] | None = None,
    strategies: Sequence[str] | None = None,
    encoder_lr_scales: Sequence[float] | None = None,
    also: Sequence[str] = (),
    encoders: Sequence[str] | None = None,
    external_encoders: dict[str, str] | None = None,
    encoder_budgets: dict[str, Sequence[int]] | None = None,
    test_selection: bool = False,
    num_workers: int = 0,
    parallel: int = 0,
    report_only: bool = False,
    stop_after: str = "",
) -> str:
    """Run the comparison; return the path of ``results.md``. The arguments override the preset's values.

    Args:
        labelled: the labelled data (MSD-style dataset.json or its folder), split as the module docstring says.
        unlabelled: sources of pretraining volumes (folders, dataset.json files, globs or single files); empty: the
            labelled data's images. Validation and test images among them are left out (by their real path).
        output_dir: where every stage writes; rerunning skips finished stages.
        preset: ``tiny``, ``cpu``, ``gpu-10min`` or ``paper`` (see :data:`PRESETS`).
        label_names: class names of the labelled data, background first; default: the preset's, else
            ``["background", "tumour"]``.
        budgets, seeds: the label budgets and seeds of the curve.
        strategies: the strategies the selection compares (names of :data:`STRATEGIES`).
        encoder_lr_scales: the encoder learning-rate factors the selection compares, for every strategy.
        also: strategies run on the whole curve besides each method's selected one (at their selected factor);
            default: the preset's.
        encoders: the curve's encoders (e.g. ``['random', 'pgl375']``); default: random and every encoder of the
            preset, and the external encoders. A method none of whose encoders is used (here or in the selection) is
            not pretrained.
        external_encoders: encoder files pretrained elsewhere, by name ``<method>-<tag>``, e.g. ``{'pgl-openkbp':
            'runs/openkbp/pretrain/pgl/encoders/iteration_1500.pt'}``: fine-tuned like the method's own encoder (with
            the preset's ``same_recipe``, with that method's recipe), never pretrained or selected here. Their plan
            must match the preset's model and preprocessing. Their pretraining set is the user's to keep free of this
            task's validation and test images: the plan records its hash, not its files.
        encoder_budgets: ``{encoder: budgets}`` for encoders that skip some of ``budgets`` (a method's name stands for
            its chosen encoder); default: the preset's.
        test_selection: also test the selection runs that are not on the curve.
        num_workers: data loader workers of every stage (unless the preset sets them).
        parallel: stages run at once; 0: the preset's (1 unless it says otherwise).
        report_only: run nothing; write the report from the finished runs.
        stop_after: ``"pretrain"``: stop once the encoders are written (return ""), e.g. to look at them first;
            ``"first_budgets"``: train and test the curve's runs at the preset's ``first_budgets`` only (every seed,
            no probes or stretched schedules), then write the report; run again without it for the rest.
    """
    if stop_after not in ("", "pretrain", "first_budgets"):
        raise ValueError(f"stop_after {stop_after!r}: 'pretrain', 'first_budgets' or '' (run everything).")
    settings = PRESETS[preset]
    budgets, seeds = list(budgets or settings["budgets"]), list(seeds or settings["seeds"])
    strategy_names = list(strategies or settings["strategies"])
    also = list(also or settings.get("also", []))
    scales = list(encoder_lr_scales or settings["encoder_lr_scales"])
    unknown = [s for s in [*strategy_names, *also] if s not in STRATEGIES]
    if unknown:
        raise ValueError(f"unknown strategies {unknown}; known: {list(STRATEGIES)}.")
    threads, parallel = settings.get("threads_per_stage", 0), parallel or settings.get("parallel", 1)
    output_dir, labelled = os.path.abspath(output_dir), os.path.abspath(labelled)
    os.makedirs(output_dir, exist_ok=True)
    items = load_datalist(labelled, keys=["image", "label"])
    num_val, num_test = settings["num_val_cases"], settings["num_test_cases"]
    pool = len(items) - num_val - num_test
    if max(budgets + [settings["selection"]["budget"]]) > pool:
        raise ValueError(f"{labelled}: a budget exceeds the {pool} training cases left after validation and test.")
    common = {"num_workers": num_workers, **settings["model"]}
    finetune = {
        **common,
        **settings["finetune"],
        "dataset_dir": labelled,
        "num_val_cases": num_val,
        "num_test_cases": num_test,
        "label_names": list(label_names or settings.get("label_names", ["background", "tumour"])),
    }
    known = ["random"] + [f"{method}{i}" for method, iterations in settings["encoders"].items() for i in iterations]
    known += list(settings["encoders"])  # a method's name: its encoder at the iteration the validation probe chooses
    external = {name: os.path.abspath(path) for name, path in (external_encoders or {}).items()}
    known += list(external)
    encoders = list(encoders or [*settings.get("curve_encoders", known), *external])
    unknown = [e for e in encoders if e not in known]
    if unknown:
        raise ValueError(f"unknown encoders {unknown}; preset {preset!r} has {known}.")
    timings: dict[str, float] = {}
    plan = {key: settings["pretrain"].get(key, common.get(key, default)) for key, default in PLAN_DEFAULTS.items()}
    plan["patch_size"] = settings["pretrain"]["patch_size"]
    _check_external(external, plan)
    budgets_of = {**settings.get("encoder_budgets", {}), **(encoder_budgets or {})}

    def encoder_file(encoder: str) -> str:
        if encoder in external:
            return external[encoder]
        method = method_of(encoder)
        return os.path.join(output_dir, "pretrain", method, "encoders", f"iteration_{encoder[len(method) :]}.pt")

    def pretrain_stage(method: str) -> None:
        start = time.time()
        found = pretrain(
            method,
            os.path.join(output_dir, "pretrain", method),
            unlabelled_json,
            schedule,
            {**common, **settings["pretrain"]},
            threads,
        )
        # the run's provenance (pgl_bundle.provenance), at each encoder's own iteration
        final = read_plan(os.path.join(output_dir, "pretrain", method, "models", "pretrained_encoder.pt")) or {}
        for iteration in settings["encoders"].get(method, []):
            record = final.get("pretraining")
            own = encoder_plan(plan, record, iteration) if record else plan
            extract_encoder(found[iteration], encoder_file(f"{method}{iteration}"), own)
        timings[f"pretrain/{method}"] = time.time() - start

    def root(run: Run) -> str:
        return os.path.join(output_dir, "finetune", run.slug)

    def overrides(run: Run) -> dict:
        # overwrite: an interrupted fine-tuning stage starts afresh (its old model is moved aside, not lost)
        schedule = {**finetune, **(stretched(finetune, run.iterations) if run.iterations else {})}
        values = {**schedule, "num_train_cases": run.budget, "seed": run.seed, "overwrite": True}
        values.update(strategy_overrides(run.strategy, schedule), encoder_lr_scale=run.scale)
        if run.learning_rate:
            values["learning_rate"] = run.learning_rate
        if run.encoder != "random":
            values["pretrained_encoder"] = encoder_file(run.encoder)
        return values

    def fine_tune(run: Run) -> float:
        done = os.path.join(root(run), "validation.json")
        if os.path.isfile(done):
            check_same_settings(root(run), overrides(run))
        else:
            start = time.time()
            run_bundle(CONFIGS["train"], root(run), overrides(run), threads=threads)
            with open(done, "w") as f:
                json.dump({"best_val_mean_dice": best_validation_dice(root(run))}, f)
            timings[run.slug] = time.time() - start
        with open(done) as f:
            return json.load(f)["best_val_mean_dice"]

    def test(run: Run) -> None:
        values = overrides(run)
        del values["overwrite"]
        models = {"eval": "model.pt"}
        if values.get("linear_probe_iterations"):
            models["eval_linear_probe"] = "linear_probe.pt"
        for folder, model in models.items():
            if not os.path.isfile(os.path.join(root(run), folder, "val_mean_dice_raw.csv")):
                start = time.time()
                paths = {"model_file": os.path.join(root(run), "models", model)}
                paths["output_dir"] = os.path.join(root(run), folder)
                run_bundle(CONFIGS["evaluate"], root(run), {**values, **paths}, threads=threads)
                timings[f"{run.slug}/{folder}"] = time.time() - start

    selection = settings["selection"]
    used = {method_of(e) for e in [*encoders, *selection["encoders"]] if e not in external}
    if not report_only:
        sources = [os.path.abspath(s) for s in unlabelled] or [labelled]
        kept = pretraining_volumes(sources, items, num_val + num_test)
        unlabelled_json = write_datalist(os.path.join(output_dir, "unlabelled.json"), kept)
        schedule = sorted({i for iterations in settings["encoders"].values() for i in iterations})
        run_all(pretrain_stage, [(m,) for m in settings["encoders"] if m in used], parallel, "pretrain")
        if stop_after == "pretrain":
            return ""
    # a method's name stands for its encoder at the iteration chosen by the dense probe on the validation cases
    bare = [m for m in settings["encoders"] if m in {*encoders, *selection["encoders"]}]
    chosen_iterations = {}
    if bare:
        candidates = {m: checkpoints_by_iteration(os.path.join(output_dir, "pretrain", m)) for m in bare}
        candidates = {
            m: {i: found[i] for i in settings["encoders"][m] if i in found} for m, found in candidates.items()
        }
        probe = {
            **common,
            "hu_window": plan["hu_window"],
            "pixdim": plan["pixdim"],
            "label_names": finetune["label_names"],
            "patch_size": finetune["patch_size"],
            "batch_size": 2,
            "num_samples": 2,
            "probe_iterations": settings.get("probe_iterations", 100),
        }
        train_items, validation_items = items[: selection["budget"]], items[pool : pool + num_val]
        chosen_iterations = choose_iterations(
            output_dir, candidates, train_items, validation_items, probe, seeds[0], parallel, threads, report_only
        )

    def resolved(encoder: str) -> str:
        return f"{encoder}{chosen_iterations[encoder]}" if encoder in chosen_iterations else encoder

    encoders = [resolved(e) for e in encoders]
    budgets_of = {resolved(e): b for e, b in budgets_of.items()}
    selection_encoders = [resolved(e) for e in selection["encoders"]]
    only = {resolved(e): names for e, names in selection.get("strategies", {}).items()}  # default: all strategies

    def scored(runs: list[Run], desc: str) -> dict[Run, float]:
        """Best validation Dice of each run, fine-tuned as needed; with ``report_only``, of the finished ones."""
        if report_only:
            return {r: fine_tune(r) for r in runs if os.path.isfile(os.path.join(root(r), "validation.json"))}
        return dict(zip(runs, run_all(fine_tune, [(r,) for r in runs], parallel, desc)))

    rate = choose_learning_rate(output_dir, settings.get("learning_rates", []), selection["budget"], seeds[0], scored)
    selected = selection_runs(
        selection_encoders,
        strategy_names,
        scales,
        selection["budget"],
        seeds[0],
        rate,
        settings.get("strategy_lr_scales"),
        only,
    )
    scores = scored(selected, "selection")
    factors, chosen = select(scores)
    recipe_of = settings.get("same_recipe", "")
    curve = curve_runs(encoders, chosen, factors, also, budgets, budgets_of, seeds, recipe_of)
    if recipe_of:  # besides recipe for recipe: each encoder at its own selected recipe, every seed
        curve += [
            r
            for r in best_against_best(selection_encoders, chosen, factors, selection["budget"], seeds)
            if r not in curve
        ]
    curve = [replace(r, learning_rate=rate) for r in curve]
    probes = probe_runs(curve, factors, seeds[0]) if settings.get("floor_probes", True) else []
    probes = [replace(r, learning_rate=rate) for r in probes]
    # accuracy or speed: the curve's runs at one budget again with shorter and longer schedules
    stretch = settings.get("schedule_lengths", {})
    other_lengths = [n for n in stretch.get("iterations", []) if n != settings["finetune"]["num_iterations"]]
    lengths = stretched_runs(curve, stretch.get("budget", 0), other_lengths, chosen, factors, recipe_of)
    if not report_only:
        # each run tested as soon as it is trained
        first = settings.get("first_budgets", budgets)
        runs = [*curve, *probes, *lengths, *(selected if test_selection else [])]
        if stop_after == "first_budgets":
            runs = [r for r in curve if r.budget in first]
        tested = test_order(runs, [probes, lengths], selection_encoders, budgets, first)
        run_all(lambda run: (fine_tune(run), test(run)), [(r,) for r in tested], parallel, "curve")
        with open(os.path.join(output_dir, "timings.json"), "a") as f:
            f.write(json.dumps(timings) + "\n")
    return write_report(
        output_dir,
        scores,
        curve,
        [*probes, *lengths],
        root,
        factors,
        chosen,
        finetune["label_names"][1:],
        settings["finetune"]["num_iterations"],
    )
