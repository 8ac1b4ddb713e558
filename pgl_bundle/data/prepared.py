"""Prepared data: pretraining's deterministic preprocessing applied once per source volume, stored for memory maps.

At the paper's scale (about 1,800 CTs) a ``CacheDataset`` of float32 volumes needs of the order of 100 GB per process
(docs/benchmarks.md), and re-reading the sources at every start costs minutes. :func:`prepare` reads each source
once, applies :func:`deterministic_transforms` (RAS, optional resampling, foreground crop, padding), and writes

- ``<prepared_dir>/<name>_<hash>.zxy.npy``: one int16 array of HU per volume (raw HU, rounded: the intensity window
  stays a training setting, applied to each crop by :class:`~pgl_bundle.views.RandPGLViewsd`), stored with the slices
  outermost, ``(1, z, x, y)``, so that a crop box is one read per slice (:class:`PreparedVolume`; docs/benchmarks.md);
- ``<prepared_dir>/manifest.json``: the settings, and per source its path, size and mtime, the array's name, shape
  (as training sees it, ``(1, x, y, z)``), spacing, affine and dtype, the source's own shape and spacing, and a note
  when its values do not look like Hounsfield units; sources that cannot be used are listed with their problems (the
  messages of :func:`~pgl_bundle.data.checks.check_datalist`).

Each array is written to a temporary file and renamed, the manifest likewise (every few seconds and at the end), so
a killed run resumes: unchanged sources already prepared are skipped (one ``stat`` each), changed ones re-prepared,
all of them when the settings changed. Before reading any volume, the space the new arrays need is estimated from the
sources' headers and checked against the free space; a write that fails anyway (a full disk) removes its temporary
file, keeps what was prepared (in the manifest) and stops with a :class:`~pgl_bundle.errors.DiskSpaceError`.
Pretraining then reads only the manifest (:func:`load_prepared`) and maps the arrays (:class:`LoadPreparedd`): the OS
page cache shares their pages between DataLoader workers and ranks.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import logging
import os
import time
from collections.abc import Hashable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed

import ignite.distributed as idist
import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data.utils import affine_to_spacing
from monai.transforms import Compose, CropForegroundd, EnsureTyped, MapTransform, Orientationd, Spacingd, SpatialPadd
from tqdm import tqdm

from ..distributed import each_node_first
from ..errors import BadInputError, DiskSpaceError, InputNotFoundError, free_space, full_disk_error, size_text
from ..run_folder import check_writable
from .checks import _read, _summary, bad_items_error, check_hounsfield, check_image
from .datalist import load_datalist

__all__ = [
    "LoadPreparedd",
    "PreparedVolume",
    "deterministic_transforms",
    "estimated_bytes",
    "load_prepared",
    "prepare",
    "prepared_folder",
    "training_datalist",
]

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = 2  # bump when the stored layout changes: every volume is then prepared again (2: slices outermost)
STORED_DTYPE = "int16"  # chosen by measurement, docs/benchmarks.md
_MANIFEST_EVERY_S = 1.0  # a killed run loses at most this much of finished work
STORED_AXES = "zxy"  # in-plane rows stored whole, slices outermost: a crop box is one read per (channel, slice)
SUFFIX = f".{STORED_AXES}.npy"


def deterministic_transforms(
    hu_window: Sequence[float], pixdim: Sequence[float] | None = None, min_size: Sequence[int] | None = None
) -> list:
    """Pretraining's deterministic preprocessing of one ``{"image": (1, x, y, z) HU}`` item, kept in HU.

    RAS orientation, resampling to ``pixdim`` (bilinear; None keeps the file's spacing), a crop to the voxels above
    ``hu_window[0]`` (those the window does not map to 0), then padding with ``hu_window[0]`` up to ``min_size``.
    The window itself is applied to each view's crop (``RandPGLViewsd(intensity_range=hu_window)``); window then
    crop equals crop then window, so views are those of windowing the whole volume first.

    Returns:
        MONAI dictionary transforms on key ``image``, ending in float32.
    """
    low = float(hu_window[0])
    return [
        Orientationd("image", axcodes="RAS"),
        *([Spacingd("image", pixdim=pixdim, mode="bilinear")] if pixdim is not None else []),
        CropForegroundd("image", "image", select_fn=functools.partial(torch.gt, other=low), allow_smaller=True),
        *([SpatialPadd("image", spatial_size=min_size, value=low)] if min_size is not None else []),
        EnsureTyped("image", dtype=torch.float32),
    ]


@functools.lru_cache(maxsize=65536)
def _header(path: str, stamp: tuple[int, int, int]) -> tuple[tuple[int, ...], np.dtype, int]:
    """Stored shape, dtype and data offset of a prepared array, cached per file version (``stamp``: inode, size and
    mtime), so that a DataLoader worker parses each header once."""
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            header = {(1, 0): np.lib.format.read_array_header_1_0}.get(version, np.lib.format.read_array_header_2_0)
            shape, fortran_order, dtype = header(f)
        except ValueError as e:
            raise BadInputError(f"{path}: not a prepared .npy array ({e}).") from e
        if fortran_order or len(shape) != 4:
            raise BadInputError(f"{path}: not a prepared volume: shape {shape}, Fortran order {fortran_order}.")
        return tuple(shape), np.dtype(dtype), f.tell()


class PreparedVolume:
    """A prepared volume on disk, indexed as a ``(C, x, y, z)`` array and read box by box (``os.preadv``).

    The file is a C-ordered ``.npy`` array of shape ``(C, z, x, y)`` (name ending in ``.zxy.npy``, as
    :func:`prepare` writes): each slice's in-plane rows are contiguous. Slicing with unit-step slices
    (``volume[:, x0:x1, y0:y1, z0:z1]``) reads, for each channel and slice of the box, its rows ``x0:x1`` whole in
    ``y`` (one positional read each, 22 for a 22-slice box, through the OS page cache that all DataLoader workers and
    ranks share) and returns a ``(C, x, y, z)`` numpy view of that buffer (slices outermost in memory, as
    :func:`~pgl_bundle.views.resize_trilinear` reads them). Nothing else of the volume is read. Hand-written
    instead of a fresh ``np.load(mmap_mode="r")`` per sample: mapping a volume, faulting the box's pages in and
    unmapping it again costs about twice the CPU of reading the same pages (docs/benchmarks.md, section 5), and no
    mapped page stays counted in the process's RSS. ``np.asarray(volume)`` gives the whole ``(C, x, y, z)`` array as
    a read-only memory map (a transposed view).

    Args:
        path: a ``.zxy.npy`` file written by :func:`prepare`.

    Raises:
        BadInputError: the file is not a prepared ``(C, z, x, y)`` array, or is shorter than its header says.
    """

    def __init__(self, path: str) -> None:
        self.filename = os.fspath(path)
        if not self.filename.endswith(SUFFIX):
            raise BadInputError(
                f"{self.filename}: not a prepared array of this version (name not ending in {SUFFIX}: prepared by an "
                "older pgl_bundle, in another axis order?); run the prepare stage again."
            )
        stat = os.stat(self.filename)
        stamp = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        self.stored_shape, self.dtype, self.offset = _header(self.filename, stamp)
        c, z, x, y = self.stored_shape
        self.shape = (c, x, y, z)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        array = np.load(self.filename, mmap_mode="r").transpose(0, 2, 3, 1)
        return array.astype(dtype) if dtype is not None else np.array(array) if copy else array

    def __getitem__(self, index) -> np.ndarray:
        index = ((index if isinstance(index, tuple) else (index,)) + (slice(None),) * self.ndim)[: self.ndim]
        if not all(isinstance(i, slice) and i.step in (None, 1) for i in index):
            return np.asarray(self)[index]  # anything but a box: through a memory map
        (c0, c1), (x0, x1), (y0, y1), (z0, z1) = (i.indices(n)[:2] for i, n in zip(index, self.shape))
        _, depth, rows, width = self.stored_shape
        channels, slices, xs = range(c0, max(c0, c1)), range(z0, max(z0, z1)), range(x0, max(x0, x1))
        buffer = np.empty((len(channels), len(slices), len(xs), width), self.dtype)  # (C, z, x, whole y rows)
        if buffer.size:
            with open(self.filename, "rb", buffering=0) as f:
                for out, (c, z) in zip(buffer.reshape(-1, len(xs), width), itertools.product(channels, slices)):
                    start = self.offset + ((c * depth + z) * rows + x0) * width * self.dtype.itemsize
                    if os.preadv(f.fileno(), [out], start) != out.nbytes:
                        raise BadInputError(f"{self.filename}: shorter than its header says (truncated?).")
        return buffer[..., y0 : max(y0, y1)].transpose(0, 2, 3, 1)


class LoadPreparedd(MapTransform):
    """Replace each key's path to a prepared ``.npy`` with a :class:`PreparedVolume` of it (its header only).

    Hand-written because MONAI's ``LoadImage`` (``NumpyReader``) reads the whole array into memory;
    :class:`~pgl_bundle.views.RandPGLViewsd` then reads only its two crop boxes.
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, str]) -> dict[Hashable, PreparedVolume]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = PreparedVolume(d[key])
        return d


def _settings(hu_window, pixdim, min_size, min_image_size) -> dict:
    """What the stored arrays depend on; any change prepares every volume again."""
    return {
        "format": FORMAT,
        "dtype": STORED_DTYPE,
        "orientation": "RAS",
        "pixdim": None if pixdim is None else [float(p) for p in pixdim],
        "foreground_above_hu": float(hu_window[0]),
        "min_size": None if min_size is None else [int(s) for s in min_size],
        "min_image_size": None if min_image_size is None else [int(s) for s in min_image_size],
    }


def _stamp(path: str) -> list[int] | None:
    """``[size, mtime_ns]`` of a file, or summed / latest over a DICOM folder's files; None when it does not exist."""
    if os.path.isfile(path):
        stat = os.stat(path)
        return [stat.st_size, stat.st_mtime_ns]
    if os.path.isdir(path):
        stats = [e.stat() for e in os.scandir(path) if e.is_file()]
        return [sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0)]
    return None


def _array_name(source: str) -> str:
    stem = os.path.basename(source.rstrip(os.sep)).split(".")[0] or "volume"
    return f"{stem}_{hashlib.sha1(source.encode()).hexdigest()[:10]}{SUFFIX}"


def _header_geometry(source: str) -> tuple[np.ndarray, np.ndarray]:
    """Shape and spacing ``(x, y, z)`` of a volume from its header alone: nibabel for NIfTI, ITK (MONAI's reader of
    the other formats) for NRRD, MetaImage and DICOM series; no voxel is read."""
    if source.endswith((".nii", ".nii.gz")):
        header = nib.load(source).header
        return np.asarray(header.get_data_shape()[:3], float), np.asarray(header.get_zooms()[:3], float)
    import itk  # imported only for the formats that need it, as data.datalist does

    image = itk.Image[itk.F, 3]
    if os.path.isdir(source):
        files = itk.GDCMSeriesFileNames.New(Directory=source).GetInputFileNames()
        reader = itk.ImageSeriesReader[image].New(FileNames=files)
    else:
        reader = itk.ImageFileReader[image].New(FileName=source)
    reader.UpdateOutputInformation()
    output = reader.GetOutput()
    return np.asarray(output.GetLargestPossibleRegion().GetSize(), float), np.asarray(output.GetSpacing(), float)


def estimated_bytes(source: str, pixdim: Sequence[float] | None, min_size: Sequence[int] | None) -> int:
    """About the size of the array :func:`prepare` stores for ``source``, from its header alone: 2 bytes per voxel
    after resampling to ``pixdim`` and padding to ``min_size`` (the foreground crop only removes). 0 for a source
    whose header cannot be read or is not 3D (:func:`_prepare_one` reports it as unusable, with the input checks'
    message)."""
    try:
        shape, spacing = _header_geometry(source)
    except Exception:  # unreadable or foreign: _prepare_one reports it
        return 0
    if len(shape) < 3:
        return 0
    if pixdim is not None:
        shape = shape * spacing / np.asarray(pixdim, float)
    if min_size is not None:
        shape = np.maximum(shape, min_size)
    return 2 * int(np.prod(np.ceil(shape))) + 128


def _check_space(prepared_dir: str, todo: Sequence[str], settings: dict) -> None:
    """Stop before reading any volume when the arrays of ``todo`` (:func:`estimated_bytes`) do not fit on the disk."""
    need = sum(estimated_bytes(source, settings["pixdim"], settings["min_size"]) for source in todo) + (1 << 20)
    free, disk = free_space(prepared_dir)
    logger.info(
        f"{prepared_dir}: the {len(todo)} arrays to prepare need about {size_text(need)}, {size_text(free)} free."
    )
    if need > free:
        raise DiskSpaceError(
            28,
            f"not enough free disk space: preparing {len(todo)} volumes into {prepared_dir} needs about "
            f"{size_text(need)} (int16 arrays, estimated from the sources' headers), and its disk ({disk}) has "
            f"{size_text(free)} free. Free some space, or prepare onto another disk (--prepared_dir).",
        )


def _write_atomically(path: str, write, num_bytes: int) -> None:
    """``write(temporary)`` then rename it to ``path``; on any failure the temporary file is removed, and a full disk
    raises :class:`~pgl_bundle.errors.DiskSpaceError` naming the file, its size and the free space."""
    temporary = path[: -len(SUFFIX)] + ".tmp.npy" if path.endswith(SUFFIX) else path + ".tmp"
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        full = full_disk_error(e, os.path.dirname(path), num_bytes)
        if full is None:
            raise
        free, _ = free_space(os.path.dirname(path))
        raise DiskSpaceError(
            28,
            f"disk full: {path}: writing {size_text(num_bytes)} failed ({full.strerror or full}); {size_text(free)} "
            f"free on that disk. No partial file was left, and the volumes prepared so far are kept: free some space "
            "(or prepare onto another disk, --prepared_dir) and run again to go on.",
        ) from e


def _prepare_one(
    source: str, array_path: str, settings: dict, hu_window: Sequence[float], require_hu: bool = False
) -> dict:
    """Read, check and preprocess one source; write its array atomically. Returns its manifest entry: without an
    array when a check refuses it (a volume refused only by ``require_hu`` is prepared by a later run without it)."""
    image, problems = _read(source)
    if image is not None:
        problems = check_image(image, min_size=settings["min_image_size"], pixdim=settings["pixdim"])
    if problems:
        return {"problems": problems}
    not_hu = check_hounsfield(image)
    if not_hu and require_hu:
        return {"not_hu": not_hu}
    source = {"source_shape": list(image.shape[1:]), "source_spacing": affine_to_spacing(image.affine, r=3).tolist()}
    chain = Compose(deterministic_transforms(hu_window, settings["pixdim"], settings["min_size"]))
    volume = chain({"image": image})["image"]
    info = torch.iinfo(torch.int16)
    array = volume.as_tensor().round().clamp(info.min, info.max).to(torch.int16).numpy()  # (C, x, y, z)
    stored = np.ascontiguousarray(array.transpose(0, 3, 1, 2))  # (C, z, x, y): PreparedVolume
    _write_atomically(array_path, functools.partial(_save_npy, array=stored), stored.nbytes)
    return {
        "array": os.path.basename(array_path),
        "shape": list(array.shape),
        "dtype": str(array.dtype),
        "spacing": affine_to_spacing(volume.affine, r=3).tolist(),
        "affine": volume.affine.tolist(),
        **source,
        **({"not_hu": not_hu} if not_hu else {}),
    }


def _save_npy(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # np.save(path) would add ".npy" to a name not ending in it
        np.save(f, array)


def _write_manifest(
    prepared_dir: str, settings: dict, entries: dict[str, dict], order: Sequence[str], previous: dict | None = None
) -> None:
    manifest = {"settings": settings, "volumes": [{"source": s, **entries[s]} for s in order if s in entries]}
    if manifest == previous:  # nothing new: the processes that find a folder prepared (other ranks) write nothing
        return
    text = json.dumps(manifest, indent=1)

    def write(path: str) -> None:
        with open(path, "w") as f:
            f.write(text)

    _write_atomically(os.path.join(prepared_dir, MANIFEST), write, len(text))


def _read_manifest(prepared_dir: str) -> dict | None:
    path = os.path.join(prepared_dir, MANIFEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _single_thread() -> None:
    torch.set_num_threads(1)


def _report_bad(
    volumes: Sequence[dict], new: set[str], total: int, prepared_dir: str, skip_bad: bool, require_hu: bool = False
) -> None:
    """Raise for bad sources (check_datalist's messages), or leave them out: listed when first found, counted after.

    Volumes whose values do not look like Hounsfield units are warned about, one line per file, at every run (an
    error with ``require_hu``), as :func:`~pgl_bundle.data.checks.check_datalist` does.
    """
    not_hu = [f"{v['source']}: {v['not_hu']}" for v in volumes if "not_hu" in v]
    if not_hu and not require_hu:
        listing = "\n  ".join(not_hu)
        logger.warning(
            f"{len(not_hu)} of {total} volumes may not be CT in Hounsfield units (--require_hu True makes this an "
            f"error):\n  {listing}"
        )
    bad = [v for v in volumes if "problems" in v or (require_hu and "not_hu" in v)]
    if not bad:
        return
    problems = [f"{v['source']}: {p}" for v in bad for p in v.get("problems", [])] + (not_hu if require_hu else [])
    listing = "\n  ".join(problems)
    if not skip_bad:
        raise bad_items_error(problems, len(bad), total)
    if require_hu or new & {v["source"] for v in bad}:
        logger.warning(f"leaving out {len(bad)} of {total} datalist items:\n  {listing}")
    else:
        logger.warning(f"leaving out {len(bad)} of {total} datalist items, listed in {prepared_dir}/{MANIFEST}.")


def _good_items(prepared_dir: str, volumes: Sequence[dict], require_hu: bool = False) -> list[dict]:
    """The usable volumes as datalist items; logs how many there are and their source shape and spacing ranges."""
    good = [v for v in volumes if "array" in v and not (require_hu and "not_hu" in v)]
    if not good:
        raise BadInputError(f"{prepared_dir}: no usable volume prepared (of {len(volumes)}).")
    # manifests written before the source geometry was recorded: the stored array's (the crop removes little)
    geometries = [
        (tuple(v.get("source_shape", v["shape"][1:])), tuple(v.get("source_spacing", v["spacing"]))) for v in good
    ]
    logger.info(f"{len(good)} volumes to use: {_summary(geometries)} (prepared in {prepared_dir}).")
    return [{"image": os.path.join(prepared_dir, v["array"])} for v in good]


def prepare(
    dataset_dir: str,
    prepared_dir: str,
    hu_window: Sequence[float] = (-200, 300),  # pretrain.json's default: a prepared set loads there as is
    pixdim: Sequence[float] | None = None,
    min_size: Sequence[int] | None = (134, 134, 22),
    min_image_size: Sequence[int] | None = (96, 96, 16),
    num_items: int | None = None,
    num_workers: int = 1,
    skip_bad: bool = True,
    require_hu: bool = False,
) -> list[dict]:
    """Prepare every volume of ``dataset_dir`` into ``prepared_dir`` (see the module docstring); resumable.

    Args:
        dataset_dir: a dataset.json, folder or glob (:func:`~pgl_bundle.data.load_datalist`).
        prepared_dir: where the arrays and ``manifest.json`` go (created).
        hu_window: pretraining's HU window; its lower bound decides the foreground crop and the padding value.
        pixdim: spacing to resample to; None keeps each file's own.
        min_size: pad each volume up to this ``(x, y, z)`` (pretraining's largest crop).
        min_image_size: least size of a usable source after resampling (the patch size); None: no check.
        num_items: only the first ``num_items`` of the datalist.
        num_workers: processes preparing volumes in parallel.
        skip_bad: leave unusable sources out (listed once, in the log and the manifest) instead of raising.
        require_hu: a source whose values do not look like Hounsfield units is unusable (else a warning).

    Returns:
        ``[{"image": path of a prepared .npy}, ...]`` for the usable sources, in datalist order.

    Raises:
        BadInputError: (without ``skip_bad``) some source cannot be used, after the others are prepared; the message
            lists every file and its problem, as ``check_datalist`` does. Also when no source is usable.
        OutputFolderError: ``prepared_dir`` cannot be written (before any volume is read).
        DiskSpaceError: the arrays to prepare need more space than is free (before any volume is read), or a write
            failed on a full disk (what was prepared is kept; run again to go on).
    """
    check_writable({prepared_dir: "--prepared_dir"})
    items = load_datalist(dataset_dir, keys=["image"], num_items=num_items, must_exist=False)
    sources = [os.path.abspath(str(item["image"])) for item in items]
    settings = _settings(hu_window, pixdim, min_size, min_image_size)
    previous = _read_manifest(prepared_dir)
    if previous is not None and previous.get("settings") != settings:
        logger.info(f"{prepared_dir}: preparation settings changed, preparing every volume again")
        previous = None
    known = {v["source"]: v for v in previous["volumes"]} if previous else {}
    entries, todo = {}, []
    for source in sources:
        stamp, old = _stamp(source), known.get(source)
        done = old is not None and old.get("stamp") == stamp and stamp is not None
        refused = "problems" in old or (require_hu and "array" not in old) if done else False
        if done and (refused or os.path.isfile(os.path.join(prepared_dir, old.get("array", "")))):
            entries[source] = old
        else:
            todo.append((source, stamp))
    # volumes of other datalists (or beyond num_items) stay while their source exists: a short run loses nothing
    others = [s for s in known if s not in sources and known[s]["stamp"] is not None and _stamp(s) == known[s]["stamp"]]
    entries.update({s: known[s] for s in others})
    num_workers = max(1, num_workers)
    if todo:
        _check_space(prepared_dir, [source for source, _ in todo], settings)
        logger.info(f"preparing {len(todo)} of {len(sources)} volumes into {prepared_dir} ({num_workers} processes)")
    created = not os.path.isdir(prepared_dir)
    os.makedirs(prepared_dir, exist_ok=True)
    last_write = time.monotonic()
    with ProcessPoolExecutor(num_workers, initializer=_single_thread) as pool:
        futures = {
            pool.submit(
                _prepare_one, source, os.path.join(prepared_dir, _array_name(source)), settings, hu_window, require_hu
            ): (source, stamp)
            for source, stamp in todo
        }
        try:
            for future in tqdm(as_completed(futures), total=len(futures), desc="prepare", disable=not futures):
                source, stamp = futures[future]
                entries[source] = {"stamp": stamp, **future.result()}
                if time.monotonic() - last_write > _MANIFEST_EVERY_S:
                    _write_manifest(prepared_dir, settings, entries, sources + others)
                    last_write = time.monotonic()
        except BaseException:  # keep what was prepared (a later run goes on from there), start nothing new
            pool.shutdown(cancel_futures=True)
            if any(source in entries for source, _ in todo):
                with contextlib.suppress(Exception):
                    _write_manifest(prepared_dir, settings, entries, sources + others)
            elif created:
                with contextlib.suppress(OSError):
                    os.rmdir(prepared_dir)
            raise
    _write_manifest(prepared_dir, settings, entries, sources + others, previous)
    kept = {e["array"] for e in entries.values() if "array" in e}
    for name in os.listdir(prepared_dir):  # arrays of sources gone or changed, and temporaries of a killed run
        if name.endswith(".npy") and name not in kept:
            os.remove(os.path.join(prepared_dir, name))
    volumes = [{"source": s, **entries[s]} for s in sources]
    _report_bad(volumes, {s for s, _ in todo}, len(sources), prepared_dir, skip_bad, require_hu)
    return _good_items(prepared_dir, volumes, require_hu)


def load_prepared(
    prepared_dir: str,
    hu_window: Sequence[float] = (-200, 300),  # pretrain.json's default: a prepared set loads there as is
    pixdim: Sequence[float] | None = None,
    min_size: Sequence[int] | None = (134, 134, 22),
    min_image_size: Sequence[int] | None = (96, 96, 16),
    num_items: int | None = None,
    require_hu: bool = False,
) -> list[dict]:
    """The usable volumes of a prepared folder, from its manifest alone (no volume is read).

    Raises:
        InputNotFoundError: ``prepared_dir`` has no manifest.
        BadInputError: it was prepared with other settings than these (names them), or holds no usable volume.
    """
    manifest = _read_manifest(prepared_dir)
    if manifest is None:
        raise InputNotFoundError(f"{prepared_dir}: no {MANIFEST}; run the prepare stage first (docs/production.md).")
    settings, stored = _settings(hu_window, pixdim, min_size, min_image_size), manifest["settings"]
    differ = {k: (stored.get(k), v) for k, v in settings.items() if stored.get(k) != v}
    if differ:
        listing = ", ".join(f"{k}: {a} there, {b} here" for k, (a, b) in differ.items())
        raise BadInputError(f"{prepared_dir}: prepared with other settings ({listing}); run the prepare stage again.")
    volumes = manifest["volumes"][:num_items] if num_items is not None else manifest["volumes"]
    _report_bad(volumes, set(), len(volumes), prepared_dir, skip_bad=True, require_hu=require_hu)
    return _good_items(prepared_dir, volumes, require_hu)


def prepared_folder(dataset_dir: str, prepared_dir: str, cache_dir: str) -> str:
    """The folder :func:`training_datalist` prepares into, ``prepared_dir`` or the cache in ``cache_dir``; "" when it
    only reads an already prepared folder (for :func:`~pgl_bundle.run_folder.check_writable`)."""
    return "" if prepared_dir and not dataset_dir else prepared_dir or cache_dir


def training_datalist(
    dataset_dir: str,
    prepared_dir: str,
    synthetic_dir: str,
    cache_dir: str,
    num_workers: int = 1,
    skip_bad: bool = False,
    storage: str = "shared",
    **settings,
) -> list[dict]:
    """Pretraining's datalist of prepared volumes, whichever of ``dataset_dir`` / ``prepared_dir`` is given.

    - ``prepared_dir`` alone: its manifest (:func:`load_prepared`);
    - ``dataset_dir`` (or neither: the embedded synthetic set in ``synthetic_dir``): :func:`prepare` it into
      ``prepared_dir``, or without one into a folder of ``cache_dir`` named after the source, reused by later runs.

    Under ``torchrun``, with ``storage`` "shared" (the prepared folder on storage that every node reads), rank 0
    prepares while the others wait at a barrier; with "local" (a folder on each node's own disk) the first process of
    each node prepares its node's copy (:func:`~pgl_bundle.distributed.each_node_first`). The process group's timeout
    bounds that wait: prepare large sets beforehand. The embedded synthetic set is made by rank 0 either way (in
    ``synthetic_dir``, on shared storage). ``settings``: ``hu_window``, ``pixdim``, ``min_size``,
    ``min_image_size``, ``num_items``, ``require_hu``, as in :func:`prepare`.
    """
    if storage not in ("shared", "local"):
        raise ValueError(f"prepared_storage: 'shared' or 'local', not {storage!r} (docs/production.md, Multi-node).")
    with idist.one_rank_first():
        if prepared_dir and not dataset_dir:
            return load_prepared(prepared_dir, **settings)
        from . import resolve_dataset

        source = os.path.abspath(resolve_dataset(dataset_dir, synthetic_dir))
    if not prepared_dir:
        name = os.path.basename(os.path.dirname(source) if source.endswith(".json") else source.rstrip(os.sep))
        prepared_dir = os.path.join(cache_dir, f"{name}_{hashlib.sha1(source.encode()).hexdigest()[:10]}")
        logger.info(f"no prepared_dir given: using the prepared-data cache {prepared_dir} for {source}")
    with idist.one_rank_first() if storage == "shared" else each_node_first():
        return prepare(source, prepared_dir, num_workers=num_workers, skip_bad=skip_bad, **settings)
