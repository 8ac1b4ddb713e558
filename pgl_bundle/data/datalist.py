"""Datalists from an MSD-style dataset.json, a folder, a glob or one volume; every path checked before training."""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Sequence

from monai.data import load_decathlon_datalist
from pgl_bundle.errors import BadInputError, InputNotFoundError, found_instead

__all__ = ["IMAGE_SUFFIXES", "dicom_series", "find_images", "load_datalist"]

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
_GLOB_CHARS = set("*?[")


def dicom_series(folder: str) -> list[tuple[str, str, int]]:
    """The DICOM series in ``folder`` as ITK (and so MONAI's ``ITKReader``) splits them: ``(uid, description,
    number of files)`` each. ITK is MONAI's DICOM reader; it is imported here only when a DICOM folder is found."""
    import itk

    names = itk.GDCMSeriesFileNames.New()
    names.SetUseSeriesDetails(True)  # the settings of MONAI's ITKReader, so that the count is the one it reads from
    names.AddSeriesRestriction("0008|0021")
    names.SetGlobalWarningDisplay(False)
    names.SetDirectory(folder)
    series = []
    for uid in names.GetSeriesUIDs():
        files = names.GetFileNames(uid)
        io = itk.GDCMImageIO.New()
        io.SetFileName(files[0])
        io.ReadImageInformation()
        header = io.GetMetaDataDictionary()
        description = str(header["0008|103e"]).strip() if header.HasKey("0008|103e") else ""
        series_uid = str(header["0020|000e"]).strip() if header.HasKey("0020|000e") else uid
        series.append((series_uid, description or "no description", len(files)))
    return series


def _is_dicom_file(path: str) -> bool:
    """A DICOM Part 10 file: ``DICM`` after its 128-byte preamble."""
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _is_dicom_series(folder: str) -> bool:
    """A folder of DICOM files (no known volume format among them): read it as one DICOM series (ITK)."""
    files = sorted(f for f in os.listdir(folder) if os.path.isfile(os.path.join(folder, f)) and not f.startswith("."))
    if not files or any(f.lower().endswith(IMAGE_SUFFIXES + (".json",)) for f in files):
        return False
    return any(_is_dicom_file(os.path.join(folder, f)) for f in files[:3])


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
        raise BadInputError(f"{path}: has none of the lists {list(sections)} (found {found}).")
    items: list[dict] = []
    for section in sections:
        if section not in sections_present:
            continue
        for item in load_decathlon_datalist(path, is_segmentation=True, data_list_key=section):
            missing = [k for k in keys if k not in item]
            if missing:
                raise BadInputError(f"{path}: an entry of '{section}' lacks the key(s) {missing}: {item}")
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
            below it, see :func:`find_images`); a glob pattern; or one volume file.
        keys: keys each item must have (``("image",)`` for pretraining, ``("image", "label")`` downstream). Only
            a ``dataset.json`` can provide keys other than ``image``.
        sections: the ``dataset.json`` lists to read, in order.
        num_items: keep only the first ``num_items`` items (None: all).
        must_exist: raise when a listed file does not exist; False leaves that to
            :func:`~pgl_bundle.data.checks.check_datalist`, which reports every bad file at once.

    Raises:
        InputNotFoundError: ``source`` or a listed file does not exist (the message names it, and what its nearest
            existing folder holds instead).
        BadInputError: a ``dataset.json`` has none of ``sections``, an entry lacks one of ``keys``, or ``source``
            lists no volume.
    """
    source = os.path.expanduser(str(source))
    if os.path.isdir(source) and os.path.isfile(os.path.join(source, "dataset.json")):
        source = os.path.join(source, "dataset.json")
    if source.endswith(".json"):
        if not os.path.isfile(source):
            raise InputNotFoundError(f"{source}: dataset.json not found; {found_instead(source)}.")
        items = _from_dataset_json(source, keys, sections)
    elif os.path.isfile(source) and source.lower().endswith(IMAGE_SUFFIXES):
        if set(keys) != {"image"}:
            raise BadInputError(
                f"{source}: one volume, but {sorted(set(keys) - {'image'})} are needed too: give a "
                "dataset.json that pairs them."
            )
        items = [{"image": source}]
    elif os.path.isfile(source):
        raise BadInputError(
            f"{source}: not a dataset.json nor a volume ({', '.join(IMAGE_SUFFIXES)}); give a "
            "dataset.json, a folder, a glob pattern or one volume."
        )
    elif os.path.isdir(source) or _GLOB_CHARS & set(source):
        paths = find_images(source) if os.path.isdir(source) else sorted(glob.glob(source, recursive=True))
        if set(keys) != {"image"}:
            raise BadInputError(f"{source}: only a dataset.json can pair images with {sorted(set(keys) - {'image'})}.")
        items = [{"image": p} for p in paths]
    else:
        raise InputNotFoundError(
            f"{source}: not found (looked for a dataset.json, a volume ({', '.join(IMAGE_SUFFIXES)}), a folder or a "
            f"glob pattern of that name); {found_instead(source)}."
        )
    if num_items is not None:
        items = items[:num_items]
    if not items and source.endswith(".json"):
        raise BadInputError(f"{source}: its lists {list(sections)} hold no item.")
    if not items and os.path.isdir(source):
        raise BadInputError(
            f"{source}: no volumes found (looked for {', '.join(IMAGE_SUFFIXES)} and DICOM "
            f"folders); {found_instead(os.path.join(source, '*'))}."
        )
    if not items:
        raise InputNotFoundError(f"{source}: the glob pattern matches no file; {found_instead(source)}.")
    if must_exist:
        for item in items:
            for key in keys:
                if not os.path.exists(item[key]):
                    raise InputNotFoundError(
                        f"{item[key]}: listed as '{key}' in {source}, but it does not exist; "
                        f"{found_instead(item[key])}."
                    )
    return items
