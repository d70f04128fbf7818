"""Features per sub-spot: nuclei counts and areas, squidpy image features, CNN features, positional encodings."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .. import geometry
from ..constants import Platform
from ._geometry import SubspotGeometry

SQUIDPY_FEATURES = ("summary", "histogram", "texture")


def positional_features(geom: SubspotGeometry, n_freq: int = 2) -> np.ndarray:
    """Positional encoding of each sub-spot's offset from its spot centre (no image): (N K, 2 + 4 n_freq).

    Parameters
    ----------
    geom : SubspotGeometry
        The sub-spots.
    n_freq : int
        Number of sine / cosine frequencies.

    Returns
    -------
    numpy.ndarray
        (N K, 2 + 4 n_freq) float32 encoding, the same for every spot.
    """
    rel = geom.offsets / max(float(np.abs(geom.offsets).max()), 1e-12)  # in [-1, 1]
    enc = [rel]
    for f in range(n_freq):
        enc += [np.sin(np.pi * 2**f * rel / 2), np.cos(np.pi * 2**f * rel / 2)]
    per_k = np.concatenate(enc, 1)
    return np.tile(per_k, (geom.n_spots, 1)).astype(np.float32)


def standardise(features: np.ndarray, name: str = "features") -> np.ndarray:
    """Column z-scores (constant columns -> 0); raises on NaN / inf naming ``name``.

    Parameters
    ----------
    features : numpy.ndarray
        (n, F) features.
    name : str
        Name of the features in error messages.

    Returns
    -------
    numpy.ndarray
        (n, F) float32 z-scores.

    Raises
    ------
    ValueError
        If ``features`` has NaN / inf values.
    """
    f = np.asarray(features, dtype=np.float64)
    bad = ~np.isfinite(f)
    if bad.any():
        r, c = np.nonzero(bad)
        raise ValueError(
            f"{name}: {int(bad.sum())} NaN/inf values (first at row {r[0]}, column {c[0]}); expected finite numbers"
        )
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

    Parameters
    ----------
    nuclei : pandas.DataFrame
        One row per nucleus with columns x, y (full-resolution pixels) and area (px^2).
    geom : SubspotGeometry
        The sub-spots.

    Returns
    -------
    numpy.ndarray
        (N K, 2) float64: nuclei count and total nucleus area per sub-spot.

    Raises
    ------
    ValueError
        If ``nuclei`` lacks x, y or area, or has NaN / inf in them.
    """
    from ..io._readers import require_columns

    require_columns(nuclei, "nuclei", ("x", "y", "area"), "x, y (full-res px) and area (px^2)", ValueError)
    vals = nuclei[["x", "y", "area"]].to_numpy(dtype=float)
    if not np.isfinite(vals).all():
        raise ValueError(f"nuclei: {int((~np.isfinite(vals)).any(1).sum())} rows with NaN/inf in x, y or area")
    radius = geom.spot_diameter_px / 2 if geom.platform == Platform.VISIUM else geom.spot_pitch_px / np.sqrt(2)
    spot, _ = geometry.assign_to_spots(vals[:, :2], geom.spot_xy, radius)
    if geom.platform != Platform.VISIUM:  # square: keep points inside the spot's square only
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


def squidpy_features(
    image: np.ndarray, geom: SubspotGeometry, features=SQUIDPY_FEATURES, n_jobs: int = 1, patch_scale: float = 1.0
) -> np.ndarray:
    """squidpy image features (summary, histogram, texture) of a spot-like patch around every sub-spot.

    Patch diameter: ``patch_scale`` x the sub-spot spacing. Returns (N K, F); NaN entries (e.g. texture
    correlation of a flat patch) are set to the column mean.

    Parameters
    ----------
    image : numpy.ndarray
        The image (H, W) or (H, W, 3|4) in full-resolution pixels.
    geom : SubspotGeometry
        The sub-spots.
    features : sequence of str
        squidpy feature kinds to compute.
    n_jobs : int
        squidpy worker processes.
    patch_scale : float
        Patch diameter in sub-spot spacings.

    Returns
    -------
    numpy.ndarray
        (N K, F) float64 features.

    Raises
    ------
    ValueError
        If the image has a wrong shape or NaN / inf pixels.
    """
    import anndata as ad
    import squidpy as sq

    img = _check_image(image)
    a = ad.AnnData(obs=pd.DataFrame(index=pd.Index([str(i) for i in range(len(geom.positions))])))
    a.obsm["spatial"] = geom.positions.astype(np.float64)
    a.uns["spatial"] = {"soscope": {"scalefactors": {"spot_diameter_fullres": geom.subspot_diameter_px}}}
    cont = sq.im.ImageContainer(img, layer="image", dims=("y", "x", "channels"), library_id="soscope")
    df = sq.im.calculate_image_features(
        a,
        cont,
        features=list(features),
        copy=True,
        n_jobs=n_jobs,
        show_progress_bar=False,
        spot_scale=patch_scale,
        library_id="soscope",
    )
    f = df.to_numpy(dtype=np.float64)
    if np.isnan(f).any():
        col_mean = np.nanmean(np.where(np.isnan(f), np.nan, f), axis=0)
        f = np.where(np.isnan(f), np.nan_to_num(col_mean)[None, :], f)
    return f


def extract_patches(image: np.ndarray, centres: np.ndarray, size: int) -> np.ndarray:
    """Square patches (n, size, size, C) centred on ``centres`` (x, y), zero-padded at the borders (vectorised).

    Parameters
    ----------
    image : numpy.ndarray
        The image (H, W) or (H, W, 3|4).
    centres : numpy.ndarray
        (n, 2) patch centres (x, y) in pixels.
    size : int
        Patch side in pixels.

    Returns
    -------
    numpy.ndarray
        (n, size, size, C) patches of the image's dtype (C = 1 or 3).

    Raises
    ------
    ValueError
        If the image has a wrong shape or NaN / inf pixels.
    """
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
    """Embeddings of each sub-spot's patch by ``soscope_model.SmallCNN`` loaded from a torch state dict file.

    Parameters
    ----------
    image : numpy.ndarray
        The image (H, W) or (H, W, 3|4), 0-255 values, in full-resolution pixels.
    geom : SubspotGeometry
        The sub-spots.
    weights_path : str
        File of the SmallCNN state dict.
    batch : int
        Patches per forward pass.

    Returns
    -------
    numpy.ndarray
        (N K, D) float64 embeddings.

    Raises
    ------
    ValueError
        If the weights file is missing or not a SmallCNN state dict, or the image is malformed.
    """
    import torch

    from ._model import SmallCNN

    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise ValueError(f"cnn_weights: file '{weights_path}' not found") from e
    img = _check_image(image)
    net = SmallCNN(in_channels=img.shape[2])
    try:
        net.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise ValueError(
            f"cnn_weights: '{weights_path}' is not a state dict of SmallCNN "
            f"(expected keys {sorted(net.state_dict())}): {e}"
        ) from e
    net.eval()
    size = max(8, int(round(geom.subspot_diameter_px)))
    out = []
    with torch.no_grad():
        for s in range(0, len(geom.positions), batch):
            p = extract_patches(img, geom.positions[s : s + batch], size)
            t = torch.from_numpy(p.astype(np.float32) / 255.0).permute(0, 3, 1, 2)
            t = torch.nn.functional.interpolate(t, size=(32, 32), mode="bilinear", align_corners=False)
            out.append(net(t).numpy())
    return np.concatenate(out, 0).astype(np.float64)


def reduce_block(features: np.ndarray, n_components: int | None, weight: float, name: str) -> np.ndarray:
    """Z-score ``features``, keep the top ``n_components`` principal components, scale to total variance ``weight``.

    Parameters
    ----------
    features
        (n, F) block of one kind of feature (e.g. squidpy image features).
    n_components
        Principal components kept (None or >= F: all z-scored columns, no PCA).
    weight
        Total variance of the returned block (sum over its columns), so blocks of different widths count as set.
    name
        Used in error messages.

    Returns
    -------
    numpy.ndarray
        (n, min(F, n_components)) float32.

    Raises
    ------
    ValueError
        If ``features`` has NaN / inf values.
    """
    z = standardise(features, name).astype(np.float64)
    z = z[:, z.std(0) > 0] if (z.std(0) > 0).any() else z[:, :1]
    if n_components is not None and n_components < z.shape[1]:
        u, sv, _ = np.linalg.svd(z - z.mean(0), full_matrices=False)
        z = u[:, :n_components] * sv[:n_components]
    tot = float(z.var(0).sum())
    return (z * np.sqrt(weight / tot) if tot > 0 else z).astype(np.float32)


def image_features(
    image,
    geom: SubspotGeometry,
    nuclei: pd.DataFrame | None = None,
    params=None,
    *,
    n_jobs: int = 1,
    raw_image_features: np.ndarray | None = None,
) -> tuple[np.ndarray, dict, np.ndarray | None]:
    """Sub-spot features Y (N K, F), a description of what went in, and the nuclei count per sub-spot.

    Image (when given and ``params.image_features != 'none'``): CNN embeddings if ``params.cnn_weights`` is set,
    else the squidpy features ``params.squidpy_features``; z-scored, reduced to ``params.image_pca`` principal
    components and scaled to total variance ``params.image_feature_weight``. Nuclei (when ``nuclei`` is given):
    log1p nuclei count and mean nucleus area per sub-spot, z-scored and scaled to total variance
    ``params.nuclei_feature_weight``. Without either, the positional encoding of the sub-spot offset.

    Parameters
    ----------
    image
        H&E (H, W, 3) in full-resolution pixels, or None.
    geom
        Sub-spot geometry of the slide.
    nuclei
        Table with columns x, y, area (one row per segmented nucleus), or None.
    params
        ``SoScopeParams`` (None: defaults).
    n_jobs
        squidpy worker processes.
    raw_image_features
        Precomputed raw image features (N K, F) (e.g. :func:`squidpy_features` of this geometry, cached), used in
        place of computing them from ``image``; they go through the same reduction and weighting.

    Returns
    -------
    tuple
        ``(Y, description, counts)``; ``counts`` (N K,) nuclei per sub-spot, or None without nuclei.

    Raises
    ------
    ValueError
        On a malformed image or nuclei table (naming the field).
    """
    from ..params import SoScopeParams

    params = SoScopeParams() if params is None else params
    blocks, desc, counts = [], {"image": "none", "nuclei": nuclei is not None}, None
    if raw_image_features is not None and params.image_features != "none":
        raw = np.asarray(raw_image_features, dtype=np.float64)
        if raw.ndim != 2 or raw.shape[0] != len(geom.positions):
            raise ValueError(
                f"raw_image_features: expected ({len(geom.positions)}, F), one row per sub-spot, found {raw.shape}"
            )
        desc["image"] = "precomputed raw image features"
        desc["image_raw_features"] = int(raw.shape[1])
        blocks.append(reduce_block(raw, params.image_pca, params.image_feature_weight, "raw_image_features"))
        desc["image_components"] = int(blocks[-1].shape[1])
    elif image is not None and params.image_features != "none":
        if params.cnn_weights:
            raw = cnn_features(image, geom, params.cnn_weights)
            desc["image"] = f"cnn:{params.cnn_weights}"
        else:
            raw = squidpy_features(image, geom, tuple(params.squidpy_features), n_jobs=n_jobs)
            desc["image"] = "squidpy:" + ",".join(params.squidpy_features)
        desc["image_raw_features"] = int(raw.shape[1])
        blocks.append(reduce_block(raw, params.image_pca, params.image_feature_weight, "sub-spot image features"))
        desc["image_components"] = int(blocks[-1].shape[1])
    if nuclei is not None:
        nf = nuclei_features(nuclei, geom)
        counts = nf[:, 0]
        mean_area = np.where(counts > 0, nf[:, 1] / np.maximum(counts, 1), 0.0)
        blocks.append(
            reduce_block(
                np.stack([np.log1p(counts), mean_area], 1), None, params.nuclei_feature_weight, "nuclei features"
            )
        )
    if not blocks:
        desc["image"] = "none (positional encoding of sub-spot offsets)"
        y = positional_features(geom)
        desc["n_features"] = int(y.shape[1])
        return y, desc, None
    y = np.concatenate(blocks, 1).astype(np.float32)
    desc["n_features"] = int(y.shape[1])
    return y, desc, counts
