"""Command line: ``python -m pgl_bundle <command> --help``.

Commands:
    compare    random vs BYOL vs PGL initialisation on labelled CT (:func:`pgl_bundle.compare.compare`)
    synthetic  write the embedded synthetic CT phantom set (:func:`pgl_bundle.data.make_synthetic_dataset`)
"""

import fire

from pgl_bundle.compare import compare
from pgl_bundle.data import make_synthetic_dataset

if __name__ == "__main__":
    fire.Fire({"compare": compare, "synthetic": make_synthetic_dataset})
