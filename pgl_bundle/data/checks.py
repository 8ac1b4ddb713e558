"""Pre-flight checks of the input, so that bad data stops a run before training starts, or is left out by choice.

MONAI's loaders fail on a bad file when the first batch that holds it is built (or, with ``CacheDataset``, while
caching, inside a long traceback), and they do not fail at all on NaN voxels, on a 4D series where a 3D volume is
expected or on a label map on another grid than its image. :func:`check_datalist` reads every item of a datalist once,
with the readers the pipeline uses (``LoadImage``), and collects every problem of every file before deciding:
raise one error that lists them all, or leave the bad items out with a warning. :func:`check_checkpoint` does the
same for a checkpoint to resume from.

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
from torch import nn

__all__ = ["check_checkpoint", "check_datalist", "check_image", "check_label"]

logger = logging.getLogger(__name__)

_SHOWN = 5  # names quoted in a message


def _load(path: str) -> MetaTensor:
    """``(C, x, y, z)`` as ``LoadImaged(image_only=True, ensure_channel_first=True)`` + ``Orientationd("RAS")`` give."""
    image = LoadImage(image_only=True, ensure_channel_first=True)(path)
    return Orientation("RAS")(image) if image.ndim == 4 else image


def _read(path: str) -> tuple[MetaTensor | None, list[str]]:
    if not os.path.exists(path):
        return None, ["does not exist"]
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
                f"is smaller than the crop: {tuple(int(s) for s in np.round(size))} voxels{where}, the crop is "
                f"{tuple(min_size)}"
            )
    if image.is_floating_point():
        bad = int((~torch.isfinite(image)).sum())
        if bad:
            problems.append(f"has {bad} NaN or infinite voxel(s)")
    return problems


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
) -> list[str]:
    """Every problem of one datalist item, each prefixed with the file it is about."""
    image, problems = _read(str(item[image_key]))
    report = [f"{item[image_key]}: {p}" for p in problems]
    if image is not None:
        report += [f"{item[image_key]}: {p}" for p in check_image(image, **image_checks)]
    if label_key is not None:
        label, problems = _read(str(item[label_key]))
        if label is not None:
            problems = check_label(label, num_classes, image)
        report += [f"{item[label_key]}: {p}" for p in problems]
    return report


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
) -> list[dict]:
    """Read every file of ``datalist`` once and check it; return the usable items.

    Checked: the file exists and reads completely; the image is one 3D volume (not 2D, not a slice, not a 4D series)
    of ``channels`` channels, at least ``min_size`` after resampling to ``pixdim``, without NaN or infinite voxels;
    with ``label_key``, the label map's values are classes ``0 .. num_classes - 1`` and it lies on its image's grid.

    Args:
        datalist: items ``{image_key: path[, label_key: path]}`` (:func:`~pgl_bundle.data.load_datalist`).
        image_key: the image's key.
        label_key: the label map's key; None: images only (pretraining).
        num_classes: classes of the label maps, background included; required with ``label_key``.
        min_size, pixdim, channels: see :func:`check_image`.
        skip_bad: leave bad items out (with a warning that lists them) instead of raising.
        num_workers: threads reading files.

    Returns:
        the items without problems, in their order.

    Raises:
        ValueError: (without ``skip_bad``) any item has a problem; the message lists every file and its problem.
            Also when no item is left, e.g. an empty datalist.
    """
    if label_key is not None and num_classes is None:
        raise ValueError("check_datalist: num_classes is required to check labels.")
    checks = {"min_size": min_size, "pixdim": pixdim, "channels": channels}
    with ThreadPoolExecutor(max(1, num_workers)) as pool:
        reports = list(pool.map(lambda i: _check_item(i, image_key, label_key, num_classes, **checks), datalist))
    good = [dict(item) for item, report in zip(datalist, reports) if not report]
    problems = [line for report in reports for line in report]
    if problems:
        listing = "\n  ".join(problems)
        bad = len(datalist) - len(good)
        if not skip_bad:
            raise ValueError(
                f"{bad} of {len(datalist)} datalist items cannot be used:\n  {listing}\nFix or remove them, or leave "
                "them out with skip_bad=True (config key skip_bad_volumes)."
            )
        logger.warning(f"leaving out {bad} of {len(datalist)} datalist items:\n  {listing}")
    if not good:
        raise ValueError(f"no usable item in a datalist of {len(datalist)}.")
    return good


def check_checkpoint(path: str, load_dict: Mapping[str, object]) -> str:
    """Return ``path`` if the checkpoint there holds every entry of ``load_dict`` and fits its modules; "" passes.

    Reads names and shapes only (memory-mapped), so that a checkpoint of another architecture, a truncated file or
    an encoder-only file is refused with its name and the difference, before anything is trained or written.

    Args:
        path: the checkpoint (``CheckpointSaver`` output: ``{"network": state_dict, "optimizer": ..., ...}``).
        load_dict: what will be loaded from it, as given to ``CheckpointLoader``; modules are compared tensor by tensor.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file does not load, lacks an entry, or a module's tensor names or shapes differ.
    """
    if not path:
        return path
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: checkpoint to resume from not found.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise ValueError(f"{path}: not a readable checkpoint, truncated or not a PyTorch file ({e}).") from e
    if not isinstance(checkpoint, Mapping) or not all(k in checkpoint for k in load_dict):
        found = sorted(map(str, checkpoint)) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise ValueError(f"{path}: not a training checkpoint: it holds {found}, resuming needs {sorted(load_dict)}.")
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
            raise ValueError(
                f"{path}: '{name}' was saved from a different architecture than the configured one; "
                f"{details}. Use the settings it was trained with (e.g. encoder_layers, encoder_width, "
                "hidden_channels, embedding_channels)."
            )
    return path
