"""The dense probe: a frozen encoder and a per-voxel linear classifier on all of its feature maps.

Sizes and strides are ``(x, y, z)``, slice axis last (see :mod:`pgl_bundle.views`).

The probe measures what an encoder's features already say about every voxel, without changing them: the
encoder is frozen (no gradient, BatchNorm running statistics fixed) and only :class:`DenseProbeHead` is trained.
The head is linear in the features ("hypercolumn" probe): per feature map, a per-channel standardisation
(``BatchNorm3d`` without affine parameters, as in MAE's linear probe: stages of an untrained or a pretrained
encoder differ in scale by orders of magnitude) and a 1x1x1 convolution to class logits; each map's logits are
resampled trilinearly to the input grid and the maps' logits are summed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pgl_bundle.networks.encoder import PGLResNetEncoder, feature_center_offset
from torch import nn

__all__ = ["DenseProbe", "DenseProbeHead", "feature_grid"]


def feature_grid(
    input_size: list[int], feature_size: list[int], stride: list[int], offset: list[float]
) -> torch.Tensor:
    """The ``grid_sample`` grid that reads a strided feature map at the centre of every input voxel.

    Output voxel ``k`` of a network with total stride ``S`` and centre offset ``o`` (:func:`feature_center_offset`)
    is centred at input coordinate ``(k + 0.5) * S + o``, so input voxel ``u`` (centre ``u + 0.5``) lies at
    feature index ``(u + 0.5 - o) / S - 0.5``. ``F.interpolate`` would assume ``o = 0``: half a stride off per
    stage, 7.5 voxels in-plane for the deepest map. Positions outside the map take its border value.

    Returns:
        ``(1, *input_size, 3)``, normalised for ``grid_sample(..., align_corners=True)`` (last axis: the
        feature map's last spatial axis first, as ``grid_sample`` wants).
    """
    # no Python branch on the sizes: TorchScript scripts this inside the segmentation network, and a trace of it
    # stays valid for other input sizes (a map of size 1 reads its one value wherever the grid points)
    axes: list[torch.Tensor] = []
    for n_in, n_f, s, o in zip(input_size, feature_size, stride, offset):
        k = (torch.arange(n_in, dtype=torch.float32) + 0.5 - o) / s - 0.5
        axes.append(2 * k / torch.tensor(n_f - 1).clamp(min=1) - 1)
    grid = torch.stack(torch.meshgrid(axes, indexing="ij"), dim=-1)  # (*input_size, 3) in (x, y, z) order
    return grid.flip(-1).unsqueeze(0)


class DenseProbeHead(nn.Module):
    """Per-voxel linear classifier on the feature maps of a :class:`PGLResNetEncoder` (see the module docstring).

    For feature map ``i`` (``C_i`` channels, total stride ``S_i``): ``BatchNorm3d(C_i, affine=False)``, then
    ``Conv3d(C_i, num_classes, 1)``, then trilinear resampling to the input grid at the feature voxels' true
    centres (:func:`feature_grid`); the logits of the five maps are summed. Trainable: ``sum_i (C_i + 1) *
    num_classes`` weights (3,914 for two classes and the small encoder ``[32, 64, 128, 256]`` bottleneck).

    Args:
        encoder: the encoder whose maps it reads (for their channels, strides and offsets; not kept).
        num_classes: classes, background included.

    Shapes: a list of the encoder's feature maps ``(B, C_i, *(input_size / S_i))`` and ``input_size`` ->
    logits ``(B, num_classes, *input_size)``.
    """

    def __init__(self, encoder: PGLResNetEncoder, num_classes: int) -> None:
        super().__init__()
        self.norms = nn.ModuleList(nn.BatchNorm3d(c, affine=False) for c in encoder.out_channels)
        self.classifiers = nn.ModuleList(nn.Conv3d(c, num_classes, kernel_size=1) for c in encoder.out_channels)
        strides = encoder.stage_strides  # plain Python, not tensors: the network may be built on the meta device
        self.strides = [
            [math.prod(s[axis] for s in strides[: i + 1]) for axis in range(3)] for i in range(len(strides))
        ]
        self.offsets = [list(feature_center_offset(strides[: i + 1])) for i in range(len(strides))]

    def forward(self, features: list[torch.Tensor], input_size: list[int]) -> torch.Tensor:
        logits = torch.zeros(0)
        for i, (norm, classifier) in enumerate(zip(self.norms, self.classifiers)):
            y = classifier(norm(features[i]))
            grid = feature_grid(input_size, y.shape[2:], self.strides[i], self.offsets[i]).to(y.device, y.dtype)
            grid = grid.expand(y.shape[0], -1, -1, -1, -1)
            y = F.grid_sample(y, grid, mode="bilinear", padding_mode="border", align_corners=True)
            logits = y if i == 0 else logits + y
        return logits


class DenseProbe(nn.Module):
    """A frozen encoder and a trainable :class:`DenseProbeHead`.

    The encoder gets ``requires_grad = False``, runs under ``torch.no_grad()`` (no activations are kept for a
    backward pass), and stays in eval mode whatever ``train()`` is called with: MONAI's ``SupervisedTrainer`` calls
    ``network.train()`` every iteration, which would otherwise let BatchNorm update its running statistics.
    Load weights into ``probe.encoder`` (e.g. :func:`pgl_bundle.transfer.load_pretrained_encoder`); they stay frozen.

    Args:
        encoder: a :class:`PGLResNetEncoder`.
        num_classes: classes, background included.

    Input ``(B, C, x, y, z)`` with sizes divisible by ``encoder.output_stride``; output: logits
    ``(B, num_classes, x, y, z)``.
    """

    def __init__(self, encoder: PGLResNetEncoder, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder.requires_grad_(False).eval()
        self.head = DenseProbeHead(encoder, num_classes)

    def train(self, mode: bool = True) -> DenseProbe:
        super().train(mode)
        self.encoder.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = self.encoder(x)
        return self.head(features, x.shape[2:])
