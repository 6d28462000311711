"""PSNR and SSIM against their definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.metrics.image_metrics import (
    LUMA,
    PSNR_CAP_DB,
    WINDOW,
    _filter,
    _gaussian_window,
    psnr,
    ssim,
)


def random_image(seed: int, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def test_identical_images_score_perfectly() -> None:
    image = random_image(0)
    assert psnr(image, image.copy()) == PSNR_CAP_DB  # the documented stand-in for infinity
    assert ssim(image, image.copy()) == pytest.approx(1.0, abs=1e-12)
    assert ssim(image, image.copy(), per_channel=True) == pytest.approx(1.0, abs=1e-12)


def test_psnr_matches_the_formula() -> None:
    image = np.full((16, 16, 3), 100, dtype=np.uint8)
    # Off by one grey level everywhere: MSE 1, PSNR = 10 log10(255²) ≈ 48.13 dB.
    assert psnr(image, image + 1) == pytest.approx(10 * math.log10(255**2))
    other = image.copy()
    other[0, 0, 0] = 110  # one value off by 10: MSE = 100 / (16 · 16 · 3)
    assert psnr(image, other) == pytest.approx(10 * math.log10(255**2 * 768 / 100))


def test_separable_filter_equals_a_2d_window() -> None:
    x = np.random.default_rng(1).normal(size=(20, 17))
    kernel = np.outer(_gaussian_window(), _gaussian_window())
    expected = np.array(
        [
            [np.sum(x[i : i + WINDOW, j : j + WINDOW] * kernel) for j in range(17 - WINDOW + 1)]
            for i in range(20 - WINDOW + 1)
        ]
    )
    np.testing.assert_allclose(_filter(x, _gaussian_window()), expected, rtol=1e-12)


def test_ssim_matches_a_direct_computation() -> None:
    a, b = random_image(2, 12), random_image(3, 12)  # 12 px: exactly 2 × 2 window positions
    x, y = a.astype(float) @ LUMA, b.astype(float) @ LUMA
    kernel = np.outer(_gaussian_window(), _gaussian_window())
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for i in range(2):
        for j in range(2):
            wx, wy = x[i : i + WINDOW, j : j + WINDOW], y[i : i + WINDOW, j : j + WINDOW]
            mx, my = np.sum(kernel * wx), np.sum(kernel * wy)
            vx, vy = np.sum(kernel * (wx - mx) ** 2), np.sum(kernel * (wy - my) ** 2)
            cov = np.sum(kernel * (wx - mx) * (wy - my))
            values.append(
                (2 * mx * my + c1) * (2 * cov + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
            )
    assert ssim(a, b) == pytest.approx(np.mean(values), rel=1e-9)


def test_ssim_falls_with_noise_and_is_symmetric() -> None:
    image = random_image(4)
    rng = np.random.default_rng(5)
    scores = []
    for scale in (2, 20, 80):
        noisy = np.clip(image + rng.normal(0, scale, image.shape), 0, 255).astype(np.uint8)
        scores.append(ssim(image, noisy))
        assert ssim(noisy, image) == pytest.approx(scores[-1])
    assert 1.0 > scores[0] > scores[1] > scores[2] > -1.0


@pytest.mark.parametrize(
    ("a", "b", "match"),
    [
        (np.zeros((16, 16, 3), np.float32), np.zeros((16, 16, 3), np.uint8), "uint8"),
        (np.zeros((16, 16), np.uint8), np.zeros((16, 16), np.uint8), "H×W×3"),
        (np.zeros((16, 16, 3), np.uint8), np.zeros((16, 8, 3), np.uint8), "differ in shape"),
    ],
)
def test_bad_images_are_rejected(a: np.ndarray, b: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        psnr(a, b)


def test_ssim_needs_room_for_the_window() -> None:
    small = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="at least 11"):
        ssim(small, small)
