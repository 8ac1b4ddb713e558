"""PGL's prior-guided aligner (method spec, section 3): FlipAlign, then CSAlign with a batched 3D RoIAlign.

Coordinates follow :mod:`pgl_bundle.views`: axes ``(x, y, z)``, voxel ``i`` covers ``[i, i + 1)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from pgl_bundle.views import GEOMETRY_END, GEOMETRY_FLIP, GEOMETRY_SCALE, GEOMETRY_START
from torch import nn

__all__ = ["PriorGuidedAligner", "csalign_boxes", "flip_align", "roi_align_3d"]


def flip_align(features: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """FlipAlign: undo each sample's input flips on its feature map, batched without a Python loop over samples.

    Args:
        features: ``(B, C, x, y, z)``.
        flips: ``(B, 3)``, nonzero where that sample's view was flipped along that axis.
    """
    for axis in range(3):
        flipped = (flips[:, axis] != 0).view(-1, 1, 1, 1, 1)
        features = torch.where(flipped, features.flip(2 + axis), features)
    return features


def csalign_boxes(
    geometry1: torch.Tensor,
    geometry2: torch.Tensor,
    output_stride: Sequence[int],
    feature_offset: Sequence[float] = (0.0, 0.0, 0.0),
) -> tuple[torch.Tensor, torch.Tensor]:
    """CSAlign: the two views' common region, as a continuous box in each view's (flip-aligned) feature map.

    Per axis, with view ``i`` covering ``[start_i, end_i)`` of the source volume:

    - overlap in the source: ``s = max(start_1, start_2)``, ``e = min(end_1, end_2)``;
    - in view ``i``'s crop frame: ``s - start_i``, ``e - start_i``;
    - in its resized frame: times the resize factor ``roi_size / crop_size``;
    - in feature coordinates: minus the encoder's centre offset (mirrored on flipped axes, see
      :func:`pgl_bundle.networks.encoder.feature_center_offset`), over the output stride.

    No rounding anywhere: boxes stay sub-voxel.

    Args:
        geometry1, geometry2: ``(B, 4, 3)`` view geometries (:data:`pgl_bundle.views.GEOMETRY_ROWS`).
        output_stride: encoder stride per axis.
        feature_offset: encoder centre offset per axis, in input voxels.

    Returns:
        two ``(B, 2, 3)`` boxes ``[start, end]`` in the feature coordinates of view 1 and of view 2.
    """
    stride = geometry1.new_tensor(output_stride)
    offset = geometry1.new_tensor(feature_offset)
    start = torch.maximum(geometry1[:, GEOMETRY_START], geometry2[:, GEOMETRY_START])
    end = torch.minimum(geometry1[:, GEOMETRY_END], geometry2[:, GEOMETRY_END])
    boxes = []
    for geometry in (geometry1, geometry2):
        corners = torch.stack([start, end], dim=1) - geometry[:, None, GEOMETRY_START]  # crop frame
        corners = corners * geometry[:, None, GEOMETRY_SCALE]  # resized frame
        mirror = 1 - 2 * geometry[:, None, GEOMETRY_FLIP]  # -1 on flipped axes
        boxes.append((corners - mirror * offset) / stride)
    return boxes[0], boxes[1]


def roi_align_3d(features: torch.Tensor, boxes: torch.Tensor, output_size: Sequence[int]) -> torch.Tensor:
    """3D RoIAlign: resample each sample's box to ``output_size`` with trilinear interpolation.

    Output voxel ``k`` along an axis samples the continuous coordinate ``start + (k + 0.5) * (end - start) / n``,
    where the input's voxel ``j`` is centred at ``j + 0.5``. One ``grid_sample`` call for the whole batch;
    points within half a voxel of the map's edge take the edge value. Written here because MONAI and PyTorch
    only have 2D RoIAlign (torchvision). Sampling positions and interpolation are computed in float32 whatever
    the features' dtype (bf16 keeps only 8 bits of a position), and the result is cast back to it.

    Args:
        features: ``(B, C, x, y, z)``.
        boxes: ``(B, 2, 3)`` continuous ``[start, end]`` per axis, in voxels of ``features``.
        output_size: ``(n_x, n_y, n_z)``.

    Returns:
        ``(B, C, n_x, n_y, n_z)``.
    """
    batch = features.shape[0]
    boxes = boxes.float()
    size_in = boxes.new_tensor(features.shape[2:])
    coords = []
    for axis, n in enumerate(output_size):
        steps = (torch.arange(n, device=features.device, dtype=torch.float32) + 0.5) / n
        start, end = boxes[:, 0, axis : axis + 1], boxes[:, 1, axis : axis + 1]
        coords.append(2 * (start + steps * (end - start)) / size_in[axis] - 1)  # (B, n), grid_sample's [-1, 1]
    shape = (batch, *output_size)
    grid = torch.stack(  # grid_sample wants (W, H, D) order: our (z, y, x)
        [
            coords[2][:, None, None, :].expand(shape),
            coords[1][:, None, :, None].expand(shape),
            coords[0][:, :, None, None].expand(shape),
        ],
        dim=-1,
    )
    aligned = F.grid_sample(features.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return aligned.to(features.dtype)


class PriorGuidedAligner(nn.Module):
    """Align two views' feature maps so voxel ``(a, b, c)`` of both describes the same place of the source.

    FlipAlign (:func:`flip_align`), then CSAlign (:func:`csalign_boxes`) and a RoIAlign
    (:func:`roi_align_3d`) of the common region back to the full feature-map size.

    Args:
        output_stride: the encoder's stride per axis, ``(16, 16, 8)`` for PGL's ResNet.
        feature_offset: the encoder's feature-centre offset per axis (``PGLResNetEncoder.feature_offset``);
            zero for an encoder whose strided layers cover their blocks symmetrically (e.g. average pooling).

    Forward: ``features1, features2`` ``(B, C, x, y, z)`` and ``geometry1, geometry2`` ``(B, 4, 3)``
    -> two aligned maps of the same shape as the inputs.
    """

    def __init__(self, output_stride: Sequence[int], feature_offset: Sequence[float] = (0.0, 0.0, 0.0)) -> None:
        super().__init__()
        self.output_stride = tuple(int(s) for s in output_stride)
        self.feature_offset = tuple(float(o) for o in feature_offset)

    def forward(
        self, features1: torch.Tensor, features2: torch.Tensor, geometry1: torch.Tensor, geometry2: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        geometry1, geometry2 = geometry1.float(), geometry2.float()  # box arithmetic in float32, also under AMP
        boxes = torch.cat(csalign_boxes(geometry1, geometry2, self.output_stride, self.feature_offset))
        # both views as one batch of 2B: every kernel is launched once, not once per view (GPU steps are short)
        features = torch.cat([features1, features2])
        flips = torch.cat([geometry1, geometry2])[:, GEOMETRY_FLIP]
        return roi_align_3d(flip_align(features, flips), boxes, features.shape[2:]).chunk(2)
