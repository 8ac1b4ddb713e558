"""Pre-flight checks of the input, so that bad data stops a run before training starts, or is left out by choice.

MONAI's loaders fail on a bad file when the first batch that holds it is built (or, with ``CacheDataset``, while
caching, inside a long traceback), and they do not fail at all on NaN voxels, on a 4D series where a 3D volume is
expected or on a label map on another grid than its image. :func:`check_datalist` reads every item of a datalist once,
with the readers the pipeline uses (``LoadImage``), and collects every problem of every file before deciding:
raise one error that lists them all, or leave the bad items out with a warning. The same pass warns about volumes
whose intensities do not look like Hounsfield units (an error with ``require_hu``), refuses DICOM folders holding
several series, and logs how many volumes were found and their shape and spacing ranges. :func:`check_checkpoint`
checks a checkpoint to resume from, :func:`check_epoch_length` that the data makes at least one batch.

Sizes are ``(x, y, z)`` in voxels of the RAS-oriented array, as everywhere in this package.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from monai.transforms import LoadImage, Orientation
from pgl_bundle.data.datalist import dicom_series
from pgl_bundle.errors import BadInputError, found_instead, require_file
from torch import nn
from torch.utils.data import DataLoader

__all__ = [
    "bad_items_error",
    "check_checkpoint",
    "check_datalist",
    "check_epoch_length",
    "check_hounsfield",
    "check_image",
    "check_label",
]

logger = logging.getLogger(__name__)

_SHOWN = 5  # names quoted in a message


def _load(path: str) -> MetaTensor:
    """``(C, x, y, z)`` as ``LoadImaged(image_only=True, ensure_channel_first=True)`` + ``Orientationd("RAS")`` give."""
    image = LoadImage(image_only=True, ensure_channel_first=True)(path)
    return Orientation("RAS")(image) if image.ndim == 4 else image


def _read(path: str) -> tuple[MetaTensor | None, list[str]]:
    if not os.path.exists(path):
        return None, [f"does not exist; {found_instead(path)}"]
    if os.path.isdir(path):
        series = dicom_series(path)
        if len(series) > 1:
            listing = "; ".join(f"{uid} ({description}, {n} files)" for uid, description, n in series)
            return None, [
                f"holds {len(series)} DICOM series, where one volume is expected: {listing}. Put each series in "
                "a folder of its own."
            ]
    try:
        return _load(path), []
    except Exception as e:  # readers raise many types for truncated, corrupt or foreign files
        cause = (str(e).strip().splitlines() or [""])[0][:200]
        return None, [f"cannot be read: corrupt, truncated or not an image ({type(e).__name__}: {cause})"]


def check_image(
    image: MetaTensor, min_size: Sequence[int] | None = None, pixdim: Sequence[float] | None = None, channels: int = 1
) -> list[str]:
    """The problems of one loaded image (an empty list when there is none).

    Args:
        image: ``(C, x, y, z)``, loaded channel-first and RAS-oriented (as :func:`check_datalist` loads it).
        min_size: least size ``(x, y, z)`` after resampling to ``pixdim`` (the network input, e.g. ``patch_size``);
            None: no size check.
        pixdim: the spacing the pipeline resamples to (``Spacingd``); None: the file's own spacing.
        channels: the number of channels the network takes.
    """
    shape = tuple(image.shape)
    if image.ndim != 4:
        return [f"is a {image.ndim - 1}D image (shape {shape[1:]}), a 3D volume is expected"]
    if shape[0] != channels:
        return [f"is a 4D series of {shape[0]} volumes (shape {shape[1:]} x {shape[0]}), a 3D volume is expected"]
    if min(shape[1:]) == 1:
        return [f"is a single 2D slice (shape {shape[1:]}), a 3D volume is expected"]
    problems = []
    if min_size is not None:
        spacing = affine_to_spacing(image.affine, r=3).numpy()
        size = np.asarray(shape[1:]) * (spacing / np.asarray(pixdim) if pixdim is not None else 1.0)
        if np.any(size < np.asarray(min_size)):
            where = f" at pixdim {tuple(pixdim)}" if pixdim is not None else ""
            problems.append(
                f"is smaller than the patch: {tuple(int(s) for s in np.round(size))} voxels{where}, the patch is "
                f"{tuple(min_size)}; thin scans can be padded up to it instead (--min_image_size null)"
            )
    if image.is_floating_point():
        bad = int((~torch.isfinite(image)).sum())
        if bad:
            problems.append(f"has {bad} NaN or infinite voxel(s)")
    return problems


AIR_HU = -900.0  # a CT volume has air (about -1000 HU) or lung (about -850) somewhere; MR or PET values do not


def check_hounsfield(image: MetaTensor) -> str:
    """Why ``image``'s values do not look like Hounsfield units ("" when they do): no voxel at or below
    :data:`AIR_HU` (no air), e.g. MR, PET, or CT stored without its rescale intercept (all values positive)."""
    low, high = float(image.min()), float(image.max())
    if low <= AIR_HU:
        return ""
    why = "all values are non-negative" if low >= 0 else f"no voxel at or below {AIR_HU:g} (no air)"
    return (
        f"intensities {low:g}..{high:g} do not look like CT in Hounsfield units: {why}. MR, PET or CT without its "
        "rescale intercept? The HU window (hu_window) would clip it."
    )


def check_label(label: MetaTensor, num_classes: int, image: MetaTensor | None = None) -> list[str]:
    """The problems of one loaded label map: values outside ``0 .. num_classes - 1``, or another grid than ``image``.

    Args:
        label: ``(1, x, y, z)``, loaded as :func:`check_datalist` loads it.
        num_classes: the declared classes, background included.
        image: its image; None: no grid check.
    """
    if label.ndim != 4 or label.shape[0] != 1:
        return [f"is not a single 3D label map (shape {tuple(label.shape)})"]
    problems = []
    values = torch.unique(label.as_tensor())
    outside = values[(values != values.round()) | (values < 0) | (values >= num_classes)]
    if len(outside):
        shown = ", ".join(f"{v:g}" for v in outside[:_SHOWN].tolist()) + (", ..." if len(outside) > _SHOWN else "")
        problems.append(f"has values outside the declared classes 0..{num_classes - 1}: {shown}")
    if image is not None and image.ndim == 4:
        if label.shape[1:] != image.shape[1:]:
            shapes = f"{tuple(label.shape[1:])} vs {tuple(image.shape[1:])}"
            problems.append(f"is on another grid than its image: shape {shapes}")
        elif not torch.allclose(label.affine.double(), image.affine.double(), atol=1e-3):
            problems.append(
                "is on another grid than its image: affines differ "
                f"(label {label.affine.numpy().round(3).tolist()}, image {image.affine.numpy().round(3).tolist()})"
            )
    return problems


def _check_item(
    item: Mapping, image_key: str, label_key: str | None, num_classes: int | None, **image_checks
) -> tuple[list[str], list[str], tuple | None]:
    """One datalist item: its problems and warnings, each prefixed with its file, and the image's shape and
    spacing ``((x, y, z), (sx, sy, sz))`` (None if it cannot be read)."""
    image, problems = _read(str(item[image_key]))
    report = [f"{item[image_key]}: {p}" for p in problems]
    warnings, geometry = [], None
    if image is not None:
        image_problems = check_image(image, **image_checks)
        report += [f"{item[image_key]}: {p}" for p in image_problems]
        not_hu = "" if image_problems else check_hounsfield(image)  # NaN, 2D...: the value range would mislead
        warnings += [f"{item[image_key]}: {not_hu}"] if not_hu else []
        geometry = (tuple(image.shape[1:]), tuple(affine_to_spacing(image.affine, r=3).tolist()))
    if label_key is not None:
        label, problems = _read(str(item[label_key]))
        if label is not None:
            problems = check_label(label, num_classes, image)
        report += [f"{item[label_key]}: {p}" for p in problems]
    return report, warnings, geometry


def _summary(geometries: Sequence[tuple]) -> str:
    """``"shapes (x, y, z) from ... to ..., spacing from ... to ... mm"`` of ``[(shape, spacing), ...]``."""
    shapes, spacings = (np.array([g[i] for g in geometries]) for i in (0, 1))
    return (
        f"shape from {tuple(int(v) for v in shapes.min(0))} to {tuple(int(v) for v in shapes.max(0))} voxels, "
        f"spacing from {tuple(round(float(v), 2) for v in spacings.min(0))} to "
        f"{tuple(round(float(v), 2) for v in spacings.max(0))} mm"
    )


def bad_items_error(problems: Sequence[str], bad: int, total: int) -> BadInputError:
    """The error for ``bad`` of ``total`` unusable datalist items: every ``"<file>: <problem>"`` line, the ways on,
    and last the first bad file again (the line a reader of the log's end sees)."""
    listing = "\n  ".join(problems)
    return BadInputError(
        f"{bad} of {total} datalist items cannot be used:\n  {listing}\nFix or remove them, or leave them out with "
        f"--skip_bad_volumes True (in Python: skip_bad=True).\nFirst bad file: {problems[0]}"
    )


def check_datalist(
    datalist: Sequence[Mapping],
    image_key: str = "image",
    label_key: str | None = None,
    num_classes: int | None = None,
    min_size: Sequence[int] | None = None,
    pixdim: Sequence[float] | None = None,
    channels: int = 1,
    skip_bad: bool = False,
    num_workers: int = 1,
    require_hu: bool = False,
) -> list[dict]:
    """Read every file of ``datalist`` once and check it; return the usable items.

    Checked: the file exists and reads completely; a folder holds one DICOM series; the image is one 3D volume (not
    2D, not a slice, not a 4D series) of ``channels`` channels, at least ``min_size`` after resampling to
    ``pixdim``, without NaN or infinite voxels; with ``label_key``, the label map's values are classes
    ``0 .. num_classes - 1`` and it lies on its image's grid. Images whose values do not look like Hounsfield units
    (:func:`check_hounsfield`) are warned about, one line per file. Logs the number of volumes and their shape and
    spacing ranges.

    Args:
        datalist: items ``{image_key: path[, label_key: path]}`` (:func:`~pgl_bundle.data.load_datalist`).
        image_key: the image's key.
        label_key: the label map's key; None: images only (pretraining).
        num_classes: classes of the label maps, background included; required with ``label_key``.
        min_size, pixdim, channels: see :func:`check_image`.
        skip_bad: leave bad items out (with a warning that lists them) instead of raising.
        num_workers: threads reading files.
        require_hu: treat an image that does not look like Hounsfield units as a problem, not a warning.

    Returns:
        the items without problems, in their order.

    Raises:
        BadInputError: (without ``skip_bad``) any item has a problem; the message lists every file and its problem.
            Also when no item is left, e.g. an empty datalist.
    """
    if label_key is not None and num_classes is None:
        raise ValueError("check_datalist: num_classes is required to check labels.")
    checks = {"min_size": min_size, "pixdim": pixdim, "channels": channels}
    logger.info(f"checking the {len(datalist)} items of the datalist (every file is read once)...")
    with ThreadPoolExecutor(max(1, num_workers)) as pool:
        results = list(pool.map(lambda i: _check_item(i, image_key, label_key, num_classes, **checks), datalist))
    reports = [report + (warnings if require_hu else []) for report, warnings, _ in results]
    warnings = [] if require_hu else [line for _, lines, _ in results for line in lines]
    if warnings:
        listing = "\n  ".join(warnings)
        logger.warning(
            f"{len(warnings)} of {len(datalist)} volumes may not be CT in Hounsfield units (--require_hu True makes "
            f"this an error):\n  {listing}"
        )
    good = [dict(item) for item, report in zip(datalist, reports) if not report]
    problems = [line for report in reports for line in report]
    if problems:
        listing = "\n  ".join(problems)
        bad = len(datalist) - len(good)
        if not skip_bad:
            raise bad_items_error(problems, bad, len(datalist))
        logger.warning(f"leaving out {bad} of {len(datalist)} datalist items:\n  {listing}")
    if not good:
        raise BadInputError(f"no usable item in a datalist of {len(datalist)}.")
    geometries = [g for (report, _, g) in results if g is not None and not report]
    logger.info(f"{len(good)} volumes to use: {_summary(geometries)}.")
    return good


def check_epoch_length(dataloader: DataLoader) -> int:
    """Log how many view pairs (volumes x ``volume_repeats``), batches and left-out samples an epoch of ``dataloader``
    has; return the batches.

    Raises:
        BadInputError: no batch can be formed (fewer volumes than one batch with ``drop_last``), which would make
            ignite skip training and the run end "successfully" with nothing written.
    """
    samples, batch = len(dataloader.dataset), dataloader.batch_size
    iterations = len(dataloader)
    per_process = len(dataloader.sampler) if dataloader.sampler is not None else samples
    if iterations == 0:
        raise BadInputError(
            f"no training batch can be formed: {per_process} volume(s) per process, batch size {batch}, drop_last "
            f"{dataloader.drop_last}. Add volumes, or lower batch_size to at most {per_process}."
        )
    left_out = per_process - iterations * batch if dataloader.drop_last else 0
    logger.info(
        f"{samples} view pairs per epoch (volumes x volume_repeats), batch size {batch}: "
        f"{iterations} iterations per epoch"
        + (f"; {left_out} volume(s) left out of each epoch (drop_last)" if left_out else "")
        + "."
    )
    if left_out:
        logger.warning(f"drop_last leaves {left_out} of {per_process} volumes out of every epoch.")
    return iterations


def check_checkpoint(path: str, load_dict: Mapping[str, object]) -> str:
    """Return ``path`` if the checkpoint there holds every entry of ``load_dict`` and fits its modules; "" passes.

    Reads names and shapes only (memory-mapped), so that a checkpoint of another architecture, a truncated file or
    an encoder-only file is refused with its name and the difference, before anything is trained or written.

    Args:
        path: the checkpoint (``CheckpointSaver`` output: ``{"network": state_dict, "optimizer": ..., ...}``).
        load_dict: what will be loaded from it, as given to ``CheckpointLoader``; modules are compared tensor by tensor.

    Raises:
        InputNotFoundError: ``path`` does not exist.
        BadInputError: the file does not load, lacks an entry, or a module's tensor names or shapes differ.
    """
    if not path:
        return path
    require_file(path, "checkpoint to resume from")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise BadInputError(f"{path}: not a readable checkpoint, truncated or not a PyTorch file ({e}).") from e
    if not isinstance(checkpoint, Mapping) or not all(k in checkpoint for k in load_dict):
        found = sorted(map(str, checkpoint)) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise BadInputError(f"{path}: not a training checkpoint: it holds {found}, resuming needs {sorted(load_dict)}.")
    for name, obj in load_dict.items():
        if not isinstance(obj, nn.Module):
            continue
        module = obj.module if isinstance(obj, nn.parallel.DistributedDataParallel) else obj
        expected, found = module.state_dict(), checkpoint[name]
        missing, unexpected = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
        shapes = [
            f"{k}: {tuple(found[k].shape)} in the file, {tuple(expected[k].shape)} in the network"
            for k in expected.keys() & found.keys()
            if found[k].shape != expected[k].shape
        ]
        if missing or unexpected or shapes:
            details = "; ".join(
                f"{what} ({len(keys)}): {', '.join(sorted(keys)[:_SHOWN])}"
                for what, keys in (("shape differs", shapes), ("missing", missing), ("unexpected", unexpected))
                if keys
            )
            raise BadInputError(
                f"{path}: '{name}' was saved from a different architecture than the configured one; "
                f"{details}. Use the settings it was trained with (e.g. encoder_layers, encoder_width, "
                "hidden_channels, embedding_channels)."
            )
    return path
