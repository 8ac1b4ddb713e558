"""View geometry: boxes, overlap, resize factors, flips, errors, batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.data import DataLoader, MetaTensor
from pgl_bundle.views import (
    GEOMETRY_END,
    GEOMETRY_FLIP,
    GEOMETRY_SCALE,
    GEOMETRY_START,
    RandPGLViewsd,
    overlap_ratio,
    resize_trilinear,
)

ROI = np.array([96, 96, 16])


def make_views(seed, shape=(150, 170, 30), **kwargs):
    transform = RandPGLViewsd("image", roi_size=ROI, **kwargs)
    transform.set_random_state(seed)
    image = torch.rand(1, *shape, generator=torch.Generator().manual_seed(0))
    return image, transform({"image": image})


@pytest.mark.parametrize("isotropic", [True, False])
def test_boxes_sizes_overlap_and_factors(isotropic):
    shape = np.array([150, 170, 30])
    for seed in range(200):
        _, out = make_views(seed, tuple(shape), isotropic_scale=isotropic)
        g1, g2 = out["view1_geometry"].numpy(), out["view2_geometry"].numpy()
        for g in (g1, g2):
            start, end = g[GEOMETRY_START], g[GEOMETRY_END]
            assert (start >= 0).all() and (end <= shape).all(), "box outside the volume"
            size = end - start
            assert (size >= np.round(1.1 * ROI)).all() and (size <= np.round(1.4 * ROI)).all()
            np.testing.assert_allclose(g[GEOMETRY_SCALE], ROI / size, rtol=1e-6)
            assert set(np.unique(g[GEOMETRY_FLIP])) <= {0.0, 1.0}
            if isotropic:  # one factor for all axes: the aspect ratio is kept up to rounding
                factors = size / ROI
                assert factors.max() - factors.min() <= 0.5 / ROI.min() * 2 + 1e-6
        assert overlap_ratio(g1[0], g1[1], g2[0], g2[1]) >= 0.1
        assert out["view1"].shape == out["view2"].shape == (1, *ROI)
        assert "image" not in out


def test_overlap_ratio_definition():
    # intersection 5 * 10 * 10 = 500 over the smaller box 10 * 10 * 10
    ratio = overlap_ratio(np.array([0, 0, 0]), np.array([10, 10, 10]), np.array([5, 0, 0]), np.array([25, 20, 20]))
    assert ratio == pytest.approx(0.5)
    assert overlap_ratio(np.zeros(3), np.ones(3), np.full(3, 2.0), np.full(3, 3.0)) == 0


def test_min_overlap_is_enforced_where_it_binds():
    """With a large volume most random pairs overlap little; a high min_overlap must still hold."""
    for seed in range(50):
        _, out = make_views(seed, (400, 400, 60), min_overlap=0.6)
        g1, g2 = out["view1_geometry"].numpy(), out["view2_geometry"].numpy()
        assert overlap_ratio(g1[0], g1[1], g2[0], g2[1]) >= 0.6


def test_view_is_crop_resize_flip_of_source():
    image, out = make_views(3)
    for key in ("view1", "view2"):
        g = out[f"{key}_geometry"].numpy().astype(int)
        (x0, y0, z0), (x1, y1, z1) = g[GEOMETRY_START], g[GEOMETRY_END]
        expected = F.interpolate(image[None, :, x0:x1, y0:y1, z0:z1], size=tuple(ROI), mode="trilinear")[0]
        flips = [1 + a for a in range(3) if g[GEOMETRY_FLIP][a]]
        expected = expected.flip(flips) if flips else expected
        torch.testing.assert_close(out[key], expected)


@pytest.mark.parametrize(
    ("shape", "size"), [((1, 134, 134, 22), (96, 96, 16)), ((2, 40, 31, 9), (96, 64, 16)), ((1, 17, 50, 30), (8, 8, 8))]
)
def test_separable_resize_equals_trilinear(shape, size):
    volume = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    expected = F.interpolate(volume[None], size=size, mode="trilinear", align_corners=False)[0]
    z_planes_outermost = volume.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)  # a prepared volume's boxes
    for layout in (volume, z_planes_outermost):
        torch.testing.assert_close(resize_trilinear(layout, size), expected, rtol=0, atol=1e-6)


def test_seeded_and_random():
    _, a = make_views(7)
    _, b = make_views(7)
    _, c = make_views(8)
    torch.testing.assert_close(a["view1"], b["view1"])
    assert not torch.equal(a["view1_geometry"], c["view1_geometry"])


def test_too_small_volume_names_the_file():
    transform = RandPGLViewsd("image", roi_size=ROI)
    image = MetaTensor(torch.zeros(1, 200, 200, 20), meta={"filename_or_obj": "/data/thin_scan.nii.gz"})
    with pytest.raises(ValueError, match=r"thin_scan\.nii\.gz.*smaller than the largest PGL crop"):
        transform({"image": image})


def test_non_3d_input_is_rejected():
    with pytest.raises(ValueError, match="channel-first 3D"):
        RandPGLViewsd("image", roi_size=ROI)({"image": torch.zeros(1, 200, 200)})


def test_geometry_survives_batching():
    transform = RandPGLViewsd("image", roi_size=ROI)
    data = [transform({"image": torch.rand(1, 140, 140, 24)}) for _ in range(3)]
    batch = next(iter(DataLoader(data, batch_size=3)))
    assert batch["view1"].shape == (3, 1, *ROI)
    assert batch["view1_geometry"].shape == batch["view2_geometry"].shape == (3, 4, 3)
    torch.testing.assert_close(batch["view2_geometry"][1], data[1]["view2_geometry"])
