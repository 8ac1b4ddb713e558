"""The four intensity augmentations: what each does, and independence between views."""

from __future__ import annotations

import pytest
import torch
from monai.networks.layers import GaussianFilter
from pgl_bundle.intensity import RandPGLIntensityd, gaussian_blur

OFF = {"noise_prob": 0.0, "blur_prob": 0.0, "contrast_prob": 0.0, "gamma_prob": 0.0}


def run(seed, image, **kwargs):
    transform = RandPGLIntensityd(["view1", "view2"], **{**OFF, **kwargs})
    transform.set_random_state(seed)
    return transform({"view1": image.clone(), "view2": image.clone()})


def test_all_off_is_identity():
    image = torch.rand(1, 32, 32, 8)
    out = run(0, image)
    torch.testing.assert_close(out["view1"], image)


def test_noise_variance_range():
    image = torch.full((1, 64, 64, 16), 0.5)
    variances = [float((run(s, image, noise_prob=1.0)["view1"] - image).var()) for s in range(20)]
    assert all(0 <= v <= 0.1 * 1.05 for v in variances) and max(variances) > 0.02


def test_blur_smooths():
    image = (torch.rand(1, 32, 32, 16) > 0.5).float()
    out = run(0, image, blur_prob=1.0)["view1"]
    assert out.std() < image.std() * 0.8
    inner = (slice(None), slice(4, -4), slice(4, -4), slice(4, -4))  # away from the filter's zero padding
    torch.testing.assert_close(out[inner].mean(), image[inner].mean(), atol=0.02, rtol=0)


@pytest.mark.parametrize(("shape", "sigma"), [((1, 96, 96, 16), 0.5), ((2, 20, 9, 5), 1.0), ((1, 33, 40, 16), 0.73)])
def test_blur_equals_monai_gaussian_filter(shape, sigma):
    image = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    expected = GaussianFilter(spatial_dims=3, sigma=sigma)(image[None])[0]
    torch.testing.assert_close(gaussian_blur(image, sigma), expected, rtol=0, atol=1e-6)


def test_contrast_is_clipped_to_input_range():
    image = torch.linspace(0.2, 0.8, 32 * 32 * 8).reshape(1, 32, 32, 8)
    for seed in range(10):
        out = run(seed, image, contrast_prob=1.0)["view1"]
        assert out.min() >= 0.2 - 1e-6 and out.max() <= 0.8 + 1e-6
        ratio = out[0, 5, 5, 2] / image[0, 5, 5, 2]
        assert 0.75 - 1e-6 <= ratio <= 1.25 + 1e-6


def test_gamma_rescales_to_unit_range_even_with_negative_voxels():
    image = torch.rand(1, 32, 32, 8) * 1.2 - 0.1
    out = run(1, image, gamma_prob=1.0)["view1"]
    assert torch.isfinite(out).all()
    assert out.min() == 0 and out.max() == 1


def test_views_get_independent_draws():
    image = torch.rand(1, 32, 32, 8)
    outs = [run(seed, image, noise_prob=0.5, contrast_prob=0.5, gamma_prob=0.5) for seed in range(10)]
    assert any(not torch.equal(o["view1"], o["view2"]) for o in outs)


def test_probabilities():
    image = torch.rand(1, 8, 8, 4)
    changed = sum(not torch.equal(run(s, image, noise_prob=0.1)["view1"], image) for s in range(400))
    assert 20 <= changed <= 65  # Binomial(400, 0.1): mean 40, sd 6
