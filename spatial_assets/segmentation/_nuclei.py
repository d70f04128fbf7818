"""Nuclei segmentation of an H&E image (StarDist or watershed) into a label image and a nuclei table."""

from __future__ import annotations

import contextlib
import io
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ..io._readers import InputError
from ..params import SegmentationParams
from ..progress import Progress
from ._channels import ChannelView, _normalizer, _percentiles, _pick_channel, _stride_for, as_rgb_image
from ._models import ModelUnavailableError, load_stardist_model

# Above this many pixels StarDist predicts block-wise (predict_instances_big) and stats are computed block-wise.
BIG_PIXELS = 25_000_000


@dataclass
class SegmentationResult:
    """Label image (0 = background; numpy int32 or the given zarr array), nuclei table, and what ran.

    Attributes
    ----------
    labels : numpy.ndarray or zarr.Array
        (H, W) label image at full resolution, 0 = background.
    nuclei : pandas.DataFrame
        One row per nucleus: label, x, y (centroid) and area (full-resolution pixels).
    info : dict
        What ran: method, model, channel, thresholds, number of nuclei, seconds, ...
    """

    labels: Any
    nuclei: pd.DataFrame  # columns label, x, y, area (full-resolution pixels)
    info: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# nuclei table from labels (block-wise bincount)
# ---------------------------------------------------------------------------------------------------------------
def nuclei_table(labels, n_labels: int | None = None, block_rows: int | None = None) -> pd.DataFrame:
    """label, x, y (centroid, full-res px; pixel centres at integer coordinates) and area (px) of every label > 0.

    Reads ``labels`` (numpy or zarr) in row bands and accumulates ``np.bincount`` sums: linear memory.

    Parameters
    ----------
    labels : numpy.ndarray or zarr.Array
        (H, W) integer label image, 0 = background.
    n_labels : int or None
        Largest label; read from the image when None.
    block_rows : int or None
        Rows per band read; about 2 million pixels per band when None.

    Returns
    -------
    pandas.DataFrame
        Columns label, x, y, area, one row per label present, in label order.
    """
    H, W = int(labels.shape[0]), int(labels.shape[1])
    block_rows = block_rows or max(16, 2_000_000 // max(W, 1))  # ~2 M pixels per band
    if n_labels is None:
        n_labels = 0
        for r0 in range(0, H, block_rows):
            n_labels = max(n_labels, int(np.asarray(labels[r0 : r0 + block_rows]).max(initial=0)))
    m = int(n_labels) + 1
    cnt, sx, sy = np.zeros(m), np.zeros(m), np.zeros(m)
    xs = np.arange(W, dtype=np.float64)
    for r0 in range(0, H, block_rows):
        band = np.asarray(labels[r0 : r0 + block_rows])
        lab = band.ravel().astype(np.int64)
        rows = np.repeat(np.arange(r0, r0 + band.shape[0], dtype=np.float64), W)
        cols = np.tile(xs, band.shape[0])
        cnt += np.bincount(lab, minlength=m)[:m]
        sx += np.bincount(lab, weights=cols, minlength=m)[:m]
        sy += np.bincount(lab, weights=rows, minlength=m)[:m]
    ids = np.flatnonzero(cnt[1:] > 0) + 1
    return pd.DataFrame(
        {
            "label": ids.astype(np.int64),
            "x": sx[ids] / cnt[ids],
            "y": sy[ids] / cnt[ids],
            "area": cnt[ids].astype(np.int64),
        }
    )


# ---------------------------------------------------------------------------------------------------------------
# segmentation
# ---------------------------------------------------------------------------------------------------------------
def segment_nuclei(
    image,
    params: SegmentationParams | None = None,
    *,
    labels_out=None,
    big_pixels: int = BIG_PIXELS,
    block_size: int = 4096,
    min_overlap: int = 128,
    watershed_sigma: float = 1.0,
    watershed_min_area: int = 8,
    log: Callable[[str], None] | None = None,
) -> SegmentationResult:
    """Segment nuclei in an RGB H&E image (path, numpy array or array-like (H, W, 3)).

    ``params.scale`` rescales the image for prediction (both methods); labels come back at full resolution.
    ``labels_out``: optional pre-allocated (H, W) integer array (e.g. ``zarr.Array``) to write labels into
    block-wise (for whole slides); otherwise labels come back as a numpy int32 array. Images larger than
    ``big_pixels`` are predicted in blocks of ``block_size`` model pixels overlapping by ``min_overlap``
    (larger than any nucleus). ``watershed_sigma`` (Gaussian smoothing, px) and ``watershed_min_area`` (px,
    smaller objects removed) apply to the watershed method only.

    Parameters
    ----------
    image : str or os.PathLike or array-like
        The H&E image: a file or an RGB(A) array-like (H, W, 3|4).
    params : SegmentationParams or None
        Method, model, channel, thresholds, scale, ...; the defaults when None.
    labels_out : array-like or None
        Pre-allocated (H, W) integer array to write the labels into.
    big_pixels : int
        Images with more pixels (or any image with ``labels_out``) are predicted block-wise by StarDist.
    block_size : int
        Block size (model pixels) of block-wise prediction.
    min_overlap : int
        Overlap of the blocks (px), larger than any nucleus.
    watershed_sigma : float
        Gaussian smoothing (px) before the watershed.
    watershed_min_area : int
        Watershed objects smaller than this (px) are removed.
    log : callable or None
        Receives StarDist's progress lines (:class:`~spatial_assets.progress.Progress`: tiles of one image, or
        blocks of a block-wise prediction), at most every 10 s and at the end; None = silent.

    Returns
    -------
    SegmentationResult
        The label image, the nuclei table and what ran.

    Raises
    ------
    InputError
        If the image or ``labels_out`` is invalid, the channel does not suit the method or model, or the
        channel is constant.
    ModelUnavailableError
        If the StarDist model cannot be obtained and ``params.fallback`` is not ``'watershed'``.
    """
    params = params or SegmentationParams()
    img = as_rgb_image(image)
    H, W = int(img.shape[0]), int(img.shape[1])
    if labels_out is not None and tuple(labels_out.shape[:2]) != (H, W):
        raise InputError(f"labels_out: shape {tuple(labels_out.shape)}; expected the image's (H, W) = ({H}, {W})")
    t0 = time.time()
    info: dict[str, Any] = {
        "requested_method": params.method,
        "image_shape": [H, W, int(img.shape[2])],
        "prob_thresh": params.prob_thresh,
        "nms_thresh": params.nms_thresh,
        "scale": params.scale,
        "norm_percentiles": list(params.norm_percentiles),
    }
    method = params.method
    model = None
    if method == "stardist":
        try:
            model, minfo = load_stardist_model(params.model)
            info.update(minfo)
        except ModelUnavailableError as e:
            if params.fallback != "watershed":
                raise
            method = "watershed"
            info["fallback"] = f"StarDist model '{params.model}' unavailable, fell back to watershed: {e}"
    info["method"] = method
    if method == "stardist":
        labels, n = _run_stardist(img, model, params, info, labels_out, big_pixels, block_size, min_overlap, log)
    else:
        labels, n = _run_watershed(img, params, info, labels_out, watershed_sigma, watershed_min_area)
    nuclei = nuclei_table(labels, n_labels=n)
    info["n_nuclei"] = int(len(nuclei))
    info["seconds"] = round(time.time() - t0, 2)
    return SegmentationResult(labels=labels, nuclei=nuclei, info=info)


class _TileProgress:
    """A stand-in for tqdm that StarDist takes as ``show_tile_progress`` (it wraps the tile iterator of a tiled
    ``predict_instances``): logs the tiles through :class:`~spatial_assets.progress.Progress`."""

    def __init__(self, log):
        self.log = log

    def __call__(self, iterable, disable: bool = False, total: int | None = None):
        tiles = Progress(int(total or 0), "StarDist tiles", self.log)
        for item in iterable:
            yield item
            tiles.update()


class _BlockReads:
    """The image as ``predict_instances_big`` reads it, one slice per block, predicted before the next is read:
    each read after the first means one block done; :meth:`finish` counts the last."""

    def __init__(self, view, progress: Progress):
        self._view, self._progress, self._reads = view, progress, 0
        self.shape, self.ndim, self.dtype = view.shape, len(view.shape), getattr(view, "dtype", None)

    def __getitem__(self, key):
        if self._reads:
            self._progress.update()
        self._reads += 1
        return self._view[key]

    def finish(self) -> None:
        if self._reads:
            self._progress.update()


def _run_stardist(img, model, params, info, labels_out, big_pixels, block_size, min_overlap, log=None):
    channel = _pick_channel(params, int(model.config.n_channel_in))
    view = ChannelView(img, channel)
    lo, hi = _percentiles(view, params.norm_percentiles)
    if not hi > lo:
        raise InputError(
            f"image: the {channel} channel is constant ({lo:g}) at percentiles "
            f"{list(params.norm_percentiles)}; expected an H&E image with nuclei"
        )
    info.update(channel=channel, norm_range=[lo, hi])
    th = getattr(model, "thresholds", None)
    info["prob_thresh_used"] = float(params.prob_thresh if params.prob_thresh is not None else th.prob)
    info["nms_thresh_used"] = float(params.nms_thresh if params.nms_thresh is not None else th.nms)
    normalizer = _normalizer(lo, hi)
    H, W = view.shape[:2]
    axes = "YXC" if channel == "rgb" else "YX"
    scale = None if params.scale == 1 else params.scale
    tile = params.tile_size
    kw = dict(
        normalizer=normalizer,
        prob_thresh=info["prob_thresh_used"],
        nms_thresh=info["nms_thresh_used"],
        scale=scale,
        show_tile_progress=False if log is None else _TileProgress(log),
        predict_kwargs={"verbose": 0},
    )
    quiet = io.StringIO()
    s = params.scale
    g = max(model._axes_div_by("YX"))
    ov = int(np.ceil(min_overlap / s / g)) * g
    ctx = int(np.ceil(max(model._axes_tile_overlap("YX")) / s / g)) * g
    bs = max(256, int(block_size / s), ov + 2 * ctx + 4 * g) // g * g
    bs_yx = [min(bs, n // g * g) for n in (H, W)]  # predict_instances_big needs block <= image along each axis
    direct = min(bs_yx) <= ov + 2 * ctx or (H * W <= big_pixels and labels_out is None)
    if direct:
        nt = (max(1, int(np.ceil(H * s / tile))), max(1, int(np.ceil(W * s / tile))))
        x = np.asarray(view[:, :])
        with contextlib.redirect_stdout(quiet):
            labels, polys = model.predict_instances(x, axes=axes, n_tiles=nt + ((1,) if channel == "rgb" else ()), **kw)
        del x
        info["prediction"] = f"predict_instances, n_tiles {list(nt)}"
        labels = np.asarray(labels, dtype=np.int32)
        if labels_out is not None:
            for r0 in range(0, H, 2048):
                labels_out[r0 : r0 + 2048] = labels[r0 : r0 + 2048]
            labels = labels_out
        return labels, int(len(polys["prob"]))
    nt_block = max(1, int(np.ceil(max(bs_yx) * s / tile)))
    n_tiles = (nt_block, nt_block) + ((1,) if channel == "rgb" else ())
    bsz = tuple(bs_yx) + ((3,) if channel == "rgb" else ())
    ovz = (ov, ov, 0) if channel == "rgb" else ov
    ctz = (ctx, ctx, 0) if channel == "rgb" else ctx
    bs = bs_yx
    out = labels_out if labels_out is not None else None
    src = view
    if log is not None:
        from stardist.big import BlockND

        # the cover predict_instances_big makes (its sizes are already multiples of the model's grid)
        n_blocks = len(BlockND.cover(view.shape, axes, bsz, ovz, ctz, model._axes_div_by(axes)))
        src = _BlockReads(view, Progress(n_blocks, "StarDist blocks", log))
        kw["show_tile_progress"] = False  # per block: the blocks' line only
    with contextlib.redirect_stdout(quiet):
        labels, polys = model.predict_instances_big(
            src,
            axes=axes,
            block_size=bsz,
            min_overlap=ovz,
            context=ctz,
            labels_out=out,
            show_progress=False,
            n_tiles=n_tiles,
            **kw,
        )
    if isinstance(src, _BlockReads):
        src.finish()
    info["prediction"] = (
        f"predict_instances_big, block_size {bs}, min_overlap {ov}, context {ctx}, "
        f"n_tiles per block {list(n_tiles[:2])}"
    )
    if labels_out is None:
        labels = np.asarray(labels, dtype=np.int32)
    return labels, int(len(polys["prob"]))


def _run_watershed(img, params, info, labels_out, sigma, min_area):
    import squidpy as sq
    from scipy import ndimage as ndi
    from skimage.filters import threshold_otsu
    from skimage.morphology import remove_small_objects
    from skimage.segmentation import relabel_sequential

    channel = _pick_channel(params, None)
    view = ChannelView(img, channel)
    H, W = view.shape
    lo, hi = _percentiles(view, params.norm_percentiles)
    if not hi > lo:
        raise InputError(f"image: the {channel} channel is constant ({lo:g}); expected an H&E image with nuclei")
    # normalised, smoothed channel built band by band (float32, one copy); gray is inverted (nuclei are dark)
    arr = np.empty((H, W), np.float32)
    band, pad = 2048, int(np.ceil(4 * sigma)) + 1
    for r0 in range(0, H, band):
        a0, a1 = max(0, r0 - pad), min(H, r0 + band + pad)
        b = (view[a0:a1, :] - lo) / (hi - lo)
        if channel == "gray":
            b = 1.0 - b
        if sigma > 0:
            b = ndi.gaussian_filter(b, sigma)
        arr[r0 : min(H, r0 + band)] = b[r0 - a0 : r0 - a0 + min(band, H - r0)]
    s = _stride_for((H, W))
    thresh = float(threshold_otsu(arr[::s, ::s]))
    if params.scale != 1:  # squidpy's 5 x 5 peak footprint suits nuclei ~8-16 px: rescale like StarDist's scale
        from skimage.transform import rescale

        arr = rescale(arr, params.scale, order=1, anti_aliasing=params.scale < 1, preserve_range=True).astype(
            np.float32
        )
    ic = sq.im.ImageContainer(arr[:, :, None], layer="image")
    chunks = params.tile_size if H * W > BIG_PIXELS else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # squidpy's internal "'n_jobs' is not a valid key!" notices
        sq.im.segment(
            img=ic,
            layer="image",
            method="watershed",
            channel=0,
            thresh=thresh,
            geq=True,
            chunks=chunks,
            layer_added="segmented",
        )
    lab = np.asarray(ic["segmented"].values)[:, :, 0, 0].astype(np.int64)
    del ic, arr
    if params.scale != 1:  # labels back to full resolution (nearest neighbour)
        rows = np.minimum((np.arange(H) * params.scale).astype(np.int64), lab.shape[0] - 1)
        cols = np.minimum((np.arange(W) * params.scale).astype(np.int64), lab.shape[1] - 1)
        lab = lab[rows[:, None], cols[None, :]]
    if min_area > 0:
        lab = remove_small_objects(lab, max_size=min_area - 1)
    lab = relabel_sequential(lab)[0].astype(np.int32)
    n = int(lab.max(initial=0))
    info.update(
        channel=channel,
        norm_range=[lo, hi],
        otsu_threshold=thresh,
        watershed_sigma=sigma,
        watershed_min_area=min_area,
        prediction=f"squidpy watershed{' chunks ' + str(chunks) if chunks else ''}",
    )
    if labels_out is not None:
        for r0 in range(0, H, 2048):
            labels_out[r0 : r0 + 2048] = lab[r0 : r0 + 2048]
        return labels_out, n
    return lab, n
