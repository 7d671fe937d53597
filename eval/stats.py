"""Bootstrap intervals for the evaluation metrics, so that a difference within noise reads as such.

A metric over items (POPE questions, CHAIR captions) is a function of per-item counts summed over the items.
`bootstrap_intervals` resamples the items with replacement (multinomial weights, seeded) and reports the
2.5th and 97.5th percentiles of each metric; `paired_intervals` applies the same resamples to two runs over
the same items (plain decoding and a mitigation) and reports the interval of their difference, and
`paired_changes` the difference itself beside it, marked as within noise when the interval holds 0.
"""

from collections.abc import Callable

import numpy as np

SAMPLES, SEED = 1000, 0


def _weights(n: int, samples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=samples)


def _percentiles(values: dict[str, np.ndarray], level: float) -> dict[str, list[float]]:
    tail = 100 * (1 - level) / 2
    return {name: [float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))] for name, v in values.items()}


def bootstrap_intervals(columns: np.ndarray, metrics: Callable[[np.ndarray], dict[str, np.ndarray]],
                        samples: int = SAMPLES, seed: int = SEED, level: float = 0.95) -> dict[str, list[float]]:
    """`columns`: (n items, k) per-item counts; `metrics(sums)` maps (B, k) resampled column sums to
    `{name: (B,) values}`. Returns `{name: [low, high]}`."""
    columns = np.asarray(columns, dtype=np.float64)
    sums = _weights(len(columns), samples, seed) @ columns
    return _percentiles(metrics(sums), level)


def paired_intervals(base: np.ndarray, other: np.ndarray, metrics: Callable[[np.ndarray], dict[str, np.ndarray]],
                     samples: int = SAMPLES, seed: int = SEED, level: float = 0.95) -> dict[str, list[float]]:
    """The interval of `metric(other) - metric(base)` over the same items (rows in the same order)."""
    base, other = np.asarray(base, dtype=np.float64), np.asarray(other, dtype=np.float64)
    if base.shape != other.shape:
        raise ValueError(f"paired intervals need the same items: {base.shape} against {other.shape}")
    weights = _weights(len(base), samples, seed)
    first, second = metrics(weights @ base), metrics(weights @ other)
    return _percentiles({name: second[name] - first[name] for name in first}, level)


def paired_changes(base: np.ndarray, other: np.ndarray, metrics: Callable[[np.ndarray], dict[str, np.ndarray]],
                   ) -> dict[str, dict]:
    """`{name: {"change", "ci95", "within_noise"}}`: each metric's `metric(other) - metric(base)` over the same
    items, its paired 95% interval, and whether that interval holds 0."""
    intervals = paired_intervals(base, other, metrics)
    first, second = (metrics(np.asarray(rows, dtype=np.float64).sum(0, keepdims=True)) for rows in (base, other))
    return {name: {"change": float(second[name][0] - first[name][0]), "ci95": low_high,
                   "within_noise": low_high[0] <= 0 <= low_high[1]} for name, low_high in intervals.items()}


def ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0 where the denominator is 0 (as the metrics define undefined ratios)."""
    return np.divide(numerator, denominator, out=np.zeros_like(numerator, dtype=np.float64), where=denominator > 0)
