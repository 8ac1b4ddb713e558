"""Datalists from an MSD-style dataset.json, a folder or a glob; every path checked before training starts."""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Sequence

from monai.data import load_decathlon_datalist

__all__ = ["IMAGE_SUFFIXES", "find_images", "load_datalist"]

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
_GLOB_CHARS = set("*?[")


def _is_dicom_series(folder: str) -> bool:
    """A folder of files none of which is a known volume format: read it as one DICOM series (ITK)."""
    files = [f for f in os.listdir(folder) if os.path.isfile(os.path.join(folder, f)) and not f.startswith(".")]
    return bool(files) and not any(f.lower().endswith(IMAGE_SUFFIXES + (".json",)) for f in files)


def find_images(folder: str) -> list[str]:
    """Every volume below ``folder``: NIfTI / NRRD / MetaImage files, and DICOM-series folders, sorted."""
    if _is_dicom_series(folder):
        return [folder]
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        if root != folder and _is_dicom_series(root):
            found.append(root)
            dirs.clear()
            continue
        found += [os.path.join(root, f) for f in sorted(files) if f.lower().endswith(IMAGE_SUFFIXES)]
    return found


def _from_dataset_json(path: str, keys: Sequence[str], sections: Sequence[str]) -> list[dict]:
    with open(path) as f:
        sections_present = json.load(f)
    if not isinstance(sections_present, dict) or not set(sections) & set(sections_present):
        found = sorted(sections_present) if isinstance(sections_present, dict) else type(sections_present).__name__
        raise KeyError(f"{path}: has none of the lists {list(sections)} (found {found}).")
    items: list[dict] = []
    for section in sections:
        if section not in sections_present:
            continue
        for item in load_decathlon_datalist(path, is_segmentation=True, data_list_key=section):
            missing = [k for k in keys if k not in item]
            if missing:
                raise KeyError(f"{path}: an entry of '{section}' lacks the key(s) {missing}: {item}")
            items.append({k: item[k] for k in keys})
    return items


def load_datalist(
    source: str,
    keys: Sequence[str] = ("image",),
    sections: Sequence[str] = ("training", "validation", "test"),
    num_items: int | None = None,
    must_exist: bool = True,
) -> list[dict]:
    """List the volumes of ``source`` as ``[{"image": path, ...}, ...]``.

    Args:
        source: an MSD-style ``dataset.json``; a folder (its ``dataset.json`` if it has one, else every volume
            below it, see :func:`find_images`); or a glob pattern.
        keys: keys each item must have (``("image",)`` for pretraining, ``("image", "label")`` downstream). Only
            a ``dataset.json`` can provide keys other than ``image``.
        sections: the ``dataset.json`` lists to read, in order.
        num_items: keep only the first ``num_items`` items (None: all).
        must_exist: raise when a listed file does not exist; False leaves that to
            :func:`~pgl_bundle.data.checks.check_datalist`, which reports every bad file at once.

    Raises:
        FileNotFoundError: ``source`` or a listed file does not exist (the message names it).
        KeyError: a ``dataset.json`` has none of ``sections``, or an entry lacks one of ``keys``.
        ValueError: ``source`` lists no volume.
    """
    source = os.path.expanduser(str(source))
    if os.path.isdir(source) and os.path.isfile(os.path.join(source, "dataset.json")):
        source = os.path.join(source, "dataset.json")
    if source.endswith(".json"):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"{source}: dataset.json not found.")
        items = _from_dataset_json(source, keys, sections)
    elif os.path.isdir(source) or _GLOB_CHARS & set(source):
        paths = find_images(source) if os.path.isdir(source) else sorted(glob.glob(source, recursive=True))
        if set(keys) != {"image"}:
            raise ValueError(f"{source}: only a dataset.json can pair images with {sorted(set(keys) - {'image'})}.")
        items = [{"image": p} for p in paths]
    else:
        raise FileNotFoundError(f"{source}: no such dataset.json, folder or glob match.")
    if num_items is not None:
        items = items[:num_items]
    if not items and source.endswith(".json"):
        raise ValueError(f"{source}: its lists {list(sections)} hold no item.")
    if not items:
        raise ValueError(f"{source}: no volumes found (looked for {', '.join(IMAGE_SUFFIXES)} and DICOM folders).")
    if must_exist:
        for item in items:
            for key in keys:
                if not os.path.exists(item[key]):
                    raise FileNotFoundError(f"{item[key]}: listed as '{key}' in {source}, but it does not exist.")
    return items
