"""soScope geometry and inputs: sub-spots, the spot graph A, sub-spot image features Y and the similarity graph W.

Pure numpy / scipy / torch (no dagster). Sub-spots are stored spot-major: sub-spot ``i * K + k`` is sub-spot ``k``
(offset ``geometry.subspot_offsets(...)[k]``) of spot ``i``, so a (N K, G) array reshapes to (N, K, G).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from spatial_assets import geometry

PLATFORMS = ("visium", "square_grid", "slideseq", "merfish")
SQUIDPY_FEATURES = ("summary", "histogram", "texture")


@dataclass
class SubspotGeometry:
    """Spots, their sub-spots (spot-major) and the spot graph, in full-resolution pixels."""

    platform: str
    spot_names: np.ndarray        # (N,) str
    spot_xy: np.ndarray           # (N, 2)
    offsets: np.ndarray           # (K, 2)
    positions: np.ndarray         # (N K, 2)
    parent: np.ndarray            # (N K,) spot index
    k: np.ndarray                 # (N K,) sub-spot index 0..K-1
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
    """Lattice pitch: median distance of each spot to its nearest other spot."""
    if len(spot_xy) < 2:
        raise ValueError(f"slide.obsm['spatial']: need at least 2 spots to build a spot graph, found {len(spot_xy)}")
    d, _ = cKDTree(spot_xy).query(spot_xy, k=2)
    pitch = float(np.median(d[:, 1]))
    if not pitch > 0:
        raise ValueError("slide.obsm['spatial']: spot positions are duplicated (median nearest-spot distance is 0)")
    return pitch


def spot_graph(spot_xy: np.ndarray, platform: str, n_neighbors: int = 6, pitch: float | None = None) -> np.ndarray:
    """Undirected spot edges (E, 2): 6 lattice neighbours on Visium, 4 on square grids, else ``n_neighbors`` nearest."""
    pitch = spot_pitch(spot_xy) if pitch is None else pitch
    if platform == "visium":
        return geometry.grid_neighbors(spot_xy, 6, max_distance=1.2 * pitch)
    if platform == "square_grid":
        return geometry.grid_neighbors(spot_xy, 4, max_distance=1.2 * pitch)
    return geometry.grid_neighbors(spot_xy, n_neighbors)


def check_spot_graph(edges: np.ndarray, n_spots: int, platform: str, pitch: float) -> np.ndarray:
    """Raise if the spot graph has no edges; return the indices of isolated spots (no neighbour)."""
    if len(edges) == 0:
        raise ValueError(f"spot graph: no edges between the {n_spots} spots (nearest-spot distance {pitch:.4g} px); "
                         f"expected a {platform} lattice with neighbouring spots")
    deg = np.bincount(np.asarray(edges).ravel(), minlength=n_spots)
    return np.flatnonzero(deg == 0)


def expected_subspots(platform: str, grid_subdivision: int = 3) -> int:
    """K of a platform: 7 for Visium, ``grid_subdivision`` ** 2 (4 or 9) otherwise."""
    if platform not in PLATFORMS:
        raise ValueError(f"platform: expected one of {', '.join(PLATFORMS)}, found '{platform}'")
    return 7 if platform == "visium" else int(grid_subdivision) ** 2


def build_subspots(slide, platform: str = "visium", grid_subdivision: int = 3, spot_diameter_px: float | None = None,
                   n_subspots: int | None = None, n_neighbors: int = 6) -> SubspotGeometry:
    """Sub-spots (Visium: 7; square grids: 4 or 9) of every spot of ``slide`` and the spot graph.

    ``spot_diameter_px`` defaults to ``uns['spatial'][lib]['scalefactors']['spot_diameter_fullres']``, else the
    lattice pitch. ``n_subspots`` (e.g. ``SoScopeParams.n_subspots``), when given, must match the platform.
    """
    if platform not in PLATFORMS:
        raise ValueError(f"platform: expected one of {', '.join(PLATFORMS)}, found '{platform}'")
    if platform != "visium" and grid_subdivision not in (2, 3):
        raise ValueError(f"grid_subdivision: expected 2 or 3 for platform '{platform}', found {grid_subdivision}")
    if n_subspots is not None:
        if platform == "visium" and n_subspots != 7:
            raise ValueError(f"n_subspots: platform 'visium' splits each spot into 7 sub-spots, found {n_subspots}")
        if platform != "visium" and n_subspots not in (4, 9):
            raise ValueError(f"n_subspots: platform '{platform}' splits each spot into 4 (2x2) or 9 (3x3) "
                             f"sub-spots, found {n_subspots}")
        if platform != "visium":
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
    offsets = geometry.subspot_offsets(platform, diam, grid_subdivision,
                                       spot_pitch=pitch if platform != "visium" else None)
    pos, parent = geometry.subspot_positions(xy, offsets)
    n, kk = len(xy), len(offsets)
    edges = spot_graph(xy, platform, n_neighbors=n_neighbors, pitch=pitch)
    return SubspotGeometry(platform=platform, spot_names=np.asarray(slide.obs_names, dtype=str), spot_xy=xy,
                           offsets=offsets, positions=pos, parent=parent, k=np.tile(np.arange(kk), n),
                           spot_diameter_px=float(diam), spot_pitch_px=pitch, spot_edges=edges)


# --------------------------------------------------------------------------------------------------------------
# kernel weights and graphs
# --------------------------------------------------------------------------------------------------------------

def kernel_weights(d: np.ndarray, scale: float = 10.0) -> np.ndarray:
    """soScope's edge kernel: w = exp(-(d - d_min) / delta), delta = (d_median - d_min) / ln(scale).

    The closest pair gets weight 1 and the median distance 1 / ``scale``; equal distances all get 1.
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
    """Euclidean feature distance along each edge (vectorised over edges)."""
    f = np.asarray(features, dtype=np.float64)
    return np.sqrt(((f[edges[:, 0]] - f[edges[:, 1]]) ** 2).sum(1))


def subspot_graph(geom: SubspotGeometry, radius: float | None = None) -> np.ndarray:
    """Undirected sub-spot edges (E, 2), i < j: sub-spots within ``radius`` of each other (KD-tree).

    Default radius: 1.05 x the larger of the sub-spot spacing and the gap between facing sub-spots of adjacent
    spots, so W links neighbouring sub-spots within a spot and across adjacent spots. Linear memory.
    """
    if radius is None:
        spacing = geom.subspot_diameter_px
        reach = float(np.sqrt((geom.offsets ** 2).sum(1)).max())
        radius = 1.05 * max(spacing, geom.spot_pitch_px - 2 * reach)
    pairs = cKDTree(geom.positions).query_pairs(r=radius, output_type="ndarray")
    if len(pairs) == 0:
        return np.zeros((0, 2), np.int64)
    pairs = np.sort(pairs.astype(np.int64), axis=1)
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]


# --------------------------------------------------------------------------------------------------------------
# sub-spot features
# --------------------------------------------------------------------------------------------------------------

def positional_features(geom: SubspotGeometry, n_freq: int = 2) -> np.ndarray:
    """Positional encoding of each sub-spot's offset from its spot centre (no image): (N K, 2 + 4 n_freq)."""
    rel = geom.offsets / max(float(np.abs(geom.offsets).max()), 1e-12)  # in [-1, 1]
    enc = [rel]
    for f in range(n_freq):
        enc += [np.sin(np.pi * 2 ** f * rel / 2), np.cos(np.pi * 2 ** f * rel / 2)]
    per_k = np.concatenate(enc, 1)
    return np.tile(per_k, (geom.n_spots, 1)).astype(np.float32)


def standardise(features: np.ndarray, name: str = "features") -> np.ndarray:
    """Column z-scores (constant columns -> 0); raises on NaN / inf naming ``name``."""
    f = np.asarray(features, dtype=np.float64)
    bad = ~np.isfinite(f)
    if bad.any():
        r, c = np.nonzero(bad)
        raise ValueError(f"{name}: {int(bad.sum())} NaN/inf values (first at row {r[0]}, column {c[0]}); "
                         "expected finite numbers")
    sd = f.std(0)
    return ((f - f.mean(0)) / np.where(sd > 0, sd, 1.0)).astype(np.float32)


def _check_image(image) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim == 2:
        img = img[..., None]
    if img.ndim != 3 or img.shape[2] not in (1, 3, 4):
        raise ValueError(f"image: expected (H, W) or (H, W, 3) RGB array, found shape {img.shape}")
    if img.shape[2] == 4:
        img = img[..., :3]
    if np.issubdtype(img.dtype, np.floating) and not np.isfinite(img).all():
        raise ValueError(f"image: {int((~np.isfinite(img)).sum())} NaN/inf pixel values")
    return img


def nuclei_features(nuclei: pd.DataFrame, geom: SubspotGeometry) -> np.ndarray:
    """Nuclei count and total nucleus area per sub-spot (N K, 2) from a nuclei table with columns x, y, area.

    A nucleus belongs to the spot whose circle contains its centroid (square grids: whose square), then to the
    nearest sub-spot of that spot (as ``geometry.assign_to_subspots``).
    """
    from .readers import require_columns

    require_columns(nuclei, "nuclei", ("x", "y", "area"), "x, y (full-res px) and area (px^2)", ValueError)
    vals = nuclei[["x", "y", "area"]].to_numpy(dtype=float)
    if not np.isfinite(vals).all():
        raise ValueError(f"nuclei: {int((~np.isfinite(vals)).any(1).sum())} rows with NaN/inf in x, y or area")
    radius = geom.spot_diameter_px / 2 if geom.platform == "visium" else geom.spot_pitch_px / np.sqrt(2)
    spot, _ = geometry.assign_to_spots(vals[:, :2], geom.spot_xy, radius)
    if geom.platform != "visium":  # square: keep points inside the spot's square only
        ok = spot >= 0
        rel = np.abs(vals[ok, :2] - geom.spot_xy[spot[ok]])
        inside = (rel <= geom.spot_pitch_px / 2 + 1e-9).all(1)
        spot[np.flatnonzero(ok)[~inside]] = -1
    sub = geometry.assign_to_subspots(vals[:, :2], spot, geom.spot_xy, geom.offsets)
    ok = spot >= 0
    row = spot[ok] * geom.n_sub + sub[ok]
    nk = geom.n_spots * geom.n_sub
    count = np.bincount(row, minlength=nk).astype(np.float64)
    area = np.bincount(row, weights=vals[ok, 2], minlength=nk)
    return np.stack([count, area], 1)


def squidpy_features(image: np.ndarray, geom: SubspotGeometry, features=SQUIDPY_FEATURES, n_jobs: int = 1,
                     patch_scale: float = 1.0) -> np.ndarray:
    """squidpy image features (summary, histogram, texture) of a spot-like patch around every sub-spot.

    Patch diameter: ``patch_scale`` x the sub-spot spacing. Returns (N K, F); NaN entries (e.g. texture
    correlation of a flat patch) are set to the column mean.
    """
    import anndata as ad
    import squidpy as sq

    img = _check_image(image)
    a = ad.AnnData(obs=pd.DataFrame(index=pd.Index([str(i) for i in range(len(geom.positions))])))
    a.obsm["spatial"] = geom.positions.astype(np.float64)
    a.uns["spatial"] = {"soscope": {"scalefactors": {"spot_diameter_fullres": geom.subspot_diameter_px}}}
    cont = sq.im.ImageContainer(img, layer="image", dims=("y", "x", "channels"), library_id="soscope")
    df = sq.im.calculate_image_features(a, cont, features=list(features), copy=True, n_jobs=n_jobs,
                                        show_progress_bar=False, spot_scale=patch_scale, library_id="soscope")
    f = df.to_numpy(dtype=np.float64)
    if np.isnan(f).any():
        col_mean = np.nanmean(np.where(np.isnan(f), np.nan, f), axis=0)
        f = np.where(np.isnan(f), np.nan_to_num(col_mean)[None, :], f)
    return f


def extract_patches(image: np.ndarray, centres: np.ndarray, size: int) -> np.ndarray:
    """Square patches (n, size, size, C) centred on ``centres`` (x, y), zero-padded at the borders (vectorised)."""
    img = _check_image(image)
    half = size // 2
    pad = np.pad(img, ((half + 1, half + 1), (half + 1, half + 1), (0, 0)))
    cx = np.rint(centres[:, 0]).astype(np.int64) + half + 1
    cy = np.rint(centres[:, 1]).astype(np.int64) + half + 1
    cx = np.clip(cx, half, pad.shape[1] - half - 1)
    cy = np.clip(cy, half, pad.shape[0] - half - 1)
    d = np.arange(size) - half
    return pad[(cy[:, None, None] + d[None, :, None]), (cx[:, None, None] + d[None, None, :])]


def cnn_features(image: np.ndarray, geom: SubspotGeometry, weights_path: str, batch: int = 2048) -> np.ndarray:
    """Embeddings of each sub-spot's patch by ``soscope_model.SmallCNN`` loaded from a torch state dict file."""
    import torch

    from spatial_assets.soscope_model import SmallCNN

    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise ValueError(f"cnn_weights: file '{weights_path}' not found") from e
    img = _check_image(image)
    net = SmallCNN(in_channels=img.shape[2])
    try:
        net.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise ValueError(f"cnn_weights: '{weights_path}' is not a state dict of SmallCNN "
                         f"(expected keys {sorted(net.state_dict())}): {e}") from e
    net.eval()
    size = max(8, int(round(geom.subspot_diameter_px)))
    out = []
    with torch.no_grad():
        for s in range(0, len(geom.positions), batch):
            p = extract_patches(img, geom.positions[s:s + batch], size)
            t = torch.from_numpy(p.astype(np.float32) / 255.0).permute(0, 3, 1, 2)
            t = torch.nn.functional.interpolate(t, size=(32, 32), mode="bilinear", align_corners=False)
            out.append(net(t).numpy())
    return np.concatenate(out, 0).astype(np.float64)


def image_features(image, geom: SubspotGeometry, nuclei: pd.DataFrame | None = None, params=None, *,
                   squidpy_feature_set=SQUIDPY_FEATURES, n_jobs: int = 1) -> tuple[np.ndarray, dict]:
    """Standardised sub-spot features Y (N K, F) and a description of what went in.

    Image (when given and ``params.image_features != 'none'``): CNN embeddings if ``params.cnn_weights`` is set,
    else squidpy features; plus nuclei count and area per sub-spot when ``nuclei`` is given. Without either,
    the positional encoding of the sub-spot offset.
    """
    mode = getattr(params, "image_features", "squidpy") if params is not None else "squidpy"
    cnn = getattr(params, "cnn_weights", None) if params is not None else None
    blocks, desc = [], {"image": "none", "nuclei": nuclei is not None}
    if image is not None and mode != "none":
        if cnn:
            blocks.append(cnn_features(image, geom, cnn))
            desc["image"] = f"cnn:{cnn}"
        else:
            blocks.append(squidpy_features(image, geom, squidpy_feature_set, n_jobs=n_jobs))
            desc["image"] = "squidpy:" + ",".join(squidpy_feature_set)
    if nuclei is not None:
        blocks.append(nuclei_features(nuclei, geom))
    if not blocks:
        desc["image"] = "none (positional encoding of sub-spot offsets)"
        y = positional_features(geom)
        desc["n_features"] = int(y.shape[1])
        return y, desc
    y = standardise(np.concatenate(blocks, 1), "sub-spot image features")
    desc["n_features"] = int(y.shape[1])
    return y, desc
