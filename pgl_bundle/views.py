"""View sampling: the geometric half of PGL's augmentation module T (method spec, section 1, steps 1-2).

Every size, box and stride in this package is in MONAI layout: spatial axes ``(x, y, z)`` of a
``(C, x, y, z)`` array after ``Orientationd("RAS")``, the slice axis LAST. The paper's
"16 x 96 x 96" patch is ``(96, 96, 16)`` here.

Continuous coordinates: voxel ``i`` of an axis covers ``[i, i + 1)``, so a box ``[start, end)`` holds
``end - start`` voxels and its centre is ``(start + end) / 2``.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, RandomizableTransform

from .data.prepared import PreparedVolume

__all__ = ["GEOMETRY_ROWS", "GEOMETRY_START", "GEOMETRY_END", "GEOMETRY_SCALE", "GEOMETRY_FLIP", "RandPGLViewsd"]

# A view's geometry is one float tensor of shape (4, 3): a row per quantity, a column per spatial axis.
# It survives default collation as (B, 4, 3) and is what the aligner reads.
GEOMETRY_ROWS = ("start", "end", "scale", "flip")
GEOMETRY_START, GEOMETRY_END, GEOMETRY_SCALE, GEOMETRY_FLIP = range(4)


def overlap_ratio(start1: np.ndarray, end1: np.ndarray, start2: np.ndarray, end2: np.ndarray) -> np.ndarray:
    """Overlap of two boxes: intersection volume over the volume of the SMALLER box.

    Args:
        start1, end1, start2, end2: ``(..., 3)`` box corners in source-volume voxels.

    Returns:
        ``(...)`` ratio in [0, 1]; 1 when the smaller box lies inside the larger one.
    """
    extent = np.clip(np.minimum(end1, end2) - np.maximum(start1, start2), 0, None)
    smaller = np.minimum(np.prod(end1 - start1, axis=-1), np.prod(end2 - start2, axis=-1))
    return np.prod(extent, axis=-1) / smaller


def resize_trilinear(volume: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``F.interpolate(volume[None], size, mode="trilinear", align_corners=False)[0]``, computed as a bilinear
    resize of every z-plane then a linear one along z (the same separable weights, equal within float rounding).

    Hand-written because PyTorch's CPU trilinear kernel is slower than these two passes in one thread (1.0 vs 0.64 ms
    for a 134 x 134 x 22 box to 96 x 96 x 16, window included: ``scripts/benchmark_data.py parts``, docs/benchmarks.md
    section 5), and the resize is the largest part of a view's cost. Fastest when ``volume``'s memory holds the
    z-planes outermost, as a box read from a prepared volume does (:class:`~pgl_bundle.data.prepared.PreparedVolume`);
    any other layout is copied to it first.

    Args:
        volume: ``(C, x, y, z)`` float tensor.
        size: output ``(X, Y, Z)``.

    Returns:
        ``(C, X, Y, Z)`` tensor, a view of ``(C, Z, X, Y)``-ordered memory.
    """
    c, x, y, z = volume.shape
    out_x, out_y, out_z = (int(s) for s in size)
    planes = volume.permute(0, 3, 1, 2).reshape(1, c * z, x, y)  # no copy for z-planes outermost
    planes = F.interpolate(planes, size=(out_x, out_y), mode="bilinear", align_corners=False)  # (1, C*z, X, Y)
    # linear along z: a bilinear resize of (z, X*Y) images whose second axis keeps its size (its weights 1 and 0)
    planes = F.interpolate(
        planes.view(c, 1, z, out_x * out_y), size=(out_z, out_x * out_y), mode="bilinear", align_corners=False
    )
    return planes.view(c, out_z, out_x, out_y).permute(0, 2, 3, 1)


class RandPGLViewsd(RandomizableTransform, MapTransform):
    """Make PGL's two views of one volume and record their geometry.

    For each view independently: crop a box whose size per axis is ``U(scale_range) * roi_size`` (rounded to
    whole voxels), map ``intensity_range`` to [0, 1] (clipped) when given, resize it to ``roi_size`` (trilinear),
    then flip each axis with probability ``flip_prob``.
    The two boxes are redrawn until their :func:`overlap_ratio` is at least ``min_overlap``.

    Writes, for ``view_keys = ("view1", "view2")``:

    - ``view1``, ``view2``: ``(C, *roi_size)`` float tensors.
    - ``view1_geometry``, ``view2_geometry``: ``(4, 3)`` float tensors, rows :data:`GEOMETRY_ROWS`:
      box start and end in source voxels, resize factor ``roi_size / crop_size``, flip flag (0 or 1).

    The source key is removed (volumes of different shapes cannot be batched). It may be a tensor, a numpy array
    (e.g. a memory map) or a prepared volume on disk (:class:`~pgl_bundle.data.prepared.PreparedVolume`, from
    :class:`~pgl_bundle.data.prepared.LoadPreparedd`): then only the two boxes are read from it.

    Args:
        keys: the source image key (one key).
        roi_size: network input size ``(x, y, z)``.
        scale_range: crop size as a fraction of ``roi_size``; the spec's default is 110 % to 140 %.
        isotropic_scale: draw one factor for all axes (keeps the aspect ratio, the default) or one per axis.
        min_overlap: least :func:`overlap_ratio` of the two boxes.
        intensity_range: ``(low, high)`` mapped to ``(0, 1)`` and clipped, on each crop (e.g. the HU window of a
            prepared volume stored in HU); None: intensities as given.
        flip_prob: probability of flipping each axis of each view.
        view_keys: output keys of the two views.
        max_tries: batches of 64 candidate box pairs to draw before giving up.
        allow_missing_keys: as in MONAI's ``MapTransform``.

    Raises:
        ValueError: when the volume is smaller than the largest crop, or no pair of boxes reaches ``min_overlap``;
            the message names the file.
    """

    backend = [torch.Tensor]

    def __init__(
        self,
        keys: KeysCollection,
        roi_size: Sequence[int],
        scale_range: Sequence[float] = (1.1, 1.4),
        isotropic_scale: bool = True,
        min_overlap: float = 0.1,
        intensity_range: Sequence[float] | None = None,
        flip_prob: float = 0.5,
        view_keys: Sequence[str] = ("view1", "view2"),
        max_tries: int = 100,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob=1.0)
        if len(self.keys) != 1:
            raise ValueError(f"RandPGLViewsd takes one source key, got {self.keys}.")
        self.roi_size = np.asarray(roi_size, dtype=np.int64)
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        if not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range}.")
        self.isotropic_scale = isotropic_scale
        self.min_overlap = float(min_overlap)
        self.intensity_range = None if intensity_range is None else tuple(float(v) for v in intensity_range)
        self.flip_prob = float(flip_prob)
        self.view_keys = tuple(view_keys)
        self.max_tries = max_tries
        self._starts = self._ends = self._flips = np.zeros((2, 3))

    @property
    def max_crop_size(self) -> np.ndarray:
        """The largest crop a view can draw; a volume must be at least this big on every axis."""
        return np.round(self.scale_range[1] * self.roi_size).astype(np.int64)

    def randomize(self, spatial_shape: Sequence[int], name: str = "volume") -> None:
        """Draw both views' boxes and flips for a volume of ``spatial_shape``; stored for ``__call__``."""
        shape = np.asarray(spatial_shape, dtype=np.int64)
        if np.any(shape < self.max_crop_size):
            raise ValueError(
                f"{name}: spatial shape {tuple(shape.tolist())} is smaller than the largest PGL crop "
                f"{tuple(self.max_crop_size.tolist())} (roi_size {tuple(self.roi_size.tolist())} x "
                f"{self.scale_range[1]}); pad it (SpatialPadd) or use a smaller roi_size."
            )
        n = 64
        for _ in range(self.max_tries):
            factor_shape = (n, 2, 1) if self.isotropic_scale else (n, 2, 3)
            factors = self.R.uniform(*self.scale_range, size=factor_shape)
            sizes = np.round(factors * self.roi_size).astype(np.int64)
            starts = np.floor(self.R.uniform(size=(n, 2, 3)) * (shape - sizes + 1)).astype(np.int64)
            ends = starts + sizes
            ok = overlap_ratio(starts[:, 0], ends[:, 0], starts[:, 1], ends[:, 1]) >= self.min_overlap
            if ok.any():
                first = int(np.argmax(ok))
                self._starts, self._ends = starts[first], ends[first]
                self._flips = self.R.uniform(size=(2, 3)) < self.flip_prob
                return
        raise ValueError(
            f"{name}: no pair of crops of shape {tuple(shape.tolist())} reached overlap {self.min_overlap} "
            f"in {n * self.max_tries} draws."
        )

    def _make_view(
        self, image: torch.Tensor | np.ndarray | PreparedVolume, view: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        start, end, flip = self._starts[view], self._ends[view], self._flips[view]
        crop = image[:, start[0] : end[0], start[1] : end[1], start[2] : end[2]]
        if isinstance(crop, np.ndarray):
            crop = torch.from_numpy(crop if crop.flags.writeable else np.array(crop))
        # float32 with the z-planes outermost in memory, as resize_trilinear reads them (a prepared volume's box
        # already is: this copy only converts it)
        planes = crop.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        if self.intensity_range is not None:  # as ScaleIntensityRange(low, high, 0, 1, clip=True):
            low, high = self.intensity_range  # the clip here, its linear part after the resize (5x fewer voxels)
            planes.clamp_(low, high)
        out = resize_trilinear(planes.permute(0, 2, 3, 1), self.roi_size)
        if self.intensity_range is not None:
            out = out.sub_(low).div_(high - low)
        flip_dims = [axis + 1 for axis in range(3) if flip[axis]]
        if flip_dims:  # else left in resize_trilinear's memory order: collation copies it into the batch anyway
            out = torch.flip(out, flip_dims)
        geometry = np.stack([start, end, self.roi_size / (end - start), flip]).astype(np.float32)
        return out, torch.from_numpy(geometry)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        key = self.first_key(d)
        if key == []:
            return d
        image = d.pop(key)
        meta = image.meta if isinstance(image, MetaTensor) else {}
        name = meta.get("filename_or_obj", getattr(image, "filename", None) or key)
        if image.ndim != 4:
            raise ValueError(f"{name}: expected a channel-first 3D image (C, x, y, z), got shape {tuple(image.shape)}.")
        self.randomize(image.shape[1:], name=str(name))
        if isinstance(image, MetaTensor):
            source = image.as_tensor()
        else:  # a numpy array, memory map or prepared volume on disk stays one: _make_view copies only the boxes
            source = image if isinstance(image, (np.ndarray, PreparedVolume)) else torch.as_tensor(image)
        for view, view_key in enumerate(self.view_keys):
            d[view_key], d[f"{view_key}_geometry"] = self._make_view(source, view)
        return d
