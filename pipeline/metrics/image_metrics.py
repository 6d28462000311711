"""Image similarity in numpy: PSNR and Gaussian-window SSIM of uint8 H×W×3 images.

SSIM follows Wang et al. (2004): 11×11 Gaussian window with σ = 1.5, K1 = 0.01, K2 = 0.03,
dynamic range 255, averaged over the positions where the window fits ("valid" filtering).
"""

from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

# Identical images have infinite PSNR; we report this cap instead so every score stays a
# finite JSON number. 100 dB is far beyond a visible difference (one grey level ≈ 48 dB).
PSNR_CAP_DB = 100.0

WINDOW = 11
SIGMA = 1.5
K1, K2 = 0.01, 0.03
PEAK = 255.0
# ITU-R BT.601 luma weights, the usual choice for SSIM on colour images.
LUMA = np.array([0.299, 0.587, 0.114])


def _check_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    for name, img in (("a", a), ("b", b)):
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"image {name} must be uint8 H×W×3, got {img.dtype} {img.shape}")
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    return a.astype(np.float64), b.astype(np.float64)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB over all pixels and channels, capped at PSNR_CAP_DB."""
    x, y = _check_pair(a, b)
    mse = np.mean((x - y) ** 2)
    if mse == 0:
        return PSNR_CAP_DB
    return min(10.0 * math.log10(PEAK**2 / mse), PSNR_CAP_DB)


def _gaussian_window() -> np.ndarray:
    t = np.arange(WINDOW) - (WINDOW - 1) / 2
    w = np.exp(-(t**2) / (2 * SIGMA**2))
    return w / w.sum()


def _filter(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Separable 'valid' Gaussian filter of a 2-D array."""
    rows = sliding_window_view(x, len(w), axis=0) @ w
    return sliding_window_view(rows, len(w), axis=1) @ w


def _ssim_plane(x: np.ndarray, y: np.ndarray) -> float:
    w = _gaussian_window()
    mx, my = _filter(x, w), _filter(y, w)
    vx = _filter(x * x, w) - mx**2
    vy = _filter(y * y, w) - my**2
    cov = _filter(x * y, w) - mx * my
    c1, c2 = (K1 * PEAK) ** 2, (K2 * PEAK) ** 2
    ssim_map = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(ssim_map.mean())


def ssim(a: np.ndarray, b: np.ndarray, per_channel: bool = False) -> float:
    """Structural similarity in [-1, 1] (1 = identical).

    On luminance by default; per_channel averages the SSIM of R, G and B instead.
    """
    x, y = _check_pair(a, b)
    if min(x.shape[:2]) < WINDOW:
        raise ValueError(f"SSIM needs images of at least {WINDOW}×{WINDOW} px, got {a.shape}")
    if per_channel:
        return float(np.mean([_ssim_plane(x[..., c], y[..., c]) for c in range(3)]))
    return _ssim_plane(x @ LUMA, y @ LUMA)
