"""Simple sub-spot splits soScope must beat."""

from __future__ import annotations

import numpy as np

from . import _geometry as _geo


def baseline_split(x: np.ndarray, k: int) -> np.ndarray:
    """Every sub-spot = its spot / K; (N K, G), spot-major.

    Parameters
    ----------
    x : numpy.ndarray
        Spot values (N, G).
    k : int
        Sub-spots per spot (K).

    Returns
    -------
    numpy.ndarray
        Sub-spot values (N K, G), float64, spot-major.
    """
    return np.repeat(np.asarray(x, dtype=np.float64) / k, k, axis=0)


def baseline_idw(x: np.ndarray, geom: _geo.SubspotGeometry, n_neighbors: int = 7, power: float = 2.0) -> np.ndarray:
    """Inverse-distance weighting of spot values at each sub-spot position, rescaled to sum to the spot.

    Parameters
    ----------
    x : numpy.ndarray
        Spot values (N, G), in the order of ``geom``'s spots.
    geom : SubspotGeometry
        The spots and their sub-spot positions.
    n_neighbors : int
        Nearest spots weighted at each sub-spot (at most the number of spots).
    power : float
        Exponent of the inverse distance.

    Returns
    -------
    numpy.ndarray
        Sub-spot values (N K, G), spot-major; each spot's sub-spots sum to the spot (split evenly where the
        estimate is 0).
    """
    from scipy.spatial import cKDTree

    x = np.asarray(x, dtype=np.float64)
    kq = min(n_neighbors, geom.n_spots)
    d, idx = cKDTree(geom.spot_xy).query(geom.positions, k=kq)
    d, idx = d.reshape(len(geom.positions), kq), idx.reshape(len(geom.positions), kq)
    w = 1.0 / np.maximum(d, 1e-6 * geom.spot_pitch_px) ** power
    w /= w.sum(1, keepdims=True)
    est = (x[idx] * w[:, :, None]).sum(1)  # (NK, G)
    n, kk = geom.n_spots, geom.n_sub
    tot = est.reshape(n, kk, -1).sum(1)  # (N, G)
    scale = np.where(tot > 0, x / np.where(tot > 0, tot, 1.0), 1.0 / kk)
    out = est.reshape(n, kk, -1) * scale[:, None, :]
    flat = np.where((tot > 0)[:, None, :], out, x[:, None, :] / kk)  # spots with 0 estimate: split evenly
    return flat.reshape(n * kk, -1)
