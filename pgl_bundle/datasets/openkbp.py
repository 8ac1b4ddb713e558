"""OpenKBP head-and-neck CT (Babier et al., Med. Phys. 2021; github.com/ababier/open-kbp) as NIfTI and an MSD
``dataset.json``: five organs at risk, a fixed split by patient id, and every other CT as a pretraining volume.

    python -m pgl_bundle datasets openkbp --source open-kbp/provided-data --output /data/openkbp

OpenKBP stores each patient as sparse CSV files on a 128 x 128 x 128 grid (``provided-data/<split>/pt_N/``):
``ct.csv`` (flat C-order index, value HU + 1024; voxels not listed are air, -1024 HU), one file of flat indices per
contoured structure (``Brainstem.csv``, ...), and ``voxel_dimensions.csv`` (the three spacings in mm, in the
array's axis order). Only ``train-pats`` and ``validation-pats`` are read; ``test-pats`` is OpenKBP's reserved test
set and is never opened.

Orientation. The array's axes run (anterior to posterior, patient right to left, superior to inferior), found from
the organs' centroids: the mandible lies at smaller first indices than the spinal cord, the left parotid at larger
second indices than the right one, the brainstem at smaller third indices than the spinal cord. The converter
writes the volume in RAS order (axes transposed and reversed, a diagonal affine of the spacings) and checks those
three relations again on every labelled patient in world coordinates; a patient that fails them is listed and not
used as a labelled case.

A structure file that is missing means "not contoured", not background: only a patient with a CT and all five organs
is a labelled case. Every CT (labelled or not) not in the validation or test split is a pretraining volume.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence

import nibabel as nib
import numpy as np
from pgl_bundle.errors import BadInputError, InputNotFoundError, OutputExistsError, found_instead

__all__ = [
    "LABEL_NAMES",
    "ORGANS",
    "TEST_IDS",
    "VALIDATION_IDS",
    "anatomy_problems",
    "convert_openkbp",
    "read_patient",
    "to_ras",
]

logger = logging.getLogger(__name__)

GRID = (128, 128, 128)
SPLITS = ("train-pats", "validation-pats")  # test-pats: reserved for independent evaluation, never read
RESERVED = "test-pats"
AIR_HU = -1024  # ct.csv stores HU + 1024 and leaves air out
ORGANS = ("Brainstem", "SpinalCord", "LeftParotid", "RightParotid", "Mandible")  # label values 1..5, in this order
LABEL_NAMES = ["background", "brainstem", "spinal_cord", "left_parotid", "right_parotid", "mandible"]


# The fixed split, by patient id (docs/results.md). Of the patients with a CT and all five organs in the copy of
# train-pats and validation-pats measured here (115 of 240; 37 ct.csv files missing), the last 50 by id are the
# test patients and the 10 before them the validation patients; the others are the labelled pool. Ids listed here
# but absent or incomplete in another copy are reported and left out, never replaced.
TEST_IDS = (
    132, 133, 137, 139, 140, 141, 144, 148, 149, 151, 155, 157, 164, 166, 167, 168, 169, 171, 172, 173,
    177, 180, 181, 182, 183, 185, 187, 188, 189, 192, 193, 196, 197, 200, 201, 202, 207, 209, 210, 213,
    218, 219, 222, 224, 225, 226, 231, 232, 235, 236,
)  # fmt: skip
VALIDATION_IDS = (111, 112, 113, 114, 115, 119, 120, 122, 124, 128)


def _read_sparse(path: str, values: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Flat indices (and the value column) of an OpenKBP sparse CSV; ``(n,)`` arrays."""
    try:
        table = np.loadtxt(path, delimiter=",", skiprows=1, usecols=(0, 1) if values else (0,), ndmin=2)
    except (OSError, ValueError) as error:
        raise BadInputError(f"{path}: not an OpenKBP sparse CSV ({error}).") from error
    indices = table[:, 0].astype(np.int64)
    if indices.size and (indices.min() < 0 or indices.max() >= np.prod(GRID)):
        raise BadInputError(f"{path}: flat indices outside the {GRID} grid ({indices.min()}..{indices.max()}).")
    return indices, (table[:, 1] if values else None)


def read_patient(folder: str) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float], list[str]]:
    """One patient in OpenKBP's own array order.

    Returns:
        CT in HU ``(128, 128, 128)`` int16, label map ``(128, 128, 128)`` uint8 (organ ``k`` of :data:`ORGANS` is
        ``k + 1``; where two overlap, the later one), the spacing of the three axes (mm), and the organs not
        contoured.

    Raises:
        InputNotFoundError: no ``ct.csv`` or ``voxel_dimensions.csv``.
        BadInputError: an unreadable file.
    """
    for name in ("ct.csv", "voxel_dimensions.csv"):
        if not os.path.isfile(os.path.join(folder, name)):
            raise InputNotFoundError(f"{os.path.join(folder, name)}: not found; {found_instead(folder + '/x')}.")
    indices, values = _read_sparse(os.path.join(folder, "ct.csv"), values=True)
    ct = np.full(np.prod(GRID), AIR_HU, dtype=np.int16)
    ct[indices] = np.round(values).astype(np.int16) + AIR_HU
    spacing = np.loadtxt(os.path.join(folder, "voxel_dimensions.csv"), ndmin=1)
    if spacing.shape != (3,) or not np.all(spacing > 0):
        raise BadInputError(f"{folder}/voxel_dimensions.csv: expected three positive spacings, got {spacing}.")
    label = np.zeros(np.prod(GRID), dtype=np.uint8)
    missing = []
    for value, organ in enumerate(ORGANS, start=1):
        path = os.path.join(folder, f"{organ}.csv")
        if os.path.isfile(path):
            label[_read_sparse(path, values=False)[0]] = value
        else:
            missing.append(organ)
    return ct.reshape(GRID), label.reshape(GRID), tuple(float(s) for s in spacing), missing


def to_ras(array: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """An array in OpenKBP's order (anterior->posterior, right->left, superior->inferior) as a RAS volume.

    Returns:
        the array ``(128, 128, 128)`` with axes (right, anterior, superior) increasing, and its ``(4, 4)`` affine.
    """
    ras = np.ascontiguousarray(array.transpose(1, 0, 2)[::-1, ::-1, ::-1])
    return ras, np.diag([spacing[1], spacing[0], spacing[2], 1.0])


def anatomy_problems(label: np.ndarray, affine: np.ndarray) -> list[str]:
    """The anatomical relations a RAS label map (``(X, Y, Z)``, :data:`ORGANS` values) breaks: the right parotid to
    the patient's right of the left one, the mandible anterior to the spinal cord, the brainstem superior to it.
    Relations of organs not contoured are not checked."""
    centroid = {}
    for value, organ in enumerate(ORGANS, start=1):
        voxels = np.argwhere(label == value)
        if len(voxels):
            centroid[organ] = (affine @ np.append(voxels.mean(0), 1.0))[:3]
    relations = [  # (organ, axis, organ, what the first is of the second)
        ("RightParotid", 0, "LeftParotid", "right of"),
        ("Mandible", 1, "SpinalCord", "anterior to"),
        ("Brainstem", 2, "SpinalCord", "superior to"),
    ]
    return [
        f"{a} is not {words} {b}"
        for a, axis, b, words in relations
        if a in centroid and b in centroid and centroid[a][axis] <= centroid[b][axis]
    ]


def _patient_folders(source: str) -> list[tuple[int, str]]:
    """``(id, folder)`` of every patient in ``source``'s train-pats and validation-pats, sorted by id."""
    if RESERVED in os.path.abspath(source).split(os.sep):
        raise BadInputError(f"{source}: {RESERVED} is OpenKBP's reserved test set; give its provided-data folder.")
    if not any(os.path.isdir(os.path.join(source, split)) for split in SPLITS):
        raise InputNotFoundError(f"{source}: neither {' nor '.join(SPLITS)} found; {found_instead(source + '/x')}.")
    found = []
    for split in SPLITS:
        folder = os.path.join(source, split)
        for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            match = re.fullmatch(r"pt_(\d+)", name)
            if match and os.path.isdir(os.path.join(folder, name)):
                found.append((int(match.group(1)), os.path.join(folder, name)))
    return sorted(found)


def convert_openkbp(source: str, output: str, overwrite: bool = False, partial: bool = False) -> str:
    """Convert OpenKBP's train-pats and validation-pats into NIfTI (``imagesTr/pt_N.nii.gz`` in HU,
    ``labelsTr/pt_N.nii.gz`` uint8) and write, in ``output``:

    - ``dataset.json``: MSD-style, the labelled cases in the order ``compare`` splits them (labelled pool, then
      :data:`VALIDATION_IDS`, then :data:`TEST_IDS`; its last 50 are the test set, the 10 before the validation set);
    - ``pretraining.json``: every converted CT except the validation and test patients';
    - ``conversion.json``: every patient's role, and the patients left out with the reason.

    Args:
        source: OpenKBP's ``provided-data`` folder.
        output: the folder to write.
        overwrite: rewrite a folder that already holds a conversion.
        partial: convert a copy that lacks the fixed split's validation and test patients (a sample, a download in
            progress): ``dataset.json`` then lists the labelled pool alone, for trials, not for ``compare``.

    Returns:
        the path of ``dataset.json``.

    Raises:
        OutputExistsError: ``output`` holds a conversion and ``overwrite`` is False.
        BadInputError: a validation or test patient of the fixed split is missing or incomplete (the split would
            change; unless ``partial``), or no patient could be converted.
    """
    dataset_json = os.path.join(output, "dataset.json")
    if os.path.exists(dataset_json) and not overwrite:
        raise OutputExistsError(f"{dataset_json} exists; convert into another folder or pass --overwrite True.")
    patients = _patient_folders(source)
    for sub in ("imagesTr", "labelsTr"):
        os.makedirs(os.path.join(output, sub), exist_ok=True)
    labelled, unlabelled, skipped = {}, {}, {}
    for pid, folder in patients:
        name = f"pt_{pid}"
        try:
            ct, label, spacing, missing = read_patient(folder)
        except (InputNotFoundError, BadInputError) as error:
            skipped[name] = str(error)
            continue
        (ct, affine), label = to_ras(ct, spacing), to_ras(label, spacing)[0]
        image = os.path.join("imagesTr", f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(ct, affine), os.path.join(output, image))
        problems = "; ".join(anatomy_problems(label, affine))
        if missing or problems:
            unlabelled[pid] = {"image": image, "why": f"not contoured: {', '.join(missing)}" if missing else problems}
            continue
        label_path = os.path.join("labelsTr", f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), os.path.join(output, label_path))
        labelled[pid] = {"image": image, "label": label_path}
    held_out = [*VALIDATION_IDS, *TEST_IDS]
    if not labelled and not unlabelled:
        raise BadInputError(f"{source}: no patient could be converted ({len(skipped)} skipped: {skipped}).")
    absent = [pid for pid in held_out if pid not in labelled]
    if partial:
        held_out = [pid for pid in held_out if pid in labelled]
    elif absent:
        first = f"pt_{absent[0]}"
        why = skipped.get(first) or unlabelled.get(absent[0], {}).get("why") or "no such patient"
        raise BadInputError(
            f"{source}: {len(absent)} of the fixed split's {len(held_out)} validation and test patients are missing "
            f"or incomplete, the first {first} ({why}); a copy without them converts with --partial True, for trials "
            "only."
        )
    pool = [labelled[pid] for pid in sorted(labelled) if pid not in held_out]
    order = pool + [labelled[pid] for pid in held_out]
    _write_json(
        dataset_json,
        {
            "name": "OpenKBP organs at risk",
            "description": "OpenKBP train-pats and validation-pats: brainstem, spinal cord, parotids, mandible",
            "reference": "Babier et al., Med. Phys. 48 (2021) 5549-5561; github.com/ababier/open-kbp (MIT)",
            "tensorImageSize": "3D",
            "modality": {"0": "CT"},
            "labels": {str(i): name for i, name in enumerate(LABEL_NAMES)},
            "numTraining": len(order),
            "training": order,
        },
    )
    pretraining = [{"image": item["image"]} for pid, item in sorted({**labelled, **unlabelled}.items())]
    pretraining = [item for item in pretraining if item["image"] not in {labelled[p]["image"] for p in held_out}]
    _write_json(os.path.join(output, "pretraining.json"), {"training": pretraining})
    roles = {f"pt_{pid}": _role(pid) for pid in labelled} | {f"pt_{pid}": "pretraining only" for pid in unlabelled}
    _write_json(
        os.path.join(output, "conversion.json"),
        {
            "source": os.path.abspath(source),
            "roles": roles,
            "not_labelled": {f"pt_{pid}": item["why"] for pid, item in unlabelled.items()},
            "skipped": skipped,
        },
    )
    for name, reason in skipped.items():
        logger.warning(f"skipped {name}: {reason}")
    first_skipped = f", the first {next(iter(skipped.items()))}" if skipped else ""
    logger.info(
        f"{output}: {len(order)} labelled cases (pool {len(pool)}, validation and test {len(held_out)}), "
        f"{len(pretraining)} pretraining volumes, {len(unlabelled)} CTs without all five organs (conversion.json), "
        f"{len(skipped)} patients skipped{first_skipped}."
    )
    return dataset_json


def _role(pid: int) -> str:
    return "test" if pid in TEST_IDS else "validation" if pid in VALIDATION_IDS else "pool"


def _write_json(path: str, content: dict) -> None:
    partial = f"{path}.partial"
    with open(partial, "w") as f:
        json.dump(content, f, indent=1)
    os.replace(partial, path)
