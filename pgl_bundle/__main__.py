"""Command line: ``python -m pgl_bundle <command> --help``.

Commands:
    compare    random vs PGL vs BYOL initialisation on labelled CT, across transfer strategies and label budgets
               (:func:`pgl_bundle.experiments.compare`)
    probe_curve  dense-probe Dice against pretraining iterations (:func:`pgl_bundle.experiments.probe_curve`)
    finetune_sanity  the fine-tuning recipe's sanity bar: the bundle's network against a plain MONAI UNet
               (:func:`pgl_bundle.experiments.finetune_sanity`)
    datasets   convert a public CT data set into NIfTI and a dataset.json (``datasets openkbp``:
               :func:`pgl_bundle.datasets.convert_openkbp`)
    prepare    preprocess a CT set once for pretraining (:func:`pgl_bundle.data.prepare`; also configs/prepare.json)
    synthetic  write the embedded synthetic CT phantom set (:func:`pgl_bundle.data.make_synthetic_dataset`)
    show_views  draw PGL's two views of a few volumes, their boxes and the aligner's overlap
               (:func:`pgl_bundle.show_views.show_views`)
    plot_probe  draw a pretraining run's probe Dice and collapse signal against iteration
               (:func:`pgl_bundle.validation_probe.plot_probe`)
    show_encoder  print an encoder file's plan and where it came from (:func:`pgl_bundle.provenance.show_encoder`)
    publish    write large_files.yml (URLs, md5 hashes) of released weights, and the encoder's provenance into
               configs/metadata.json (:func:`pgl_bundle.release.write_large_files`)
    pack       zip the bundle for ``python -m monai.bundle download`` (:func:`pgl_bundle.release.pack`)
"""

import logging

import fire
from pgl_bundle.data import make_synthetic_dataset, prepare
from pgl_bundle.datasets import DATASETS
from pgl_bundle.errors import report_user_errors_last
from pgl_bundle.experiments import compare, finetune_sanity, probe_curve
from pgl_bundle.provenance import show_encoder
from pgl_bundle.release import pack, write_large_files
from pgl_bundle.show_views import show_views
from pgl_bundle.validation_probe import plot_probe

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(levelname)s - %(message)s")
    report_user_errors_last()
    fire.Fire(
        {
            "compare": compare,
            "datasets": DATASETS,
            "prepare": prepare,
            "probe_curve": probe_curve,
            "finetune_sanity": finetune_sanity,
            "synthetic": make_synthetic_dataset,
            "show_views": show_views,
            "plot_probe": plot_probe,
            "show_encoder": show_encoder,
            "publish": write_large_files,
            "pack": pack,
        }
    )
