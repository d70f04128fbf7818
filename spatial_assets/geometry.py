"""Spot geometry shared by the demo generator, segmentation and soScope: lattices, sub-spots, point-to-spot.

All functions are vectorised (KD-trees, broadcasting); coordinates are (x, y) in full-resolution pixels unless
a name says micrometres. No dagster import here.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from .constants import Platform

VISIUM_SPOT_DIAMETER_UM = 55.0
VISIUM_SPOT_PITCH_UM = 100.0


def hex_lattice(xmin: float, xmax: float, ymin: float, ymax: float, pitch: float) -> tuple[np.ndarray, np.ndarray]:
    """Centres of a Visium-style hexagonal lattice covering a box.

    Rows are ``pitch * sqrt(3) / 2`` apart; odd rows are shifted by ``pitch / 2``. ``array_col`` follows Visium's
    convention of even columns on even rows and odd columns on odd rows (column step 2 = one pitch). The lattice
    overshoots the box by up to one row and one column so that the box is fully covered.

    Parameters
    ----------
    xmin, xmax : float
        Horizontal extent of the box (same unit as ``pitch``, e.g. full-resolution pixels).
    ymin, ymax : float
        Vertical extent of the box.
    pitch : float
        Centre-to-centre distance of neighbouring spots.

    Returns
    -------
    xy : numpy.ndarray
        ``(n, 2)`` float array of spot centres (x, y), row-major (row 0 first).
    array_row_col : numpy.ndarray
        ``(n, 2)`` int array of Visium ``(array_row, array_col)`` indices of each centre.
    """
    dy = pitch * np.sqrt(3) / 2
    rows = np.arange(int(np.floor((ymax - ymin) / dy)) + 2)
    cols = np.arange(int(np.floor((xmax - xmin) / pitch)) + 2)
    r, c = np.meshgrid(rows, cols, indexing="ij")
    x = xmin + c * pitch + (r % 2) * pitch / 2
    y = ymin + r * dy
    array_col = 2 * c + (r % 2)
    xy = np.stack([x.ravel(), y.ravel()], 1)
    rc = np.stack([r.ravel(), array_col.ravel()], 1)
    return xy, rc


def assign_to_spots(points: np.ndarray, spot_xy: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Index of the spot whose circle contains each point, and the distance to the nearest spot centre.

    Spots of a lattice never overlap when ``radius < pitch / 2``; if circles overlap, the nearest centre wins.
    One KD-tree query: memory linear in points and spots.

    Parameters
    ----------
    points : numpy.ndarray
        ``(n, 2)`` point coordinates (x, y) (anything reshapeable to it).
    spot_xy : numpy.ndarray
        ``(m, 2)`` spot centres, same unit as ``points``.
    radius : float
        Spot radius; a point farther than this from its nearest centre belongs to no spot.

    Returns
    -------
    index : numpy.ndarray
        ``(n,)`` int64 index into ``spot_xy`` of each point's spot, ``-1`` outside every spot (all ``-1`` when
        there are no spots).
    distance : numpy.ndarray
        ``(n,)`` distance of each point to its nearest spot centre (``inf`` when there are no spots).
    """
    points = np.asarray(points, dtype=float).reshape(-1, 2)
    if len(spot_xy) == 0 or len(points) == 0:
        return np.full(len(points), -1, dtype=np.int64), np.full(len(points), np.inf)
    tree = cKDTree(np.asarray(spot_xy, dtype=float))
    dist, idx = tree.query(points, k=1)
    idx = np.where(dist <= radius, idx, -1).astype(np.int64)
    return idx, dist


def subspot_offsets(
    platform: str, spot_diameter: float, grid_subdivision: int = 3, spot_pitch: float | None = None
) -> np.ndarray:
    """Offsets of sub-spot centres from their spot centre, in the same unit as ``spot_diameter``.

    Visium (hexagonal): K = 7, the centre and 6 around it at 2/3 of the spot radius (soScope's division).
    Square grids (square_grid, slideseq, merfish): ``grid_subdivision ** 2`` sub-spots (2 x 2 or 3 x 3) tiling
    the spot's square of side ``spot_pitch``.

    Parameters
    ----------
    platform : str
        A :class:`spatial_assets.constants.Platform` value: ``"visium"``, ``"square_grid"``, ``"slideseq"`` or
        ``"merfish"``.
    spot_diameter : float
        Spot diameter (e.g. full-resolution pixels).
    grid_subdivision : int, default 3
        Sub-spots per side on square grids, 2 or 3; ignored for Visium.
    spot_pitch : float, optional
        Side of a square-grid spot's tile; defaults to ``spot_diameter``. Ignored for Visium.

    Returns
    -------
    numpy.ndarray
        ``(K, 2)`` offsets (dx, dy).

    Raises
    ------
    ValueError
        If ``grid_subdivision`` is not 2 or 3 on a square grid, or the platform is unknown.
    """
    if platform == Platform.VISIUM:
        r = spot_diameter / 2 * 2 / 3
        ang = np.deg2rad(np.arange(6) * 60.0)
        ring = np.stack([r * np.cos(ang), r * np.sin(ang)], 1)
        return np.vstack([[0.0, 0.0], ring])
    if platform in (Platform.SQUARE_GRID, Platform.SLIDESEQ, Platform.MERFISH, Platform.XENIUM):
        n = int(grid_subdivision)
        if n not in (2, 3):
            raise ValueError(f"grid_subdivision must be 2 or 3 for square grids, got {n}")
        side = spot_pitch or spot_diameter
        step = side / n
        c = (np.arange(n) - (n - 1) / 2) * step
        gx, gy = np.meshgrid(c, c, indexing="xy")
        return np.stack([gx.ravel(), gy.ravel()], 1)
    raise ValueError(f"unknown platform '{platform}': expected visium, square_grid, slideseq or merfish")


def subspot_positions(spot_xy: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions of every sub-spot, spot-major, and the parent spot of each.

    Parameters
    ----------
    spot_xy : numpy.ndarray
        ``(N, 2)`` spot centres.
    offsets : numpy.ndarray
        ``(K, 2)`` sub-spot offsets, e.g. from :func:`subspot_offsets`.

    Returns
    -------
    positions : numpy.ndarray
        ``(N * K, 2)`` sub-spot centres; row ``n * K + k`` is sub-spot ``k`` of spot ``n``.
    parent : numpy.ndarray
        ``(N * K,)`` index of the parent spot of each sub-spot.
    """
    spot_xy = np.asarray(spot_xy, dtype=float)
    n, k = len(spot_xy), len(offsets)
    pos = (spot_xy[:, None, :] + offsets[None, :, :]).reshape(n * k, 2)
    parent = np.repeat(np.arange(n), k)
    return pos, parent


def assign_to_subspots(
    points: np.ndarray, spot_index: np.ndarray, spot_xy: np.ndarray, offsets: np.ndarray
) -> np.ndarray:
    """Nearest sub-spot of each point already assigned to a spot.

    Parameters
    ----------
    points : numpy.ndarray
        ``(n, 2)`` point coordinates.
    spot_index : numpy.ndarray
        ``(n,)`` spot index of each point (e.g. from :func:`assign_to_spots`), ``-1`` for points in no spot.
    spot_xy : numpy.ndarray
        ``(N, 2)`` spot centres, same unit as ``points``.
    offsets : numpy.ndarray
        ``(K, 2)`` sub-spot offsets from the spot centre (:func:`subspot_offsets`).

    Returns
    -------
    numpy.ndarray
        ``(n,)`` int64 sub-spot number ``k`` in ``0..K-1`` of each point within its spot, ``-1`` where
        ``spot_index`` is ``-1``.
    """
    points = np.asarray(points, dtype=float)
    out = np.full(len(points), -1, dtype=np.int64)
    ok = spot_index >= 0
    if ok.any():
        rel = points[ok] - spot_xy[spot_index[ok]]
        d2 = ((rel[:, None, :] - offsets[None, :, :]) ** 2).sum(-1)
        out[ok] = d2.argmin(1)
    return out


def grid_neighbors(xy: np.ndarray, n_neighbors: int, max_distance: float | None = None) -> np.ndarray:
    """Undirected edges between each point and its nearest neighbours, optionally within a distance.

    On a regular lattice with ``n_neighbors`` = 6 (hexagonal) or 4 (square) and ``max_distance`` slightly above
    the pitch, this is the lattice graph. Linear memory: a KD-tree, never a dense distance matrix.

    Parameters
    ----------
    xy : numpy.ndarray
        ``(n, 2)`` point coordinates.
    n_neighbors : int
        Number of nearest neighbours (other than the point itself) joined to each point.
    max_distance : float, optional
        Drop edges longer than this; ``None`` keeps all ``n_neighbors`` edges of each point.

    Returns
    -------
    numpy.ndarray
        ``(E, 2)`` int64 edges ``(i, j)`` with ``i < j``, unique and sorted; empty ``(0, 2)`` for fewer than two
        points.
    """
    xy = np.asarray(xy, dtype=float)
    n = len(xy)
    if n < 2:
        return np.zeros((0, 2), dtype=np.int64)
    k = min(n_neighbors + 1, n)
    dist, idx = cKDTree(xy).query(xy, k=k)
    src = np.repeat(np.arange(n), k - 1)
    dst = idx[:, 1:].ravel()
    d = dist[:, 1:].ravel()
    keep = np.isfinite(d)
    if max_distance is not None:
        keep &= d <= max_distance
    e = np.stack([src[keep], dst[keep]], 1)
    e = np.sort(e, axis=1)
    return np.unique(e, axis=0)
