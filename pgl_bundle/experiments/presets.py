"""The comparison's settings: transfer strategies (overrides of ``configs/train.json``) and presets (model, pretraining,
fine-tuning schedule, what is compared, how many stages run at once). Measured durations: docs/results.md."""

from __future__ import annotations

__all__ = ["PRESETS", "PRETRAINED_ONLY", "STRATEGIES", "strategy_overrides"]

# Transfer strategies: overrides of configs/train.json's recipe (pgl_bundle.finetuning), for a schedule of
# `num_iterations` with validation every `val_interval`; the linear-probe phase ends on a validation, so the
# checkpoint kept by validation can be the probe itself.
STRATEGIES: dict[str, dict] = {
    # everything trains from the first iteration (the decoder's output starts at zero, added to the linear head's)
    "joint": {},
    # the encoder frozen while the decoder and linear head train, then unfrozen with a warm-up
    "decoder-first": {"freeze_encoder_iterations": "val_interval", "encoder_warmup_iterations": "val_interval/2"},
    # linear probe (LP-FT, Kumar et al. 2022): the linear head alone, then decoder first, then everything
    "lp-ft": {
        "linear_probe_iterations": "val_interval",
        "freeze_encoder_iterations": "val_interval/2",
        "encoder_warmup_iterations": "val_interval/2",
    },
    # LP-FT keeping the encoder's batch-norm statistics at the pretrained ones (pretrained encoders only)
    "lp-ft-frozen-bn": {
        "linear_probe_iterations": "val_interval",
        "freeze_encoder_iterations": "val_interval/2",
        "encoder_warmup_iterations": "val_interval/2",
        "encoder_batchnorm": "frozen",
    },
    # LP-FT with layer-wise learning-rate decay: each shallower encoder stage at half the rate of the next
    "lp-ft-layer-decay": {
        "linear_probe_iterations": "val_interval",
        "freeze_encoder_iterations": "val_interval/2",
        "encoder_warmup_iterations": "val_interval/2",
        "layer_lr_decay": 0.5,
    },
}
PRETRAINED_ONLY = {"lp-ft-frozen-bn"}  # a random encoder has no pretrained statistics to keep

_CPU_MODEL = {"encoder_layers": [1, 1, 1, 1], "encoder_block": "bottleneck", "encoder_width": [32, 64, 128, 256]}
_CPU_PRETRAIN = {"patch_size": [64, 64, 16], "hidden_channels": 1024, "batch_size": 4, "learning_rate": 0.001}
_CPU_FINETUNE = {
    "patch_size": [64, 64, 32],
    "batch_size": 2,
    "num_samples": 2,
    "num_iterations": 300,
    "val_interval": 100,
    "warmup_iterations": 20,
    "learning_rate": 3e-4,
}
# the fine-tuning learning rate is chosen among these on validation (random initialisation, joint); on OpenKBP's
# validation patients 3e-4, the rate these presets had fixed, scored 0.22 against 0.55 at 3e-3 (docs/results.md)
_CPU_LEARNING_RATES = [3e-4, 1e-3, 3e-3, 1e-2]
_RESNET50 = {"encoder_layers": [3, 4, 6, 3], "encoder_block": "bottleneck", "encoder_width": [64, 128, 256, 512]}

# Timings of each preset: docs/results.md.
PRESETS: dict[str, dict] = {
    # end-to-end check of the machinery, seconds per stage (CI)
    "tiny": {
        "model": {"encoder_layers": [1, 1, 1, 1], "encoder_block": "basic", "encoder_width": [16, 16, 32, 32]},
        "pretrain": {"patch_size": [64, 64, 16], "hidden_channels": 64, "batch_size": 2, "num_volumes": 4},
        "encoders": {"pgl": [1, 2]},  # the validation probe chooses between them
        "finetune": {
            "patch_size": [64, 64, 16],
            "batch_size": 2,
            "num_samples": 1,
            "num_iterations": 3,
            "val_interval": 1,
            "warmup_iterations": 1,
            "learning_rate": 1e-3,
            "decoder_channels": [32, 16, 16, 8, 8],
            "sw_overlap": 0.0,  # about 40 % of the default overlap's windows: seconds per validation and test
        },
        "strategies": ["lp-ft"],
        "encoder_lr_scales": [1.0],
        "selection": {"budget": 2, "encoders": ["random", "pgl"]},
        "curve_encoders": ["random", "pgl"],
        "probe_iterations": 2,
        "budgets": [2],
        "seeds": [0],
        "num_val_cases": 1,
        "num_test_cases": 2,
        "parallel": 2,  # two stages at a time: start-up (imports) is most of a tiny stage, one core each
        "threads_per_stage": 1,  # two stages of 2 threads on 2 cores spin-wait: 2.3x slower than one at a time
    },
    # 2 CPU cores, about 13 hours of wall time, two stages at a time (docs/results.md): recipe for recipe, random and
    # PGL each with joint fine-tuning and with LP-FT at every budget
    "cpu": {
        "model": _CPU_MODEL,
        "pretrain": {**_CPU_PRETRAIN, "volume_repeats": 4},  # about 15 volumes x 4 / 4: 15 batches per epoch
        # the encoder's iteration is chosen among these by the dense probe on the validation cases
        "encoders": {"pgl": [250, 375, 500, 750, 1000], "byol": [250, 375, 500, 750, 1000]},
        "finetune": _CPU_FINETUNE,
        "learning_rates": _CPU_LEARNING_RATES,
        "strategies": ["joint", "lp-ft"],
        "encoder_lr_scales": [0.1, 1.0],
        "selection": {"budget": 5, "encoders": ["random", "pgl", "byol"]},
        "curve_encoders": ["random", "pgl", "byol"],
        "same_recipe": "pgl",  # every encoder with PGL's selected factors; each at its own recipe at 5 cases
        "also": ["joint", "lp-ft"],  # both strategies on the whole curve, whichever PGL's selection prefers
        "budgets": [1, 2, 5, 10],
        "encoder_budgets": {"byol": [5]},
        "seeds": [0, 1, 2],
        "num_val_cases": 5,
        "num_test_cases": 15,
        "parallel": 2,  # two stages at a time, one thread each: one per core
        "threads_per_stage": 1,
    },
    # OpenKBP head-and-neck organs (`python -m pgl_bundle datasets openkbp`), 2 CPU cores: the cpu preset's model
    # and fine-tuning recipe, pretrained on about 160 CTs; every arm fine-tuned with the same recipe at every budget
    "openkbp": {
        "model": _CPU_MODEL,
        "pretrain": _CPU_PRETRAIN,
        # the encoder's iteration is chosen among these by the dense probe on the validation patients
        "encoders": {"pgl": [500, 1000, 1500, 2000], "byol": [500, 1000, 1500, 2000]},
        # chosen on the validation patients: after 100 probe iterations PGL-500's probe read out the mandible and
        # little else (mean Dice 0.089; brainstem, cord, right parotid 0), after 300 every organ (0.337)
        "probe_iterations": 300,
        # no left-right mirroring: it would turn a left parotid into a right one
        "finetune": {**_CPU_FINETUNE, "flip_axes": [1, 2]},
        "learning_rates": _CPU_LEARNING_RATES,
        "label_names": ["background", "brainstem", "spinal_cord", "left_parotid", "right_parotid", "mandible"],
        "strategies": ["joint", "lp-ft"],
        "encoder_lr_scales": [0.1, 1.0],
        "selection": {"budget": 5, "encoders": ["random", "pgl", "byol"]},
        "curve_encoders": ["random", "pgl", "byol"],
        "same_recipe": "pgl",  # every encoder with PGL's selected strategy and factor; each at its own at 5 patients
        "floor_probes": False,  # the encoders' probes: the validation probes that chose their iterations
        # accuracy or only speed: every arm at 5 patients, its schedule stretched to 100, 200 and 600 iterations
        "schedule_lengths": {"budget": 5, "iterations": [100, 200, 300, 600]},
        "budgets": [5, 20, 2, 10],
        "first_budgets": [5, 20],  # every seed at 5 and 20 patients before the other budgets
        "seeds": [0, 1, 2],
        "num_val_cases": 10,
        "num_test_cases": 50,
        "parallel": 2,
        "threads_per_stage": 1,
    },
    # one H100/H200, about 10 minutes: ResNet-50 at the paper's pretraining patch
    "gpu-10min": {
        "model": _RESNET50,
        "pretrain": {
            "patch_size": [96, 96, 16],
            "batch_size": 32,
            "volume_repeats": 16,  # ~20 volumes x 16 / 32: about 10 batches per epoch, every worker busy
            "learning_rate": 0.001,
            "warmup_epochs": 1,
            "amp": True,
            "compile": False,  # compiling the dual-path ResNet-50 costs about as long as the whole pretraining here
            "num_workers": 6,
            "checkpoint_interval": 1000,  # the final checkpoint only (1.1 GB each)
        },
        "encoders": {"pgl": [150], "byol": [150]},
        "finetune": {
            "patch_size": [96, 96, 32],
            "batch_size": 2,
            "num_samples": 2,
            "num_iterations": 300,
            "val_interval": 100,
            "warmup_iterations": 30,
            "learning_rate": 1e-3,
            "amp": True,
            "num_workers": 2,
        },
        "strategies": ["joint", "lp-ft"],
        "encoder_lr_scales": [0.1, 1.0],
        "selection": {"budget": 5, "encoders": ["random", "pgl150"]},
        "budgets": [2, 5, 10],
        "encoder_budgets": {"byol150": [5]},
        "seeds": [0, 1, 2],
        "num_val_cases": 5,
        "num_test_cases": 15,
        "parallel": 6,  # small runs side by side fill one GPU; 16 host cores
        "threads_per_stage": 2,
    },
    # the paper's settings (method spec, section 6): for GPUs, days
    "paper": {
        "model": _RESNET50,
        "pretrain": {
            "patch_size": [96, 96, 16],
            "batch_size": 128,
            "learning_rate": 0.2,
            "warmup_epochs": 2,
            "amp": True,
            "optimizer#_target_": "pgl_bundle.LARS",
        },
        "encoders": {"pgl": [7000, 35000], "byol": [35000]},  # about 100 and 500 epochs of 1,808 CTs
        "finetune": {
            "patch_size": [160, 160, 48],
            "batch_size": 8,
            "num_samples": 1,
            "num_iterations": 10000,
            "val_interval": 500,
            "warmup_iterations": 500,
            "learning_rate": 3e-4,
            "amp": True,
        },
        "strategies": list(STRATEGIES),
        "encoder_lr_scales": [0.1, 0.3, 1.0],
        "selection": {"budget": 5, "encoders": ["random", "pgl35000"]},
        "budgets": [2, 5, 18],
        "seeds": [0, 1, 2],
        "num_val_cases": 5,
        "num_test_cases": 10,
    },
}


def strategy_overrides(name: str, finetune: dict) -> dict:
    """A strategy's train.json overrides, its iteration counts (``"val_interval"``, ``"val_interval/2"``) resolved."""
    resolved = {}
    for key, value in STRATEGIES[name].items():
        if isinstance(value, str) and value.startswith("val_interval"):
            value = finetune["val_interval"] // (2 if value.endswith("/2") else 1)
        resolved[key] = value
    return resolved
