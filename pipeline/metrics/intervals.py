"""95 % intervals of the evaluate stage's means: a seeded percentile bootstrap.

Every mean the stage writes is a statistic of per-row (or per-prompt) values. Its interval is
the percentile bootstrap (Efron & Tibshirani, *An Introduction to the Bootstrap*, 1993,
ch. 13): the statistic is recomputed on N_RESAMPLES resamples of the rows drawn with
replacement, and the interval spans the 2.5th to the 97.5th percentile of those values.
`scipy.stats.bootstrap` (method "percentile", `paired=True`) does the resampling
(https://docs.scipy.org/doc/scipy/reference/generated/scipy.stats.bootstrap.html).

- A mean of per-row values (mse, a picture's adherence): `mean_with_ci`.
- A ratio of sums (cosine_masked = Σ cos · mask / Σ mask over rows; image / text adherence):
  `ratio_with_ci` resamples rows and sums numerator and denominator over the *same* rows,
  never averaging per-row ratios.
- A difference between two predictors scored on the same rows: `paired_difference`
  resamples the rows once for both, so what the rows have in common cancels.

Each interval draws from `numpy.random.default_rng(seed)`: the files are the same on every
run, and two intervals over the same rows resample the same rows. An interval is stored
beside its value as `KEY_ci95: [low, high]`. It is None below two rows (no spread to
resample) and where a bound is not a finite number: a ratio whose denominator sums to 0 in
some resamples (image / text adherence when few text pictures score) is undefined or
unbounded there.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np
from scipy.stats import DegenerateDataWarning, bootstrap

from pipeline.metrics.records import Estimates, Interval, PairedDifference

N_RESAMPLES = 1000
CONFIDENCE = 0.95
# Resamples evaluated at once: memory is BATCH × rows × 8 bytes per sample, so 50,000 rows
# take 40 MB per sample, whatever N_RESAMPLES is.
BATCH = 100

Statistic = Callable[..., np.ndarray]  # statistic(*samples, axis) over the resampled axis
Values = np.ndarray | Sequence[float]  # per-row values


def ci_key(key: str) -> str:
    """Where the interval of `key` is stored: `KEY_ci95`."""
    return f"{key}_ci95"


def ratio_of_sums(numerator: np.ndarray, denominator: np.ndarray, axis: int = -1) -> np.ndarray:
    """Σ numerator / Σ denominator along `axis` (rows); NaN or ±inf where Σ denominator is 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.sum(numerator, axis=axis) / np.sum(denominator, axis=axis)


def interval(statistic: Statistic, samples: Sequence[Values], seed: int) -> Interval:
    """[low, high]: the 95 % percentile bootstrap interval of statistic(*samples), the same
    resampled rows for every sample (each [rows]); None for fewer than two rows or a bound
    that is not finite."""
    arrays = [np.asarray(s, dtype=np.float64) for s in samples]
    if len(arrays[0]) < 2:
        return None
    with warnings.catch_warnings():  # a NaN statistic: answered by None below
        warnings.simplefilter("ignore", DegenerateDataWarning)
        result = bootstrap(
            arrays,
            statistic,
            n_resamples=N_RESAMPLES,
            batch=BATCH,
            vectorized=True,
            paired=True,
            confidence_level=CONFIDENCE,
            method="percentile",
            rng=np.random.default_rng(seed),
        )
    bounds = [float(result.confidence_interval.low), float(result.confidence_interval.high)]
    return bounds if np.isfinite(bounds).all() else None


def mean_with_ci(key: str, values: Values, seed: int) -> Estimates:
    """{key: mean of values, KEY_ci95: its interval}."""
    return {key: float(np.mean(values)), ci_key(key): interval(np.mean, [values], seed)}


def ratio_with_ci(key: str, numerator: Values, denominator: Values, seed: int) -> Estimates:
    """{key: Σ numerator / Σ denominator, KEY_ci95: its interval over resampled rows}."""
    return {
        key: float(ratio_of_sums(np.asarray(numerator), np.asarray(denominator))),
        ci_key(key): interval(ratio_of_sums, [numerator, denominator], seed),
    }


def paired_difference(
    statistic: Statistic, samples: Sequence[Values], against: Sequence[Values], seed: int
) -> PairedDifference:
    """statistic(*samples) − statistic(*against) over the same rows, with its interval from
    one resampling of the rows for both, and `within_noise`: whether the interval contains 0
    (None without an interval).

    E.g. (Σ cos_a · mask / Σ mask) − (Σ cos_b · mask / Σ mask) for two predictors' masked
    cosines on the same test rows: statistic ratio_of_sums, samples (cos_a · mask, mask),
    against (cos_b · mask, mask)."""
    split = len(samples)

    def difference(*resampled: np.ndarray, axis: int = -1) -> np.ndarray:
        return statistic(*resampled[:split], axis=axis) - statistic(*resampled[split:], axis=axis)

    both = [np.asarray(s, dtype=np.float64) for s in (*samples, *against)]
    bounds = interval(difference, both, seed)
    return PairedDifference(
        difference=float(difference(*both)),
        difference_ci95=bounds,
        within_noise=None if bounds is None else bool(bounds[0] <= 0 <= bounds[1]),
    )
