"""Per-nucleus features from a label image and the hematoxylin channel of the H&E (shape, stain, texture).

Shape: second moments by per-label ``np.bincount`` (the ellipse's axes), a convex hull per nucleus for solidity
(``skimage.measure.regionprops_table`` with an extra property);
intensity and texture from per-label ``np.bincount`` sums over the hematoxylin optical density (rgb2hed's H
column, :func:`spatial_assets.segmentation.hematoxylin`) and two filtered copies of it. No per-cell Python loop
here; memory linear in pixels of one row band plus the cells.

Large images (zarr, memmaps) are read in row bands of ``block_rows`` rows with a ``margin`` of extra rows above
and below: every pixel's intensity sums are counted once (in the band whose core holds its row) and every
nucleus's shape is measured once (in the band whose core holds its top row), so band borders change nothing as
long as nuclei are less than ``margin`` rows tall.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..io._readers import InputError
from ._channels import hematoxylin

# The canonical per-cell nucleus features written to the cells table (segmentation.segment_sample) and read by
# cell typing's morphology labels (CellTypingParams.morphology_features picks among them).
FEATURE_COLUMNS = (
    "nucleus_area",  # pixels of the label
    "nucleus_eccentricity",  # of the ellipse with the same second moments (0 = circle)
    "nucleus_axis_ratio",  # minor / major axis of that ellipse (1 = circle)
    "nucleus_solidity",  # pixels / pixels of the convex hull of the pixel centres (1 = convex)
    "nucleus_h_mean",  # mean hematoxylin optical density of the nucleus' pixels (darkness)
    "nucleus_h_sd",  # its standard deviation (spread of stain)
    "nucleus_h_skew",  # its skewness (a few dark chromatin clumps -> positive)
    "nucleus_h_contrast",  # sd of the fine-scale (high-pass) hematoxylin inside the nucleus: chromatin texture
    "nucleus_h_gradient",  # mean hematoxylin gradient magnitude inside the nucleus: edges / granularity
)

# Gaussian scale (px) separating fine chromatin texture from the nucleus' overall stain.
TEXTURE_SIGMA = 1.5


def _solidity(mask: np.ndarray) -> float:
    """Pixels / pixels of the convex hull of the pixel centres (a digital disc scores ~1; skimage's own solidity
    takes the hull of the pixel corners, which scores a disc of radius 4 px ~0.8 and so mixes size into shape)."""
    from skimage.morphology import convex_hull_image

    n = int(mask.sum())
    if n < 3 or min(mask.shape) < 2:
        return 1.0
    try:
        hull = convex_hull_image(mask, offset_coordinates=False)
    except Exception:  # colinear pixels: Qhull cannot build a 2-D hull
        return 1.0
    return float(n / max(int(hull.sum()), n))


def _label_max(labels, block_rows: int) -> int:
    m = 0
    for r0 in range(0, int(labels.shape[0]), block_rows):
        m = max(m, int(np.asarray(labels[r0 : r0 + block_rows]).max(initial=0)))
    return m


def nucleus_features(
    labels,
    image,
    label_ids=None,
    *,
    block_rows: int | None = None,
    margin: int = 256,
) -> pd.DataFrame:
    """Shape, stain and texture features of every nucleus of a label image.

    Parameters
    ----------
    labels
        (H, W) integer label image (0 = background); numpy, zarr or any array-like sliceable by rows.
    image
        (H, W, 3|4) RGB H&E of the same (H, W) (uint8 / uint16 / float in [0, 1]); read by row bands.
    label_ids
        Labels to report, in this order (default: every label present, ascending). Labels absent from the
        image get a row of NaN.
    block_rows
        Rows per band (default ~2 M pixels per band; the whole image when it is smaller).
    margin
        Extra rows read above / below a band: must exceed the height of any nucleus (and the filters' reach).

    Returns
    -------
    pandas.DataFrame
        Index ``label``; columns :data:`FEATURE_COLUMNS` (float).

    Raises
    ------
    InputError
        ``labels`` is not 2-D, or ``image`` is not RGB of the labels' (H, W).
    """
    from scipy import ndimage as ndi
    from skimage.measure import regionprops_table

    lshape = tuple(int(s) for s in labels.shape)
    if len(lshape) != 2:
        raise InputError(f"labels: shape {lshape}; expected a 2-D (H, W) label image")
    H, W = lshape
    ishape = tuple(int(s) for s in image.shape)
    if len(ishape) != 3 or ishape[:2] != (H, W) or ishape[2] not in (3, 4):
        raise InputError(f"image: shape {ishape}; expected an RGB image of the labels' (H, W) = ({H}, {W}), 3 channels")
    block_rows = int(block_rows or max(64, 2_000_000 // max(W, 1)))
    m = _label_max(labels, block_rows) + 1
    acc = np.zeros((12, m))  # n, h, h^2, h^3, hp^2, hp, grad, x, y, xx, yy, xy
    shape_parts = []
    for r0 in range(0, H, block_rows):
        r1 = min(H, r0 + block_rows)
        e0, e1 = max(0, r0 - margin), min(H, r1 + margin)
        lab = np.asarray(labels[e0:e1]).astype(np.int64, copy=False)
        h = hematoxylin(np.asarray(image[e0:e1]))
        hp = h - ndi.gaussian_filter(h, TEXTURE_SIGMA)
        hs = ndi.gaussian_filter(h, 0.7)
        grad = np.hypot(ndi.sobel(hs, 0), ndi.sobel(hs, 1)) / 8.0
        core = slice(r0 - e0, r1 - e0)
        lc = lab[core].ravel()
        fg = lc > 0
        lc = lc[fg]
        hv = h[core].ravel()[fg].astype(np.float64)
        pv = hp[core].ravel()[fg].astype(np.float64)
        gv = grad[core].ravel()[fg].astype(np.float64)
        yy, xx = np.divmod(np.flatnonzero(fg), W)  # row within the core, column
        yy = yy.astype(np.float64) + r0  # global row: sums add up across bands
        xx = xx.astype(np.float64)
        for i, v in enumerate((None, hv, hv * hv, hv**3, pv * pv, pv, gv, xx, yy, xx * xx, yy * yy, xx * yy)):
            acc[i] += np.bincount(lc, weights=v, minlength=m)[:m]
        # shape: each label measured in the band whose core holds its top row
        props = regionprops_table(lab, properties=("label", "bbox"), extra_properties=(_solidity,))
        top = props["bbox-0"] + e0
        keep = (top >= r0) & (top < r1)
        shape_parts.append(
            pd.DataFrame(
                {
                    "label": props["label"][keep],
                    "solidity": props["_solidity"][keep],
                }
            )
        )
    shp = pd.concat(shape_parts).set_index("label")
    n = acc[0]
    ids = np.flatnonzero(n[1:] > 0) + 1 if label_ids is None else np.asarray(label_ids, dtype=np.int64)
    ok = (ids > 0) & (ids < m)
    ii = np.where(ok, ids, 0)
    nn = np.where(ok, n[ii], 0.0)
    sh = shp.reindex(ids)
    with np.errstate(invalid="ignore", divide="ignore"):
        # ellipse of the same second moments, from the per-label coordinate sums
        mx, my = acc[7, ii] / nn, acc[8, ii] / nn
        cxx = acc[9, ii] / nn - mx**2 + 1 / 12  # + a pixel's own extent (a 1-px nucleus is a unit square)
        cyy = acc[10, ii] / nn - my**2 + 1 / 12
        cxy = acc[11, ii] / nn - mx * my
        tr, det = cxx + cyy, cxx * cyy - cxy**2
        disc = np.sqrt(np.maximum(tr**2 / 4 - det, 0))
        l1, l2 = tr / 2 + disc, np.maximum(tr / 2 - disc, 0)
        q = np.clip(l2 / l1, 0, 1)
        mean = acc[1, ii] / nn
        var = np.maximum(acc[2, ii] / nn - mean**2, 0)
        sd = np.sqrt(var)
        m3 = acc[3, ii] / nn - 3 * mean * acc[2, ii] / nn + 2 * mean**3
        skew = np.where(sd > 1e-9, m3 / np.maximum(sd, 1e-9) ** 3, 0.0)
        pm = acc[5, ii] / nn
        contrast = np.sqrt(np.maximum(acc[4, ii] / nn - pm**2, 0))
        out = pd.DataFrame(
            {
                "nucleus_area": nn,
                "nucleus_eccentricity": np.sqrt(1 - q),
                "nucleus_axis_ratio": np.sqrt(q),
                "nucleus_solidity": sh["solidity"].to_numpy(float),
                "nucleus_h_mean": mean,
                "nucleus_h_sd": sd,
                "nucleus_h_skew": skew,
                "nucleus_h_contrast": contrast,
                "nucleus_h_gradient": acc[6, ii] / nn,
            },
            index=pd.Index(ids, name="label"),
        )
    out.loc[nn <= 0, :] = np.nan
    return out[list(FEATURE_COLUMNS)]
