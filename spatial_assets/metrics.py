"""Accuracy measures shared by the stages and their benchmarks. No dagster import here."""

from __future__ import annotations

import numpy as np


def pearson_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation between matching columns of two arrays.

    Parameters
    ----------
    a, b : numpy.ndarray
        Arrays of the same shape ``(n, G)``.

    Returns
    -------
    numpy.ndarray
        ``(G,)`` float64 Pearson r of column ``g`` of ``a`` with column ``g`` of ``b``; NaN where either column is
        constant.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a = a - a.mean(0)
    b = b - b.mean(0)
    den = np.sqrt((a**2).sum(0) * (b**2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (a * b).sum(0) / np.where(den > 0, den, 1), np.nan)
