"""Sub-spot geometry: sub-spot centres per spot, the spot graph and the sub-spot similarity graph."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.spatial import cKDTree

from .. import geometry
from ..constants import Platform

PLATFORMS = tuple(p.value for p in Platform)


@dataclass
class SubspotGeometry:
    """Spots, their sub-spots (spot-major) and the spot graph, in full-resolution pixels.

    Attributes
    ----------
    platform : str
        The platform (a :class:`~spatial_assets.constants.Platform` value).
    spot_names : numpy.ndarray
        (N,) spot names (str).
    spot_xy : numpy.ndarray
        (N, 2) spot centres.
    offsets : numpy.ndarray
        (K, 2) sub-spot offsets from the spot centre.
    positions : numpy.ndarray
        (N K, 2) sub-spot centres, spot-major.
    parent : numpy.ndarray
        (N K,) spot index of each sub-spot.
    k : numpy.ndarray
        (N K,) sub-spot index 0..K-1 within its spot.
    spot_diameter_px : float
        Spot diameter.
    spot_pitch_px : float
        Lattice pitch (median nearest-spot distance).
    spot_edges : numpy.ndarray
        (E, 2) undirected spot graph edges, i < j.
    """

    platform: str
    spot_names: np.ndarray  # (N,) str
    spot_xy: np.ndarray  # (N, 2)
    offsets: np.ndarray  # (K, 2)
    positions: np.ndarray  # (N K, 2)
    parent: np.ndarray  # (N K,) spot index
    k: np.ndarray  # (N K,) sub-spot index 0..K-1
    spot_diameter_px: float
    spot_pitch_px: float
    spot_edges: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))  # (E, 2) undirected, i < j

    @property
    def n_spots(self) -> int:
        return len(self.spot_xy)

    @property
    def n_sub(self) -> int:
        """Sub-spots per spot (K)."""
        return len(self.offsets)

    @property
    def subspot_diameter_px(self) -> float:
        """Patch diameter of one sub-spot: the distance between neighbouring sub-spot centres."""
        d = np.sqrt(((self.offsets[:, None] - self.offsets[None]) ** 2).sum(-1))
        return float(d[d > 0].min())

    @property
    def isolated_spots(self) -> np.ndarray:
        """Indices of spots without any neighbour in the spot graph."""
        deg = np.bincount(self.spot_edges.ravel(), minlength=self.n_spots)
        return np.flatnonzero(deg == 0)


def _spot_diameter_from_slide(slide) -> float | None:
    sp = slide.uns.get("spatial", {}) if hasattr(slide, "uns") else {}
    if isinstance(sp, dict):
        for lib in sp.values():
            if isinstance(lib, dict) and "spot_diameter_fullres" in lib.get("scalefactors", {}):
                return float(lib["scalefactors"]["spot_diameter_fullres"])
    return None


def spot_pitch(spot_xy: np.ndarray) -> float:
    """Lattice pitch: median distance of each spot to its nearest other spot.

    Parameters
    ----------
    spot_xy : numpy.ndarray
        (N, 2) spot centres.

    Returns
    -------
    float
        The pitch (same units as ``spot_xy``).

    Raises
    ------
    ValueError
        If there are fewer than 2 spots or the pitch is 0 (duplicated positions).
    """
    if len(spot_xy) < 2:
        raise ValueError(f"slide.obsm['spatial']: need at least 2 spots to build a spot graph, found {len(spot_xy)}")
    d, _ = cKDTree(spot_xy).query(spot_xy, k=2)
    pitch = float(np.median(d[:, 1]))
    if not pitch > 0:
        raise ValueError("slide.obsm['spatial']: spot positions are duplicated (median nearest-spot distance is 0)")
    return pitch


def spot_graph(spot_xy: np.ndarray, platform: str, n_neighbors: int = 6, pitch: float | None = None) -> np.ndarray:
    """Undirected spot edges (E, 2): 6 lattice neighbours on Visium, 4 on square grids, else ``n_neighbors`` nearest.

    Parameters
    ----------
    spot_xy : numpy.ndarray
        (N, 2) spot centres.
    platform : str
        The platform; decides the neighbourhood.
    n_neighbors : int
        Nearest neighbours on platforms other than Visium and square grids.
    pitch : float or None
        Lattice pitch (lattice neighbours lie within 1.2 pitches); :func:`spot_pitch` when None.

    Returns
    -------
    numpy.ndarray
        (E, 2) undirected edges between spot indices.

    Raises
    ------
    ValueError
        If ``pitch`` is None and :func:`spot_pitch` fails.
    """
    pitch = spot_pitch(spot_xy) if pitch is None else pitch
    if platform == Platform.VISIUM:
        return geometry.grid_neighbors(spot_xy, 6, max_distance=1.2 * pitch)
    if platform == Platform.SQUARE_GRID:
        return geometry.grid_neighbors(spot_xy, 4, max_distance=1.2 * pitch)
    return geometry.grid_neighbors(spot_xy, n_neighbors)


def check_spot_graph(edges: np.ndarray, n_spots: int, platform: str, pitch: float) -> np.ndarray:
    """Raise if the spot graph has no edges; return the indices of isolated spots (no neighbour).

    Parameters
    ----------
    edges : numpy.ndarray
        (E, 2) spot graph edges.
    n_spots : int
        Number of spots.
    platform : str
        The platform, for the error message.
    pitch : float
        The nearest-spot distance, for the error message.

    Returns
    -------
    numpy.ndarray
        Indices of the spots without a neighbour.

    Raises
    ------
    ValueError
        If the graph has no edges.
    """
    if len(edges) == 0:
        raise ValueError(
            f"spot graph: no edges between the {n_spots} spots (nearest-spot distance {pitch:.4g} px); "
            f"expected a {platform} lattice with neighbouring spots"
        )
    deg = np.bincount(np.asarray(edges).ravel(), minlength=n_spots)
    return np.flatnonzero(deg == 0)


def expected_subspots(platform: str, grid_subdivision: int = 3) -> int:
    """K of a platform: 7 for Visium, ``grid_subdivision`` ** 2 (4 or 9) otherwise.

    Parameters
    ----------
    platform : str
        The platform.
    grid_subdivision : int
        Sub-spots per side on platforms other than Visium.

    Returns
    -------
    int
        Sub-spots per spot.

    Raises
    ------
    ValueError
        If ``platform`` is unknown.
    """
    if platform not in PLATFORMS:
        raise ValueError(f"platform: expected one of {', '.join(PLATFORMS)}, found '{platform}'")
    return 7 if platform == Platform.VISIUM else int(grid_subdivision) ** 2


def build_subspots(
    slide,
    platform: str = Platform.VISIUM,
    grid_subdivision: int = 3,
    spot_diameter_px: float | None = None,
    n_subspots: int | None = None,
    n_neighbors: int = 6,
) -> SubspotGeometry:
    """Sub-spots (Visium: 7; square grids: 4 or 9) of every spot of ``slide`` and the spot graph.

    ``spot_diameter_px`` defaults to ``uns['spatial'][lib]['scalefactors']['spot_diameter_fullres']``, else the
    lattice pitch. ``n_subspots`` (e.g. ``SoScopeParams.n_subspots``), when given, must match the platform.

    Parameters
    ----------
    slide : anndata.AnnData
        The spots (``obsm['spatial']`` centres in full-resolution pixels).
    platform : str
        The platform.
    grid_subdivision : int
        Sub-spots per side (2 or 3) on platforms other than Visium.
    spot_diameter_px : float or None
        Spot diameter; from the slide's scalefactors, else the lattice pitch, when None.
    n_subspots : int or None
        Expected sub-spots per spot (7 on Visium, 4 or 9 otherwise); overrides ``grid_subdivision`` off Visium.
    n_neighbors : int
        Neighbours in the spot graph off Visium and square grids (see :func:`spot_graph`).

    Returns
    -------
    SubspotGeometry
        The spots, their sub-spots and the spot graph.

    Raises
    ------
    ValueError
        If the platform, ``grid_subdivision``, ``n_subspots``, the spot positions or the spot diameter are
        invalid.
    """
    if platform not in PLATFORMS:
        raise ValueError(f"platform: expected one of {', '.join(PLATFORMS)}, found '{platform}'")
    if platform != Platform.VISIUM and grid_subdivision not in (2, 3):
        raise ValueError(f"grid_subdivision: expected 2 or 3 for platform '{platform}', found {grid_subdivision}")
    if n_subspots is not None:
        if platform == Platform.VISIUM and n_subspots != 7:
            raise ValueError(f"n_subspots: platform 'visium' splits each spot into 7 sub-spots, found {n_subspots}")
        if platform != Platform.VISIUM and n_subspots not in (4, 9):
            raise ValueError(
                f"n_subspots: platform '{platform}' splits each spot into 4 (2x2) or 9 (3x3) "
                f"sub-spots, found {n_subspots}"
            )
        if platform != Platform.VISIUM:
            grid_subdivision = int(round(np.sqrt(n_subspots)))
    if "spatial" not in slide.obsm:
        raise ValueError("slide.obsm['spatial']: missing; expected (n_spots, 2) spot centres in full-res pixels")
    xy = np.asarray(slide.obsm["spatial"], dtype=float)
    if xy.ndim != 2 or xy.shape[1] < 2 or len(xy) != slide.n_obs:
        raise ValueError(f"slide.obsm['spatial']: expected shape ({slide.n_obs}, 2), found {xy.shape}")
    xy = xy[:, :2]
    if not np.isfinite(xy).all():
        raise ValueError(f"slide.obsm['spatial']: {int((~np.isfinite(xy)).any(1).sum())} spots have NaN/inf positions")
    pitch = spot_pitch(xy)
    diam = spot_diameter_px if spot_diameter_px is not None else _spot_diameter_from_slide(slide)
    if diam is None:
        diam = pitch
    if not diam > 0:
        raise ValueError(f"spot_diameter_px: expected > 0, found {diam}")
    offsets = geometry.subspot_offsets(
        platform, diam, grid_subdivision, spot_pitch=pitch if platform != Platform.VISIUM else None
    )
    pos, parent = geometry.subspot_positions(xy, offsets)
    n, kk = len(xy), len(offsets)
    edges = spot_graph(xy, platform, n_neighbors=n_neighbors, pitch=pitch)
    return SubspotGeometry(
        platform=platform,
        spot_names=np.asarray(slide.obs_names, dtype=str),
        spot_xy=xy,
        offsets=offsets,
        positions=pos,
        parent=parent,
        k=np.tile(np.arange(kk), n),
        spot_diameter_px=float(diam),
        spot_pitch_px=pitch,
        spot_edges=edges,
    )


def kernel_weights(d: np.ndarray, scale: float = 10.0) -> np.ndarray:
    """soScope's edge kernel: w = exp(-(d - d_min) / delta), delta = (d_median - d_min) / ln(scale).

    The closest pair gets weight 1 and the median distance 1 / ``scale``; equal distances all get 1.

    Parameters
    ----------
    d : numpy.ndarray
        Distances along the edges.
    scale : float
        Ratio of the largest weight to the weight at the median distance; must exceed 1.

    Returns
    -------
    numpy.ndarray
        Weight of each edge, in (0, 1].

    Raises
    ------
    ValueError
        If ``d`` is not empty and ``scale <= 1``.
    """
    d = np.asarray(d, dtype=float)
    if len(d) == 0:
        return d.copy()
    if scale <= 1:
        raise ValueError(f"scale_kernel: expected > 1, found {scale}")
    dmin, dmed = float(d.min()), float(np.median(d))
    if dmed - dmin <= 1e-12 * max(1.0, abs(dmed)):
        return np.ones_like(d)
    delta = (dmed - dmin) / np.log(scale)
    return np.exp(-(d - dmin) / delta)


def edge_distances(features: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Euclidean feature distance along each edge (vectorised over edges).

    Parameters
    ----------
    features : numpy.ndarray
        (n, F) features of the nodes.
    edges : numpy.ndarray
        (E, 2) node index pairs.

    Returns
    -------
    numpy.ndarray
        (E,) distances, float64.
    """
    f = np.asarray(features, dtype=np.float64)
    return np.sqrt(((f[edges[:, 0]] - f[edges[:, 1]]) ** 2).sum(1))


def subspot_graph(geom: SubspotGeometry, radius: float | None = None) -> np.ndarray:
    """Undirected sub-spot edges (E, 2), i < j: sub-spots within ``radius`` of each other (KD-tree).

    Default radius: 1.05 x the larger of the sub-spot spacing and the gap between facing sub-spots of adjacent
    spots, so W links neighbouring sub-spots within a spot and across adjacent spots. Linear memory.

    Parameters
    ----------
    geom : SubspotGeometry
        The sub-spots.
    radius : float or None
        Linking radius (full-resolution pixels); the default above when None.

    Returns
    -------
    numpy.ndarray
        (E, 2) int64 edges, i < j, sorted.
    """
    if radius is None:
        spacing = geom.subspot_diameter_px
        reach = float(np.sqrt((geom.offsets**2).sum(1)).max())
        radius = 1.05 * max(spacing, geom.spot_pitch_px - 2 * reach)
    pairs = cKDTree(geom.positions).query_pairs(r=radius, output_type="ndarray")
    if len(pairs) == 0:
        return np.zeros((0, 2), np.int64)
    pairs = np.sort(pairs.astype(np.int64), axis=1)
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]
