"""The pictures of the views: the drawn overlap is the aligner's, and it holds the same anatomy in both views."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from matplotlib.image import imread
from pgl_bundle.networks import PGLResNetEncoder, csalign_boxes
from pgl_bundle.networks.aligner import PriorGuidedAligner
from pgl_bundle.show_views import draw_views, sample_views
from pgl_bundle.views import GEOMETRY_END, GEOMETRY_FLIP, GEOMETRY_SCALE, GEOMETRY_START, RandPGLViewsd

SHAPE, ROI = (50, 50, 24), (32, 32, 16)  # every crop (35 to 45 voxels in-plane) holds the volume's middle
ROD = (slice(18, 24), slice(28, 32))  # a bright rod along z, off-centre in x and y: a flip or a shift moves it


def _axes(figure, gid):
    return next(ax for ax in figure.axes if ax.get_gid() == gid)


def _marker_centre(ax) -> np.ndarray:
    """Centre ``(x, y)`` of the bright voxels of an axes' image, in the axes' data coordinates."""
    image = ax.images[0]
    plane = np.asarray(image.get_array(), dtype=float)  # (y, x), origin lower
    left, right, bottom, top = image.get_extent()
    weights = np.clip(plane - 0.5, 0, None)
    ys, xs = np.indices(plane.shape) + 0.5
    centre = np.array([(weights * xs).sum(), (weights * ys).sum()]) / weights.sum()
    return np.array([left, bottom]) + centre * [(right - left) / plane.shape[1], (top - bottom) / plane.shape[0]]


def _drawn_box(ax) -> np.ndarray:
    (rectangle,) = [p for p in ax.patches if p.get_gid() in ("aligner_box", "source_overlap")]
    x, y = rectangle.get_xy()
    return np.array([[x, y], [x + rectangle.get_width(), y + rectangle.get_height()]])


@pytest.fixture(scope="module")
def aligner():
    encoder = PGLResNetEncoder(layers=(1, 1, 1, 1), block="basic", block_inplanes=(4, 4, 4, 4))
    return PriorGuidedAligner(encoder.output_stride, encoder.feature_offset)


@pytest.mark.parametrize("seed", range(4))
def test_drawn_overlap_is_the_aligners_and_holds_the_same_anatomy(aligner, seed):
    volume = torch.zeros((1, *SHAPE))
    volume[(0, *ROD)] = 1.0
    views = RandPGLViewsd("image", roi_size=ROI, flip_prob=0.5).set_random_state(seed)
    sample = sample_views({"image": volume}, [views])
    figure = draw_views([sample], aligner)
    geometry = sample.geometry
    rod_centre = np.array([(s.start + s.stop) / 2 for s in ROD])
    overlap_start = geometry[:, GEOMETRY_START, :2].max(dim=0).values.numpy()
    overlap_end = geometry[:, GEOMETRY_END, :2].min(dim=0).values.numpy()
    assert np.allclose(_drawn_box(_axes(figure, "source")), [overlap_start, overlap_end])
    where_in_overlap = (rod_centre - overlap_start) / (overlap_end - overlap_start)

    boxes = csalign_boxes(geometry[:1], geometry[1:], aligner.output_stride, aligner.feature_offset)
    for view in range(2):
        ax = _axes(figure, f"view{view + 1}_features")
        drawn = _drawn_box(ax)
        assert np.allclose(drawn, boxes[view][0, :, :2].numpy(), atol=1e-6)  # the aligner's box, as it is drawn
        # the rod in the flip-undone view sits where the aligner's box says the source's overlap is
        where_in_box = (_marker_centre(ax) - drawn[0]) / (drawn[1] - drawn[0])
        assert where_in_box == pytest.approx(where_in_overlap, abs=0.01), (view, geometry[view, GEOMETRY_FLIP])
        # and the aligner's resampled overlap shows it there too
        aligned = _marker_centre(_axes(figure, f"view{view + 1}_aligned")) / np.array(ROI[:2])
        assert aligned == pytest.approx(where_in_overlap, abs=0.01)
    # the views as input carry the geometry's flips: the rod of a flipped axis is mirrored
    for view in range(2):
        scale, start = geometry[view, GEOMETRY_SCALE, :2].numpy(), geometry[view, GEOMETRY_START, :2].numpy()
        in_view = (rod_centre - start) * scale
        flips = geometry[view, GEOMETRY_FLIP, :2].numpy() != 0
        expected = np.where(flips, np.array(ROI[:2]) - in_view, in_view)
        assert _marker_centre(_axes(figure, f"view{view + 1}_input")) == pytest.approx(expected, abs=0.3)


def test_the_seeds_above_flip_and_keep_axes():
    """The drawing test sees views flipped and not flipped along x and y (else it would not test FlipAlign)."""
    flips = [
        RandPGLViewsd("image", roi_size=ROI).set_random_state(seed)({"image": torch.zeros((1, *SHAPE))})
        for seed in range(4)
    ]
    seen = np.stack([d[f"view{v}_geometry"][GEOMETRY_FLIP, :2].numpy() for d in flips for v in (1, 2)])
    assert seen.min(axis=0).tolist() == [0, 0] and seen.max(axis=0).tolist() == [1, 1]


def test_show_views_draws_the_real_ct(shared_data, tmp_path):
    output = tmp_path / "pictures" / "views.png"
    command = [sys.executable, "-m", "pgl_bundle", "show_views", "--dataset_dir", str(shared_data / "sts"),
               "--output", str(output), "--num_samples", "2", "--encoder_layers", "[1,1,1,1]"]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    picture = imread(output)
    assert picture.shape[0] > 400 and picture.shape[1] > 1200 and picture.std() > 0.1  # two rows of seven panels
    assert "the views of 2 volumes (STS_001/CT_image.nii.gz, STS_002/CT_image.nii.gz)" in result.stderr
    assert list(tmp_path.iterdir()) == [tmp_path / "pictures"]  # prepared arrays went to a temporary folder


def test_sample_views_needs_the_view_transform():
    with pytest.raises(ValueError, match="hold no RandPGLViewsd"):
        sample_views({"image": torch.zeros((1, *SHAPE))}, [lambda d: d])
