"""Public CT data sets converted into what the bundle reads (NIfTI volumes and an MSD-style ``dataset.json``)."""

from .openkbp import convert_openkbp

DATASETS = {"openkbp": convert_openkbp}  # ``python -m pgl_bundle datasets <name> --source ... --output ...``
