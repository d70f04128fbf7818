"""Features per sub-spot: nuclei counts and areas, squidpy image features, CNN features, positional encodings."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .. import geometry
from ..constants import UNASSIGNED, Platform
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
    area = vals[:, 2]
    row = nuclei_subspots(nuclei, geom)
    ok = row >= 0
    nk = geom.n_spots * geom.n_sub
    count = np.bincount(row[ok], minlength=nk).astype(np.float64)
    tot_area = np.bincount(row[ok], weights=area[ok], minlength=nk)
    return np.stack([count, tot_area], 1)


def nuclei_subspots(nuclei: pd.DataFrame, geom: SubspotGeometry) -> np.ndarray:
    """The sub-spot (spot-major row ``i * K + k``) of every nucleus, -1 outside every spot.

    A nucleus belongs to the spot whose circle contains its centroid (square grids: whose square), then to the
    nearest sub-spot of that spot (as ``geometry.assign_to_subspots``).

    Parameters
    ----------
    nuclei : pandas.DataFrame
        One row per nucleus with columns x, y (full-resolution pixels).
    geom : SubspotGeometry
        The sub-spots.

    Returns
    -------
    numpy.ndarray
        (n nuclei,) int64 sub-spot row of each nucleus, -1 outside every spot.

    Raises
    ------
    ValueError
        If ``nuclei`` lacks x or y, or has NaN / inf in them.
    """
    from ..io._readers import require_columns

    require_columns(nuclei, "nuclei", ("x", "y"), "x, y (full-res px)", ValueError)
    xy = nuclei[["x", "y"]].to_numpy(dtype=float)
    if not np.isfinite(xy).all():
        raise ValueError(f"nuclei: {int((~np.isfinite(xy)).any(1).sum())} rows with NaN/inf in x or y")
    radius = geom.spot_diameter_px / 2 if geom.platform == Platform.VISIUM else geom.spot_pitch_px / np.sqrt(2)
    spot, _ = geometry.assign_to_spots(xy, geom.spot_xy, radius)
    if geom.platform != Platform.VISIUM:  # square: keep points inside the spot's square only
        ok = spot >= 0
        rel = np.abs(xy[ok] - geom.spot_xy[spot[ok]])
        inside = (rel <= geom.spot_pitch_px / 2 + 1e-9).all(1)
        spot[np.flatnonzero(ok)[~inside]] = -1
    sub = geometry.assign_to_subspots(xy, spot, geom.spot_xy, geom.offsets)
    return np.where(spot >= 0, spot.astype(np.int64) * geom.n_sub + sub, -1).astype(np.int64)


def pooled_morphology(nuclei: pd.DataFrame, geom: SubspotGeometry, columns) -> np.ndarray:
    """Mean and standard deviation per sub-spot of per-nucleus features (z-scored over nuclei), (N K, 2 F).

    Sub-spots without nuclei get 0 (the mean nucleus) for both.

    Parameters
    ----------
    nuclei : pandas.DataFrame
        One row per nucleus with columns x, y and ``columns`` (e.g. ``segmentation.FEATURE_COLUMNS``).
    geom : SubspotGeometry
        The sub-spots.
    columns : sequence of str
        Per-nucleus feature columns to pool (NaN values count as the mean nucleus).

    Returns
    -------
    numpy.ndarray
        (N K, 2 F) float64: per-sub-spot means, then standard deviations.
    """
    row = nuclei_subspots(nuclei, geom)
    ok = row >= 0
    v = nuclei.loc[ok, list(columns)].to_numpy(dtype=np.float64)
    mu, sd = np.nanmean(v, 0) if len(v) else 0.0, np.nanstd(v, 0) if len(v) else 1.0
    z = np.nan_to_num((v - mu) / np.where(sd > 0, sd, 1.0))
    nk = geom.n_spots * geom.n_sub
    r = row[ok]
    n = np.bincount(r, minlength=nk).astype(np.float64)[:, None]
    s1 = np.stack([np.bincount(r, weights=z[:, j], minlength=nk) for j in range(z.shape[1])], 1)
    s2 = np.stack([np.bincount(r, weights=z[:, j] ** 2, minlength=nk) for j in range(z.shape[1])], 1)
    m = np.where(n > 0, s1 / np.maximum(n, 1), 0.0)
    var = np.where(n > 0, s2 / np.maximum(n, 1) - m**2, 0.0)
    return np.concatenate([m, np.sqrt(np.maximum(var, 0.0))], 1)


def type_profiles(reference, cell_type_key: str) -> pd.DataFrame:
    """Mean raw counts per cell type of a reference (types x genes): the expected profile of one cell of a type.

    Parameters
    ----------
    reference : anndata.AnnData
        Cells x genes counts with the types in ``obs[cell_type_key]``.
    cell_type_key : str
        Column of ``reference.obs`` with the cell types.

    Returns
    -------
    pandas.DataFrame
        Types x genes (``reference.var_names``), float64 arithmetic means (library sizes kept: a larger cell
        type weighs more in a sum of cells).

    Raises
    ------
    ValueError
        If ``reference.obs`` lacks ``cell_type_key`` or the reference has no cells.
    """
    import scipy.sparse as sp

    if cell_type_key not in reference.obs.columns:
        raise ValueError(
            f"reference.obs['{cell_type_key}']: missing; expected the cell types "
            f"(columns found: {list(reference.obs.columns)})"
        )
    if reference.n_obs == 0:
        raise ValueError("reference: no cells")
    lab = pd.Categorical(reference.obs[cell_type_key].astype(str))
    onehot = sp.csr_matrix((np.ones(len(lab)), (lab.codes, np.arange(len(lab)))), shape=(len(lab.categories), len(lab)))
    sums = onehot @ reference.X
    sums = np.asarray(sums.toarray() if sp.issparse(sums) else sums, dtype=np.float64)
    n = np.asarray(onehot.sum(1), dtype=np.float64)
    return pd.DataFrame(sums / n, index=pd.Index(lab.categories, name=cell_type_key), columns=reference.var_names)


def typed_subspot_profiles(
    nuclei: pd.DataFrame,
    geom: SubspotGeometry,
    profiles: pd.DataFrame,
    genes,
    type_column: str = "cell_type",
    pseudocount: float = 0.01,
    confidence_column: str | None = None,
) -> np.ndarray:
    """Sum over each sub-spot's nuclei of their type's mean profile, per gene (N K, G), float32.

    Sub-spots without nuclei get ``pseudocount`` times the mean of the type profiles (so a spot's empty sub-spots
    keep a small share, and a spot without nuclei is split evenly by :func:`typed_shares`). With
    ``confidence_column`` (a label's probability c in [0, 1], e.g. cell typing's ``confidence``), a nucleus counts
    as ``c x its type's profile + (1 - c) x the mean profile of its spot's labelled nuclei``: a nucleus of
    confidence 0 is an average cell of its spot, so all-unsure typing gives back the nuclei-count split. Nuclei
    without a label (NaN, '' or 'unassigned', e.g. in spots the typing skipped) count with confidence 0.

    Parameters
    ----------
    nuclei : pandas.DataFrame
        One row per nucleus with columns x, y (full-resolution pixels) and ``type_column``.
    geom : SubspotGeometry
        The sub-spots.
    profiles : pandas.DataFrame
        Types x genes mean profile of one cell of each type (e.g. :func:`type_profiles`).
    genes : sequence of str
        The slide's genes, in order; every one must be a column of ``profiles``.
    type_column : str, default "cell_type"
        Column of ``nuclei`` with each nucleus's type.
    pseudocount : float, default 0.01
        Cells of the mean type added to every sub-spot.
    confidence_column : str, optional
        Column of ``nuclei`` with each label's confidence (clipped to [0, 1]; NaN = 0); None = labels taken as
        certain.

    Returns
    -------
    numpy.ndarray
        (N K, G) float32 expected counts per sub-spot.

    Raises
    ------
    ValueError
        If ``nuclei`` lacks the type column, a nucleus inside a spot has a type not in ``profiles``,
        ``profiles`` misses genes of the slide or has negative / non-finite values.
    """
    import scipy.sparse as sp

    if type_column not in nuclei.columns:
        raise ValueError(
            f"nuclei['{type_column}']: missing; the typed-cell prior needs a type per nucleus "
            f"(columns found: {list(nuclei.columns)})"
        )
    genes = pd.Index([str(g) for g in genes])
    cols = pd.Index([str(c) for c in profiles.columns])
    missing = genes[~genes.isin(cols)]
    if len(missing):
        raise ValueError(
            f"type profiles: {len(missing)} of the slide's {len(genes)} genes missing, e.g. {list(missing[:5])}; "
            "expected a column per slide gene (reference genes)"
        )
    prof = profiles.to_numpy(dtype=np.float64)[:, cols.get_indexer(genes)]
    if not np.isfinite(prof).all() or (prof < 0).any():
        raise ValueError("type profiles: expected finite non-negative mean counts")
    row = nuclei_subspots(nuclei, geom)
    ok = row >= 0
    types = pd.Index([str(t) for t in profiles.index])
    raw = nuclei[type_column].to_numpy()[ok]
    lab = pd.Series(raw, dtype=object).astype(str).to_numpy(dtype=object)  # vectorised str() of each label
    unlabelled = pd.isna(raw) | np.isin(lab, ["", UNASSIGNED, "nan", "None"])
    code = types.get_indexer(lab)
    if (code[~unlabelled] < 0).any():
        bad = sorted(set(lab[(code < 0) & ~unlabelled]))[:5]
        raise ValueError(
            f"nuclei['{type_column}']: {int((code < 0).sum())} nuclei in spots with types not in the type profiles, "
            f"e.g. {bad}; expected one of {list(types[:10])}{' ...' if len(types) > 10 else ''}"
        )
    nk = geom.n_spots * geom.n_sub
    if confidence_column is None:
        conf = np.ones(len(code))
    else:
        if confidence_column not in nuclei.columns:
            raise ValueError(
                f"nuclei['{confidence_column}']: missing; expected each label's confidence in [0, 1] "
                f"(columns found: {list(nuclei.columns)})"
            )
        conf = np.clip(np.nan_to_num(nuclei[confidence_column].to_numpy(dtype=float)[ok], nan=0.0), 0.0, 1.0)
    conf = np.where(unlabelled, 0.0, conf)  # an unlabelled nucleus (e.g. a QC-dropped spot): its spot's average
    code = np.where(unlabelled, 0, code)
    r = row[ok]
    c = sp.csr_matrix((conf, (r, code)), shape=(nk, len(types)))
    out = np.asarray(c @ prof, dtype=np.float32)
    if confidence_column is not None or unlabelled.any():  # the unsure part: the mean profile of its spot's nuclei
        spot = r // geom.n_sub
        lab_w = (~unlabelled).astype(np.float64)
        comp = sp.csr_matrix((lab_w, (spot, code)), shape=(geom.n_spots, len(types)))
        n_spot = np.asarray(comp.sum(1)).ravel()
        spot_mean = np.where(
            n_spot[:, None] > 0,
            np.asarray(comp @ prof, dtype=np.float64) / np.maximum(n_spot, 1.0)[:, None],
            prof.mean(0)[None, :],
        )  # (N, G); spots without a labelled nucleus: the mean type
        unsure = np.bincount(r, weights=1.0 - conf, minlength=nk)  # (N K,)
        out += (unsure[:, None] * np.repeat(spot_mean, geom.n_sub, axis=0)).astype(np.float32)
    out += np.float32(pseudocount) * prof.mean(0).astype(np.float32)[None, :]
    return out


def typed_shares(expected: np.ndarray, k: int) -> np.ndarray:
    """Each sub-spot's per-gene share of its spot's expected counts (N K, G), float32; 1 / K where a spot has none.

    Parameters
    ----------
    expected : numpy.ndarray
        (N K, G) expected counts per sub-spot, spot-major (:func:`typed_subspot_profiles`).
    k : int
        Sub-spots per spot (K).

    Returns
    -------
    numpy.ndarray
        (N K, G) float32 shares; every spot's K shares sum to 1 per gene.
    """
    e = np.asarray(expected, dtype=np.float32)
    nk, g = e.shape
    e3 = e.reshape(nk // k, k, g)
    tot = e3.sum(1, keepdims=True)
    return np.where(tot > 0, e3 / np.where(tot > 0, tot, 1), np.float32(1.0 / k)).reshape(nk, g).astype(np.float32)


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
        morph = [c for c in params.nuclei_morphology_features if c in nuclei.columns]
        if morph and params.nuclei_morphology_weight > 0:
            blocks.append(
                reduce_block(
                    pooled_morphology(nuclei, geom, morph),
                    None,
                    params.nuclei_morphology_weight,
                    "pooled nucleus morphology",
                )
            )
            desc["nuclei_morphology"] = morph
    if not blocks:
        desc["image"] = "none (positional encoding of sub-spot offsets)"
        y = positional_features(geom)
        desc["n_features"] = int(y.shape[1])
        return y, desc, None
    y = np.concatenate(blocks, 1).astype(np.float32)
    desc["n_features"] = int(y.shape[1])
    return y, desc, counts
