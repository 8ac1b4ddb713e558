"""Aligner correctness with a coordinate volume: the aligner must be exact, not approximately right.

The source volume's three channels are its own voxel-centre coordinates, the "encoder" is average pooling
with kernel = stride = (16, 16, 8), so every feature voxel holds the source coordinates of its block centre.
After alignment, voxel k of both maps must hold the same source coordinates, and those must be the ones the
view geometry predicts for the overlap box.

Tolerance. Every step is linear in the coordinates: the crop-resize (trilinear, always a down-scaling, so it
never samples outside the crop), the pooling (block mean = block centre), and the RoIAlign (trilinear). So
wherever the RoIAlign samples a feature map between voxel centres, the result is exact up to float32
rounding: we allow 1e-2 voxels. Where it samples within half a feature voxel of the map's edge, it takes the
edge value (grid_sample's border padding, as RoIAlign does), an error of at most half a feature voxel:
``0.5 * stride / resize_factor`` source voxels. Both bounds are asserted, and most samples are interior.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pgl_bundle.networks import PriorGuidedAligner
from pgl_bundle.networks import aligner as aligner_module
from pgl_bundle.networks.encoder import feature_center_offset
from pgl_bundle.views import GEOMETRY_END, GEOMETRY_FLIP, GEOMETRY_SCALE, GEOMETRY_START, RandPGLViewsd

STRIDE = (16, 16, 8)
EXACT = 1e-2


def coordinate_volume(shape) -> torch.Tensor:
    """``(3, *shape)``: channel ``a`` holds the continuous centre coordinate ``i + 0.5`` along axis ``a``."""
    axes = [torch.arange(n, dtype=torch.float32) + 0.5 for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


def aligned_coordinates(seed: int, shape, roi_size):
    """Two views of a coordinate volume through the real view transform, pooled, aligned.

    Returns the two aligned maps ``(3, m_x, m_y, m_z)``, the geometries ``(4, 3)`` and the expected coordinates.
    """
    views = RandPGLViewsd("image", roi_size=roi_size)
    views.set_random_state(seed)
    out = views({"image": coordinate_volume(shape)})
    features = [F.avg_pool3d(out[k][None], STRIDE, STRIDE) for k in ("view1", "view2")]
    geometry = [out[k][None] for k in ("view1_geometry", "view2_geometry")]
    aligned1, aligned2 = PriorGuidedAligner(STRIDE)(*features, *geometry)
    return aligned1[0], aligned2[0], geometry[0][0], geometry[1][0]


def check_alignment(seed: int, shape=(200, 180, 40), roi_size=(96, 96, 16)) -> tuple[bool, int]:
    """True when both aligned maps match the overlap's expected coordinates within the stated tolerance.

    Also returns how many (voxel, axis) samples were interior, i.e. held to the exact tolerance.
    """
    a1, a2, g1, g2 = aligned_coordinates(seed, shape, roi_size)
    start = torch.maximum(g1[GEOMETRY_START], g2[GEOMETRY_START])
    end = torch.minimum(g1[GEOMETRY_END], g2[GEOMETRY_END])
    ok, interior_count = True, 0
    for axis in range(3):
        m = a1.shape[1 + axis]
        expected = start[axis] + (torch.arange(m) + 0.5) * (end[axis] - start[axis]) / m  # source coordinates
        shape_ = [1, 1, 1]
        shape_[axis] = m
        expected = expected.view(shape_)
        interior = torch.ones_like(expected, dtype=torch.bool)
        edge_bound = 0.0
        for g in (g1, g2):
            u = (expected - g[GEOMETRY_START, axis]) * g[GEOMETRY_SCALE, axis] / STRIDE[axis]  # feature coordinate
            interior &= (u >= 0.5 - 1e-4) & (u <= m - 0.5 + 1e-4)
            edge_bound = max(edge_bound, 0.5 * STRIDE[axis] / float(g[GEOMETRY_SCALE, axis]))
        interior = interior.expand_as(a1[axis])
        for a in (a1, a2):
            err = (a[axis] - expected).abs()
            ok &= bool((err[interior] <= EXACT).all()) and bool((err <= edge_bound + EXACT).all())
        ok &= bool(((a1[axis] - a2[axis]).abs()[interior] <= 2 * EXACT).all())
        interior_count += int(interior.sum())
    return ok, interior_count


@pytest.mark.parametrize("shape, roi_size", [((200, 180, 40), (96, 96, 16)), ((120, 100, 64), (64, 64, 32))])
def test_aligned_maps_share_source_coordinates(shape, roi_size):
    results = [check_alignment(seed, shape, roi_size) for seed in range(150)]
    failures = [seed for seed, (ok, _) in enumerate(results) if not ok]
    assert not failures, f"misaligned for seeds {failures}"
    interior = sum(n for _, n in results)
    total = 150 * 3 * np.prod([r // s for r, s in zip(roi_size, STRIDE)])
    assert interior > 0.4 * total, "too few samples held to the exact tolerance for the test to mean much"


def test_views_cover_flips_and_partial_overlaps():
    """The seeds above exercise what they must: flipped and unflipped axes, and boxes that only partly overlap."""
    flips, partial = set(), 0
    for seed in range(150):
        _, _, g1, g2 = aligned_coordinates(seed, (200, 180, 40), (96, 96, 16))
        flips |= {(axis, int(g[3, axis])) for g in (g1, g2) for axis in range(3)}
        inside = (g1[0] >= g2[0]).all() & (g1[1] <= g2[1]).all() | (g2[0] >= g1[0]).all() & (g2[1] <= g1[1]).all()
        partial += int(not inside)
    assert flips == {(axis, f) for axis in range(3) for f in (0, 1)}
    assert partial > 100


def _boxes_with_max_end(geometry1, geometry2, output_stride, feature_offset=(0.0, 0.0, 0.0)):
    """The source summary's typo: the overlap end taken as the max of the ends."""
    swapped = [g.clone() for g in (geometry1, geometry2)]
    end = torch.maximum(geometry1[:, GEOMETRY_END], geometry2[:, GEOMETRY_END])
    for g in swapped:  # give both views the same (too large) end, then let the min in the real code pick it
        g[:, GEOMETRY_END] = end
    return _real_csalign(swapped[0], swapped[1], output_stride, feature_offset)


def _boxes_without_resize_factor(geometry1, geometry2, output_stride, feature_offset=(0.0, 0.0, 0.0)):
    """The source summary's omission: no ``roi_size / crop_size`` factor."""
    unscaled = [g.clone() for g in (geometry1, geometry2)]
    for g in unscaled:
        g[:, GEOMETRY_SCALE] = 1.0
    return _real_csalign(unscaled[0], unscaled[1], output_stride, feature_offset)


_real_csalign = aligner_module.csalign_boxes


@pytest.mark.parametrize("wrong_boxes", [_boxes_with_max_end, _boxes_without_resize_factor])
def test_check_catches_the_summary_errors(monkeypatch, wrong_boxes):
    monkeypatch.setattr(aligner_module, "csalign_boxes", wrong_boxes)
    failed = sum(not check_alignment(seed)[0] for seed in range(50))
    assert failed >= 45, f"the alignment check missed a known error in {50 - failed} of 50 seeds"


def test_low_precision_features_keep_float32_geometry():
    """bf16 features (mixed precision) are aligned at float32 positions: the same result as float32, rounded once."""
    views = RandPGLViewsd("image", roi_size=(96, 96, 16))
    views.set_random_state(3)
    out = views({"image": coordinate_volume((200, 180, 40))})
    features = [F.avg_pool3d(out[k][None], STRIDE, STRIDE) for k in ("view1", "view2")]
    geometry = [out[k][None] for k in ("view1_geometry", "view2_geometry")]
    reference = PriorGuidedAligner(STRIDE)(*features, *geometry)
    low = PriorGuidedAligner(STRIDE)(*(f.bfloat16() for f in features), *geometry)
    for r, a in zip(reference, low):
        assert a.dtype == torch.bfloat16
        # bf16 rounds each value by at most 2^-8 relative; coordinates reach 200 voxels, i.e. <= 0.8 voxel
        torch.testing.assert_close(a.float(), r, rtol=2**-7, atol=0.0)


def conv_like_features(view: torch.Tensor) -> torch.Tensor:
    """A flip-symmetric strided "encoder" with a ResNet's centre offset: a box filter of odd size ``stride + 1``,
    padded by half of it, so feature voxel ``j`` is centred on input voxel ``stride * j`` (offset
    ``(1 - stride) / 2``, as :func:`~pgl_bundle.networks.encoder.feature_center_offset` says). Channel 3 is 1 where the
    box lies inside the view and less where it reaches into the padding, whose values the other channels lack."""
    kernel = tuple(s + 1 for s in STRIDE)
    padding = tuple(k // 2 for k in kernel)
    values = F.avg_pool3d(view, kernel, STRIDE, padding, count_include_pad=False)
    inside = F.avg_pool3d(torch.ones_like(view[:, :1]), kernel, STRIDE, padding, count_include_pad=True)
    return torch.cat([values, inside], dim=1)


def check_offset_alignment(seed: int, shape=(120, 100, 64), roi_size=(64, 64, 32)) -> tuple[float, int, int]:
    """Worst error (source voxels) of the aligned coordinates where every sample used lies inside both views, the
    number of such samples, and how many of them lie on axes flipped in exactly one view."""
    views = RandPGLViewsd("image", roi_size=roi_size)
    views.set_random_state(seed)
    out = views({"image": coordinate_volume(shape)})
    features = [conv_like_features(out[k][None]) for k in ("view1", "view2")]
    g1, g2 = (out[k][None] for k in ("view1_geometry", "view2_geometry"))
    offset = feature_center_offset(((16, 16, 8),))
    a1, a2 = (a[0] for a in PriorGuidedAligner(STRIDE, offset)(*features, g1, g2))
    interior = (a1[3] > 1 - 1e-5) & (a2[3] > 1 - 1e-5)  # no sample reached a box that touched the padding
    for box in aligner_module.csalign_boxes(g1, g2, STRIDE, offset):  # nor lay beyond an edge voxel's centre
        for axis in range(3):
            m = a1.shape[1 + axis]
            positions = box[0, 0, axis] + (torch.arange(m) + 0.5) * (box[0, 1, axis] - box[0, 0, axis]) / m
            inside = (positions >= 0.5 - 1e-4) & (positions <= m - 0.5 + 1e-4)
            interior &= inside.view([m if a == axis else 1 for a in range(3)])
    start = torch.maximum(g1[0, GEOMETRY_START], g2[0, GEOMETRY_START])
    end = torch.minimum(g1[0, GEOMETRY_END], g2[0, GEOMETRY_END])
    worst, mixed = 0.0, 0
    for axis in range(3):
        m = a1.shape[1 + axis]
        view_shape = [1, 1, 1]
        view_shape[axis] = m
        expected = (start[axis] + (torch.arange(m) + 0.5) * (end[axis] - start[axis]) / m).view(view_shape)
        for a in (a1, a2):
            worst = max([worst, *(a[axis] - expected).abs()[interior].tolist()])
        if g1[0, GEOMETRY_FLIP, axis] != g2[0, GEOMETRY_FLIP, axis]:
            mixed += int(interior.sum())
    return worst, int(interior.sum()), mixed


def _boxes_without_mirroring(geometry1, geometry2, output_stride, feature_offset=(0.0, 0.0, 0.0)):
    """The injected bug: the centre offset applied as if no axis were flipped."""
    unflipped = [g.clone() for g in (geometry1, geometry2)]
    for g in unflipped:
        g[:, GEOMETRY_FLIP] = 0.0
    return _real_csalign(unflipped[0], unflipped[1], output_stride, feature_offset)


def test_centre_offset_is_mirrored_on_flipped_axes(monkeypatch):
    """With a non-zero centre offset (-7.5, -7.5, -3.5 voxels, ResNet-50's), a view flipped along an axis where the
    other is not is still aligned exactly: its offset points the other way. Without the mirroring the same check
    fails by about ``2 * 7.5 / resize factor`` source voxels."""
    results = [check_offset_alignment(seed) for seed in range(40)]
    worst = max(r[0] for r in results)
    assert worst <= EXACT, f"aligned coordinates off by {worst:.3f} source voxels"
    assert sum(r[1] for r in results) > 150 and sum(r[2] for r in results) > 200, "too few samples to mean much"
    monkeypatch.setattr(aligner_module, "csalign_boxes", _boxes_without_mirroring)
    broken = [check_offset_alignment(seed) for seed in range(40)]
    caught = [b[0] > 2.0 for b, r in zip(broken, results) if r[2]]
    assert sum(caught) >= 0.8 * len(caught), "the check misses an unmirrored offset"
