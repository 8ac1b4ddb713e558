"""Intensity half of PGL's augmentation module T (method spec, section 1, steps 3-6).

Written by hand rather than chained from MONAI's ``RandGaussianNoised``, ``RandGaussianSmoothd``,
``RandScaleIntensityd`` and ``RandAdjustContrastd`` because (a) a MONAI dictionary transform draws ONE
random decision for all its keys, while PGL augments each view independently, (b) the spec's
distributions differ from theirs (noise *variance* ~ U(0, 0.1); contrast followed by a clip to the
input range; gamma followed by a rescale to [0, 1]), and (c) the views are plain tensors on the hot
path, where skipping MetaTensor bookkeeping is measurably faster (``scripts/benchmark_views.py``).
The Gaussian blur uses MONAI's kernel (:func:`monai.networks.layers.convutils.gaussian_1d`, as ``GaussianFilter``)
applied by :func:`gaussian_blur`.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.networks.layers.convutils import gaussian_1d
from monai.transforms import MapTransform, RandomizableTransform

__all__ = ["RandPGLIntensityd", "gaussian_blur"]


def gaussian_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """MONAI's ``GaussianFilter(3, sigma)(img[None])[0]`` (the same kernel, truncated at 4 sigma, zero padding),
    computed as a weighted sum of shifted copies along each spatial axis.

    Hand-written because ``GaussianFilter``'s separable ``conv3d`` with one-voxel-thin kernels is about 3x slower on a
    CPU in one thread (2.6 vs 0.8 ms for a 96 x 96 x 16 view, sigma 1: ``scripts/benchmark_data.py parts``,
    docs/benchmarks.md section 5).

    Args:
        img: ``(C, x, y, z)`` float tensor.
        sigma: standard deviation in voxels, the same on every axis.

    Returns:
        ``(C, x, y, z)`` tensor.
    """
    weights = gaussian_1d(torch.tensor(sigma), truncated=4.0, approx="erf", normalize=False).tolist()
    radius = (len(weights) - 1) // 2
    for axis in (1, 2, 3):
        padded = F.pad(img, [0, 0] * (3 - axis) + [radius, radius])
        length = img.shape[axis]
        img = padded.narrow(axis, 0, length) * weights[0]
        for shift, weight in enumerate(weights[1:], start=1):
            img.add_(padded.narrow(axis, shift, length), alpha=weight)
    return img


class RandPGLIntensityd(RandomizableTransform, MapTransform):
    """Apply the spec's four intensity augmentations to every key, with independent draws per key.

    In order, each with its own probability:

    1. additive white Gaussian noise, variance ``~ U(noise_variance)`` (p = ``noise_prob``);
    2. Gaussian blur, sigma ``~ U(blur_sigma)`` voxels on every axis (p = ``blur_prob``);
    3. brightness/contrast: multiply by ``c ~ U(contrast_range)``, clip to the view's range before the
       multiplication (p = ``contrast_prob``);
    4. gamma: ``i ** lambda`` with ``lambda ~ U(gamma_range)`` on ``max(i, 0)`` (noise can make voxels negative),
       then min-max rescale to [0, 1] (p = ``gamma_prob``).

    Args:
        keys: view keys, each a ``(C, x, y, z)`` float tensor.
        allow_missing_keys: as in MONAI's ``MapTransform``.
    """

    backend = [torch.Tensor]

    def __init__(
        self,
        keys: KeysCollection,
        noise_prob: float = 0.1,
        noise_variance: Sequence[float] = (0.0, 0.1),
        blur_prob: float = 0.2,
        blur_sigma: Sequence[float] = (0.5, 1.0),
        contrast_prob: float = 0.5,
        contrast_range: Sequence[float] = (0.75, 1.25),
        gamma_prob: float = 0.5,
        gamma_range: Sequence[float] = (0.7, 1.5),
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob=1.0)
        self.noise_prob, self.noise_variance = noise_prob, tuple(noise_variance)
        self.blur_prob, self.blur_sigma = blur_prob, tuple(blur_sigma)
        self.contrast_prob, self.contrast_range = contrast_prob, tuple(contrast_range)
        self.gamma_prob, self.gamma_range = gamma_prob, tuple(gamma_range)

    def _draw(self, prob: float, value_range: tuple[float, float]) -> float | None:
        """A value from ``U(value_range)`` with probability ``prob``, else None (step skipped)."""
        return float(self.R.uniform(*value_range)) if self.R.uniform() < prob else None

    def _augment(self, img: torch.Tensor) -> torch.Tensor:
        variance = self._draw(self.noise_prob, self.noise_variance)
        sigma = self._draw(self.blur_prob, self.blur_sigma)
        contrast = self._draw(self.contrast_prob, self.contrast_range)
        gamma = self._draw(self.gamma_prob, self.gamma_range)
        if variance is not None:
            generator = torch.Generator().manual_seed(int(self.R.randint(2**31)))
            img = img + torch.randn(img.shape, generator=generator, dtype=img.dtype) * variance**0.5
        if sigma is not None:
            img = gaussian_blur(img, sigma)
        if contrast is not None:
            low, high = torch.aminmax(img)
            img = (img * contrast).clamp_(low, high)
        if gamma is not None:  # in place on the new tensor of clamp_min, as the steps above: one allocation each
            img = img.clamp_min(0).pow_(gamma)
            low, high = torch.aminmax(img)
            img = img.sub_(low).div_((high - low).clamp_min(1e-8))
        return img

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self._augment(torch.as_tensor(d[key]))
        return d
