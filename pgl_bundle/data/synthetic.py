"""The embedded default data: small synthetic CT-like volumes, so the bundle runs with no download.

Each volume is an abdomen-like phantom in Hounsfield units: air, a body of fat and muscle, a spine, lungs at
the top slices and organs (liver, spleen, kidneys, aorta) of randomly varied size, position and tilt, plus
scanner noise. A label map with the organ ids is written beside it, so the downstream workflow can run on
the same data. Good for plumbing and smoke runs; it teaches a network nothing about real anatomy.
"""

from __future__ import annotations

import json
import logging
import os

import nibabel as nib
import numpy as np

__all__ = ["SYNTHETIC_LABELS", "make_synthetic_dataset"]

logger = logging.getLogger(__name__)

SYNTHETIC_LABELS = {0: "background", 1: "liver", 2: "spleen", 3: "right kidney", 4: "left kidney", 5: "aorta"}
# (label, HU, centre as a fraction of the body's half axes (x, y), z range as fractions, radii in mm)
_ORGANS = (
    (1, 60.0, (-0.35, -0.05), (0.2, 0.9), (70.0, 55.0, 60.0)),
    (2, 45.0, (0.55, 0.25), (0.4, 0.8), (28.0, 35.0, 35.0)),
    (3, 150.0, (-0.35, 0.45), (0.1, 0.5), (22.0, 28.0, 35.0)),
    (4, 150.0, (0.35, 0.45), (0.1, 0.5), (22.0, 28.0, 35.0)),
    (5, 200.0, (0.05, 0.35), (0.0, 1.0), (10.0, 10.0, 400.0)),
)


def _ellipsoid(grid: tuple[np.ndarray, ...], centre, radii, tilt: float) -> np.ndarray:
    x, y, z = (g - c for g, c in zip(grid, centre))
    cos, sin = np.cos(tilt), np.sin(tilt)
    x, y = cos * x - sin * y, sin * x + cos * y
    return (x / radii[0]) ** 2 + (y / radii[1]) ** 2 + (z / radii[2]) ** 2 <= 1.0


def make_volume(rng: np.random.Generator, shape, spacing) -> tuple[np.ndarray, np.ndarray]:
    """One phantom: ``(image in HU as int16, label map as uint8)``, both of ``shape`` ``(x, y, z)``."""
    axes = [(np.arange(n) - n / 2 + 0.5) * s for n, s in zip(shape, spacing)]  # mm, centred
    grid = np.meshgrid(*axes, indexing="ij", sparse=True)
    extent = [n * s / 2 for n, s in zip(shape, spacing)]
    body_radii = (extent[0] * rng.uniform(0.72, 0.9), extent[1] * rng.uniform(0.55, 0.75), 1e4)
    image = np.full(shape, -1000.0, dtype=np.float32)
    label = np.zeros(shape, dtype=np.uint8)
    image[_ellipsoid(grid, (0, 0, 0), body_radii, 0.0)] = -100.0  # subcutaneous fat
    muscle = tuple(r - rng.uniform(10, 20) for r in body_radii[:2]) + (1e4,)
    image[_ellipsoid(grid, (0, 0, 0), muscle, 0.0)] = 40.0
    lung_top = extent[2] * rng.uniform(0.3, 0.6)
    for side in (-1, 1):
        lung = _ellipsoid(grid, (side * muscle[0] * 0.5, -muscle[1] * 0.1, extent[2]), (muscle[0] * 0.4,) * 2 + (extent[2] - lung_top + 40,), 0)
        image[lung] = -850.0
    spine_centre = (0.0, muscle[1] * 0.7, 0.0)
    image[_ellipsoid(grid, spine_centre, (14.0, 14.0, 1e4), 0.0)] = 700.0
    for organ, hu, (cx, cy), (z0, z1), radii in _ORGANS:
        centre = (
            cx * muscle[0] + rng.normal(0, 5),
            cy * muscle[1] + rng.normal(0, 5),
            -extent[2] + (z0 + (z1 - z0) * rng.uniform(0.4, 0.6)) * 2 * extent[2],
        )
        scaled = tuple(r * rng.uniform(0.8, 1.2) for r in radii)
        mask = _ellipsoid(grid, centre, scaled, rng.uniform(-0.4, 0.4)) & (image > -500)
        image[mask] = hu + rng.normal(0, 5)
        label[mask] = organ
    image += rng.normal(0, 12.0, size=shape).astype(np.float32)
    return np.round(image).astype(np.int16), label


def make_synthetic_dataset(
    output_dir: str,
    num_volumes: int = 8,
    shape: tuple[int, int, int] = (192, 160, 48),
    spacing: tuple[float, float, float] = (1.6, 1.6, 4.0),
    seed: int = 0,
) -> str:
    """Write ``num_volumes`` phantoms and an MSD-style ``dataset.json`` to ``output_dir`` (once; kept after).

    Files: ``imagesTr/synth_<NNN>.nii.gz`` (int16 HU) and ``labelsTr/synth_<NNN>.nii.gz`` (uint8, ids as in
    :data:`SYNTHETIC_LABELS`), RAS affine with ``spacing`` in mm.

    Returns:
        the path of ``dataset.json``.
    """
    datalist_path = os.path.join(output_dir, "dataset.json")
    if os.path.isfile(datalist_path):
        logger.info(f"no dataset_dir given: using the synthetic CT phantoms in {output_dir} (made earlier).")
        return datalist_path
    logger.info(f"no dataset_dir given: generating {num_volumes} synthetic CT phantoms of {shape} voxels in "
                f"{output_dir} (first use; they teach nothing about anatomy, see --dataset_dir).")
    os.makedirs(os.path.join(output_dir, "imagesTr"), exist_ok=True)
    os.makedirs(os.path.join(output_dir, "labelsTr"), exist_ok=True)
    rng = np.random.default_rng(seed)
    affine = np.diag([*spacing, 1.0])
    training = []
    for index in range(num_volumes):
        image, label = make_volume(rng, shape, spacing)
        item = {"image": f"imagesTr/synth_{index:03d}.nii.gz", "label": f"labelsTr/synth_{index:03d}.nii.gz"}
        nib.save(nib.Nifti1Image(image, affine), os.path.join(output_dir, item["image"]))
        nib.save(nib.Nifti1Image(label, affine), os.path.join(output_dir, item["label"]))
        training.append(item)
    description = {
        "name": "pgl-bundle synthetic CT phantoms",
        "description": "Synthetic abdomen-like CT for smoke runs; not anatomy.",
        "modality": {"0": "CT"},
        "labels": {str(k): v for k, v in SYNTHETIC_LABELS.items()},
        "numTraining": num_volumes,
        "training": training,
    }
    with open(datalist_path + ".tmp", "w") as f:  # written last and atomically: its presence means "complete"
        json.dump(description, f, indent=1)
    os.replace(datalist_path + ".tmp", datalist_path)
    return datalist_path
