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

__all__ = ["SYNTHETIC_LABELS", "make_ct_corpus", "make_ct_volume", "make_synthetic_dataset"]

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
        lung = _ellipsoid(
            grid,
            (side * muscle[0] * 0.5, -muscle[1] * 0.1, extent[2]),
            (muscle[0] * 0.4,) * 2 + (extent[2] - lung_top + 40,),
            0,
        )
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
    logger.info(
        f"no dataset_dir given: generating {num_volumes} synthetic CT phantoms of {shape} voxels in "
        f"{output_dir} (first use; they teach nothing about anatomy, see --dataset_dir)."
    )
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


def _ellipse_hu(image: np.ndarray, xy: tuple[np.ndarray, np.ndarray], centre, radii, z_range, hu: float) -> None:
    """Set ``hu`` inside an ellipsoid whose in-plane radii shrink towards its ends (``z_range``: slice indices)."""
    z0, z1 = z_range
    for z in range(max(z0, 0), min(z1, image.shape[2])):
        shrink = 1.0 - ((z - (z0 + z1) / 2) / max((z1 - z0) / 2, 1)) ** 2
        if shrink > 0:
            r = np.sqrt(shrink)
            inside = ((xy[0] - centre[0]) / (radii[0] * r)) ** 2 + ((xy[1] - centre[1]) / (radii[1] * r)) ** 2 <= 1
            image[..., z][inside & (image[..., z] > -500)] = hu


def make_ct_volume(rng: np.random.Generator, num_slices: int, spacing=(0.8, 0.8, 2.5)) -> np.ndarray:
    """One CT-sized phantom ``(512, 512, num_slices)`` int16 in HU: air -1000, fat -100, muscle 40, lungs -850,
    bone 700, liver / spleen / kidneys / aorta 45-200, noise of 12 HU. Built slice-wise (not with the 3D grids of
    :func:`make_volume`), so that a 512 x 512 x 200 volume takes seconds and little RAM."""
    shape = (512, 512, num_slices)
    xy = np.meshgrid(*[(np.arange(n) - n / 2 + 0.5) * s for n, s in zip(shape[:2], spacing[:2])], indexing="ij")
    half = [n * s / 2 for n, s in zip(shape[:2], spacing[:2])]
    body = (half[0] * rng.uniform(0.72, 0.9), half[1] * rng.uniform(0.55, 0.75))
    muscle = tuple(r - rng.uniform(10, 20) for r in body)
    plane = np.full(shape[:2], -1000, dtype=np.int16)
    plane[(xy[0] / body[0]) ** 2 + (xy[1] / body[1]) ** 2 <= 1] = -100
    plane[(xy[0] / muscle[0]) ** 2 + (xy[1] / muscle[1]) ** 2 <= 1] = 40
    plane[xy[0] ** 2 + (xy[1] - muscle[1] * 0.7) ** 2 <= 14.0**2] = 700
    image = np.repeat(plane[..., None], num_slices, axis=2)
    lung_top = int(num_slices * rng.uniform(0.5, 0.8))
    for side in (-1, 1):
        _ellipse_hu(
            image,
            xy,
            (side * muscle[0] * 0.5, -muscle[1] * 0.1),
            (muscle[0] * 0.4,) * 2,
            (lung_top, 2 * num_slices - lung_top),
            -850,
        )
    for _, hu, (cx, cy), (z0, z1), radii in _ORGANS:
        centre = (cx * muscle[0] + rng.normal(0, 5), cy * muscle[1] + rng.normal(0, 5))
        extent = min(radii[2] / spacing[2], num_slices)
        mid = (z0 + (z1 - z0) * rng.uniform(0.4, 0.6)) * num_slices
        scaled = tuple(r * rng.uniform(0.8, 1.2) for r in radii[:2])
        _ellipse_hu(image, xy, centre, scaled, (int(mid - extent), int(mid + extent)), hu + rng.normal(0, 5))
    image += np.round(rng.standard_normal(size=shape, dtype=np.float32) * 12.0).astype(np.int16)
    return image


def _write_ct(output_dir: str, index: int, seed: int, slices: tuple[int, int], spacing) -> str:
    rng = np.random.default_rng([seed, index])
    image = make_ct_volume(rng, int(rng.integers(slices[0], slices[1] + 1)), spacing)
    path = os.path.join(output_dir, f"ct_{index:04d}.nii.gz")
    nib.save(nib.Nifti1Image(image, np.diag([*spacing, 1.0])), path + ".tmp.nii.gz")
    os.replace(path + ".tmp.nii.gz", path)
    return path


def make_ct_corpus(
    output_dir: str,
    num_volumes: int,
    slices: tuple[int, int] = (60, 200),
    spacing: tuple[float, float, float] = (0.8, 0.8, 2.5),
    seed: int = 0,
    num_workers: int = 1,
) -> list[str]:
    """Write ``ct_<NNNN>.nii.gz`` CT-sized phantoms (:func:`make_ct_volume`, int16) to ``output_dir``, for scale
    benchmarks; volume ``i`` depends on ``(seed, i)`` only, and files already there are kept (the corpus grows)."""
    from concurrent.futures import ProcessPoolExecutor

    os.makedirs(output_dir, exist_ok=True)
    todo = [i for i in range(num_volumes) if not os.path.isfile(os.path.join(output_dir, f"ct_{i:04d}.nii.gz"))]
    with ProcessPoolExecutor(max(1, num_workers)) as pool:
        list(
            pool.map(
                _write_ct,
                [output_dir] * len(todo),
                todo,
                [seed] * len(todo),
                [slices] * len(todo),
                [spacing] * len(todo),
            )
        )
    return [os.path.join(output_dir, f"ct_{i:04d}.nii.gz") for i in range(num_volumes)]
