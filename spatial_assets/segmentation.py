"""SpatialScope step 1: nuclei segmentation of the H&E image and assignment of nuclei to spots.

Methods
-------
* ``stardist``: StarDist2D (Schmidt et al. 2018). ``params.model`` is a StarDist registry name (default
  ``2D_versatile_he``, downloaded once and cached by StarDist; needs the internet the first time) or a local StarDist
  model folder (``config.json`` + ``*.h5`` weights). A 3-channel model sees the RGB image, a 1-channel model the
  hematoxylin channel of colour deconvolution (``skimage.color.rgb2hed``) or the luminance. Input normalised as in
  StarDist's examples (percentiles 1 / 99.8, jointly over channels). ``params.scale`` rescales for prediction.
* ``watershed``: squidpy's ``im.segment(method='watershed')`` on the (smoothed, normalised) hematoxylin channel,
  with one Otsu threshold for the whole image (squidpy would otherwise pick one per chunk); needs no weights.
  ``channel: gray`` uses the inverted luminance there (nuclei must be bright); for a 1-channel StarDist model
  ``gray`` is the plain luminance (``skimage.color.rgb2gray``).

Large images are never loaded twice: any array-like (numpy, ``zarr.Array``, tifffile memmap) is read block-wise;
the hematoxylin channel is computed per block; above ``big_pixels`` pixels StarDist runs ``predict_instances_big``
and writes labels block-wise into a numpy array or a given ``zarr`` array (``labels_out``). The nuclei table is
computed from the labels by block-wise ``np.bincount`` (linear memory).

No dagster import here.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from . import geometry
from .params import SegmentationParams
from .readers import InputError, read_image, scalefactors, validate_spatial
from .readers import check_image_covers_spots as _check_cover

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLED_MODEL = REPO_ROOT / "spatial_assets" / "models" / "stardist_nuclei"
# Above this many pixels StarDist predicts block-wise (predict_instances_big) and stats are computed block-wise.
BIG_PIXELS = 25_000_000
# Pixels read to estimate normalisation percentiles / the Otsu threshold of a large image.
SAMPLE_PIXELS = 4_000_000


class ModelUnavailableError(InputError):
    """The configured StarDist model cannot be obtained (offline registry, missing or invalid folder)."""


@dataclass
class SegmentationResult:
    """Label image (0 = background; numpy int32 or the given zarr array), nuclei table, and what ran."""

    labels: Any
    nuclei: pd.DataFrame  # columns label, x, y, area (full-resolution pixels)
    info: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------------------------
_GUIDANCE = ("Configure a local StarDist model folder (parameters.segmentation.model: path/to/folder, e.g. the "
             f"bundled '{BUNDLED_MODEL.relative_to(REPO_ROOT)}'), or use parameters.segmentation.method: watershed, "
             "or opt in to a fallback with parameters.segmentation.fallback: watershed.")
_MODEL_CACHE: dict[tuple, tuple[Any, dict]] = {}


def _registry_names() -> tuple[set[str], dict[str, str]]:
    from stardist.models import StarDist2D
    from csbdeep.models.pretrained import get_registered_models

    keys, aliases = get_registered_models(StarDist2D)
    alias_of = {a: k for k, al in aliases.items() for a in al}
    return set(keys), alias_of


def _resolve_folder(spec: str) -> Path | None:
    p = Path(spec).expanduser()
    for cand in (p, REPO_ROOT / p) if not p.is_absolute() else (p,):
        if cand.exists():
            return cand.resolve()
    return None


def validate_model_folder(folder: str | os.PathLike) -> dict:
    """Check a StarDist model folder (config.json of a StarDist2D model + ``*.h5`` weights); return its config."""
    import json

    folder = Path(folder)
    if not folder.is_dir():
        raise ModelUnavailableError(f"segmentation model folder {folder}: not a directory. {_GUIDANCE}")
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise ModelUnavailableError(f"segmentation model folder {folder}: not a StarDist model (no config.json "
                                    f"found; expected config.json and weights_best.h5). {_GUIDANCE}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except Exception as e:
        raise ModelUnavailableError(f"segmentation model folder {folder}: config.json is not valid JSON ({e}). "
                                    f"{_GUIDANCE}") from None
    missing = [k for k in ("n_rays", "n_channel_in", "grid") if k not in cfg]
    if missing or cfg.get("n_dim", 2) != 2:
        raise ModelUnavailableError(f"segmentation model folder {folder}: config.json is not a StarDist2D config "
                                    f"(missing {missing}, n_dim {cfg.get('n_dim')}). {_GUIDANCE}")
    if not (list(folder.glob("*.h5")) or list(folder.glob("*.hdf5"))):
        raise ModelUnavailableError(f"segmentation model folder {folder}: not a StarDist model (no weights: expected "
                                    f"weights_best.h5 next to config.json). {_GUIDANCE}")
    return cfg


def load_stardist_model(spec: str) -> tuple[Any, dict]:
    """Load a StarDist2D model from a registry name or a local folder; returns (model, info). Cached per spec.

    Raises :class:`ModelUnavailableError` saying why and how to configure another model; never falls back.
    """
    folder = _resolve_folder(spec)
    keys, alias_of = _registry_names()
    cfg = folder / "config.json" if folder else None
    key = (str(folder), cfg.stat().st_mtime if cfg.exists() else None) if cfg else ("registry", spec)
    if key in _MODEL_CACHE:
        return _MODEL_CACHE[key]
    from stardist.models import StarDist2D

    quiet = io.StringIO()
    if folder is not None:
        validate_model_folder(folder)
        try:
            with contextlib.redirect_stdout(quiet):
                model = StarDist2D(None, name=folder.name, basedir=str(folder.parent))
        except Exception as e:
            raise ModelUnavailableError(f"segmentation model folder {folder}: could not be loaded as a StarDist2D "
                                        f"model ({type(e).__name__}: {e}). {_GUIDANCE}") from None
        model.basedir = None  # read-only: never write thresholds into the model folder
        info = {"model": spec, "model_source": "folder", "model_path": str(folder)}
    elif spec in keys or spec in alias_of:
        name = alias_of.get(spec, spec)
        cache_dir = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models" / "StarDist2D" / name
        existed = cache_dir.exists()
        try:
            with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
                model = StarDist2D.from_pretrained(name)
            if model is None:
                raise RuntimeError("not found in the registry")
        except Exception as e:
            if not existed and cache_dir.is_dir() and not any(cache_dir.iterdir()):
                shutil.rmtree(cache_dir, ignore_errors=True)  # failed download leaves an empty folder behind
            raise ModelUnavailableError(
                f"segmentation model '{spec}': could not be obtained from StarDist's registry ({type(e).__name__}: "
                f"{e}); it is downloaded once into ~/.keras/models/StarDist2D and needs the internet. "
                f"{_GUIDANCE}") from None
        info = {"model": spec, "model_source": "registry", "model_path": str(cache_dir)}
    else:
        raise ModelUnavailableError(
            f"segmentation model '{spec}': neither a StarDist registry name (known: {sorted(keys)}) nor an existing "
            f"model folder (looked in {Path.cwd()} and {REPO_ROOT}). {_GUIDANCE}")
    import stardist

    info.update(n_channel_in=int(model.config.n_channel_in), n_rays=int(model.config.n_rays),
                grid=list(model.config.grid), stardist_version=stardist.__version__)
    _MODEL_CACHE[key] = (model, info)
    return model, info


# ---------------------------------------------------------------------------------------------------------------
# image access
# ---------------------------------------------------------------------------------------------------------------
def _hed_h_column() -> np.ndarray:
    from skimage.color import hed_from_rgb

    return np.asarray(hed_from_rgb[:, 0], dtype=np.float32)


def hematoxylin(rgb: np.ndarray) -> np.ndarray:
    """Hematoxylin channel of an RGB block, float32; equals ``skimage.color.rgb2hed(rgb)[..., 0]``.

    Computes only the H column of the deconvolution (a third of rgb2hed's float64 memory).
    """
    rgb = np.asarray(rgb)
    if np.issubdtype(rgb.dtype, np.integer):
        x = rgb[..., :3].astype(np.float32) / np.float32(np.iinfo(rgb.dtype).max)
    else:
        x = rgb[..., :3].astype(np.float32)
    np.maximum(x, 1e-6, out=x)
    od = np.log(x) / np.float32(np.log(1e-6))
    h = od @ _hed_h_column()
    return np.maximum(h, 0, out=h)


def _luminance(rgb: np.ndarray) -> np.ndarray:
    from skimage.color import rgb2gray

    return rgb2gray(np.asarray(rgb)[..., :3]).astype(np.float32)


class ChannelView:
    """Read-only, lazy 2-D (or RGB) view of an RGB array-like; blocks are transformed when sliced.

    ``mode``: 'hematoxylin', 'gray' (2-D float32) or 'rgb' (the raw (H, W, 3) pixels). Supports the basic
    slicing StarDist's block reader and strided sub-sampling use.
    """

    def __init__(self, rgb, mode: str):
        self.rgb, self.mode = rgb, mode
        H, W = int(rgb.shape[0]), int(rgb.shape[1])
        self.shape = (H, W, 3) if mode == "rgb" else (H, W)
        self.ndim = len(self.shape)
        self.dtype = np.dtype(rgb.dtype) if mode == "rgb" else np.dtype(np.float32)

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        key = key + (slice(None),) * (2 - len(key[:2]))
        ys, xs, rest = key[0], key[1], key[2:]
        block = np.asarray(self.rgb[ys, xs, :3])
        if self.mode == "rgb":
            out = block
        elif self.mode == "hematoxylin":
            out = hematoxylin(block)
        else:
            out = _luminance(block)
        return out[(Ellipsis,) + tuple(rest)] if rest else out

    def __array__(self, dtype=None, copy=None):
        a = self[:, :]
        return a.astype(dtype) if dtype is not None else a


def as_rgb_image(image, name: str = "image"):
    """Validate an H&E image (path, numpy array or array-like (H, W, 3|4)); returns an array-like, never a copy."""
    if isinstance(image, (str, os.PathLike)):
        return read_image(image, lazy=True, require_rgb=True)
    shape = getattr(image, "shape", None)
    if shape is None or not hasattr(image, "__getitem__"):
        raise InputError(f"{name}: expected an RGB image array (H, W, 3) or a path, found {type(image).__name__}")
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or shape[2] not in (3, 4):
        raise InputError(f"{name}: image has shape {shape}; expected an RGB image of shape (H, W, 3)")
    if shape[0] < 16 or shape[1] < 16:
        raise InputError(f"{name}: image of shape {shape} is too small to segment (expected at least 16 x 16 px)")
    dt = np.dtype(getattr(image, "dtype", np.uint8))
    if not (np.issubdtype(dt, np.integer) or np.issubdtype(dt, np.floating)):
        raise InputError(f"{name}: image dtype {dt}; expected uint8 / uint16 or float RGB values")
    return image


def _stride_for(shape, n_target: int = SAMPLE_PIXELS) -> int:
    return max(1, int(np.ceil(np.sqrt(shape[0] * shape[1] / n_target))))


def _percentiles(view: ChannelView, pcts: tuple[float, float]) -> tuple[float, float]:
    """Normalisation percentiles over the whole image (jointly over channels), from a strided sample if huge."""
    s = _stride_for(view.shape)
    sample = view[::s, ::s]
    lo, hi = np.percentile(sample, pcts)
    return float(lo), float(hi)


def _normalizer(lo: float, hi: float):
    from csbdeep.data import Normalizer
    from csbdeep.utils import normalize_mi_ma

    class FixedPercentileNormalizer(Normalizer):
        """(x - lo) / (hi - lo) with lo / hi fixed for the whole image (block-wise prediction stays consistent)."""

        def before(self, x, axes):
            return normalize_mi_ma(x, np.float32(lo), np.float32(hi), dtype=np.float32)

        def after(self, *args, **kwargs):  # pragma: no cover - never used (do_after is False)
            raise NotImplementedError

        @property
        def do_after(self):
            return False

    return FixedPercentileNormalizer()


def _pick_channel(params: SegmentationParams, n_channel_in: int | None) -> str:
    ch = params.channel
    if n_channel_in is None:  # watershed
        if ch in ("auto", "hematoxylin"):
            return "hematoxylin"
        if ch == "gray":
            return "gray"
        raise InputError("parameters.segmentation.channel: 'rgb' cannot be used with method watershed; expected "
                         "'auto', 'hematoxylin' or 'gray'")
    if n_channel_in == 3:
        if ch not in ("auto", "rgb"):
            raise InputError(f"parameters.segmentation.channel: '{ch}' given, but the model takes 3 channels; "
                             "expected 'auto' or 'rgb'")
        return "rgb"
    if n_channel_in == 1:
        if ch == "rgb":
            raise InputError("parameters.segmentation.channel: 'rgb' given, but the model takes 1 channel; expected "
                             "'auto' / 'hematoxylin' (rgb2hed) or 'gray'")
        return "hematoxylin" if ch == "auto" else ch
    raise InputError(f"segmentation model: n_channel_in = {n_channel_in}; expected 1 (nuclear) or 3 (H&E RGB)")


# ---------------------------------------------------------------------------------------------------------------
# nuclei table from labels (block-wise bincount)
# ---------------------------------------------------------------------------------------------------------------
def nuclei_table(labels, n_labels: int | None = None, block_rows: int | None = None) -> pd.DataFrame:
    """label, x, y (centroid, full-res px; pixel centres at integer coordinates) and area (px) of every label > 0.

    Reads ``labels`` (numpy or zarr) in row bands and accumulates ``np.bincount`` sums: linear memory.
    """
    H, W = int(labels.shape[0]), int(labels.shape[1])
    block_rows = block_rows or max(16, 2_000_000 // max(W, 1))  # ~2 M pixels per band
    if n_labels is None:
        n_labels = 0
        for r0 in range(0, H, block_rows):
            n_labels = max(n_labels, int(np.asarray(labels[r0:r0 + block_rows]).max(initial=0)))
    m = int(n_labels) + 1
    cnt, sx, sy = np.zeros(m), np.zeros(m), np.zeros(m)
    xs = np.arange(W, dtype=np.float64)
    for r0 in range(0, H, block_rows):
        band = np.asarray(labels[r0:r0 + block_rows])
        lab = band.ravel().astype(np.int64)
        rows = np.repeat(np.arange(r0, r0 + band.shape[0], dtype=np.float64), W)
        cols = np.tile(xs, band.shape[0])
        cnt += np.bincount(lab, minlength=m)[:m]
        sx += np.bincount(lab, weights=cols, minlength=m)[:m]
        sy += np.bincount(lab, weights=rows, minlength=m)[:m]
    ids = np.flatnonzero(cnt[1:] > 0) + 1
    return pd.DataFrame({"label": ids.astype(np.int64), "x": sx[ids] / cnt[ids], "y": sy[ids] / cnt[ids],
                         "area": cnt[ids].astype(np.int64)})


# ---------------------------------------------------------------------------------------------------------------
# segmentation
# ---------------------------------------------------------------------------------------------------------------
def segment_nuclei(image, params: SegmentationParams | None = None, *, labels_out=None,
                   big_pixels: int = BIG_PIXELS, block_size: int = 4096, min_overlap: int = 128,
                   watershed_sigma: float = 1.0, watershed_min_area: int = 8) -> SegmentationResult:
    """Segment nuclei in an RGB H&E image (path, numpy array or array-like (H, W, 3)).

    ``params.scale`` rescales the image for prediction (both methods); labels come back at full resolution.
    ``labels_out``: optional pre-allocated (H, W) integer array (e.g. ``zarr.Array``) to write labels into
    block-wise (for whole slides); otherwise labels come back as a numpy int32 array. Images larger than
    ``big_pixels`` are predicted in blocks of ``block_size`` model pixels overlapping by ``min_overlap``
    (larger than any nucleus). ``watershed_sigma`` (Gaussian smoothing, px) and ``watershed_min_area`` (px,
    smaller objects removed) apply to the watershed method only.
    """
    params = params or SegmentationParams()
    img = as_rgb_image(image)
    H, W = int(img.shape[0]), int(img.shape[1])
    if labels_out is not None and tuple(labels_out.shape[:2]) != (H, W):
        raise InputError(f"labels_out: shape {tuple(labels_out.shape)}; expected the image's (H, W) = ({H}, {W})")
    t0 = time.time()
    info: dict[str, Any] = {"requested_method": params.method, "image_shape": [H, W, int(img.shape[2])],
                            "prob_thresh": params.prob_thresh, "nms_thresh": params.nms_thresh,
                            "scale": params.scale, "norm_percentiles": list(params.norm_percentiles)}
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
        labels, n = _run_stardist(img, model, params, info, labels_out, big_pixels, block_size, min_overlap)
    else:
        labels, n = _run_watershed(img, params, info, labels_out, watershed_sigma, watershed_min_area)
    nuclei = nuclei_table(labels, n_labels=n)
    info["n_nuclei"] = int(len(nuclei))
    info["seconds"] = round(time.time() - t0, 2)
    return SegmentationResult(labels=labels, nuclei=nuclei, info=info)


def _run_stardist(img, model, params, info, labels_out, big_pixels, block_size, min_overlap):
    channel = _pick_channel(params, int(model.config.n_channel_in))
    view = ChannelView(img, channel)
    lo, hi = _percentiles(view, params.norm_percentiles)
    if not hi > lo:
        raise InputError(f"image: the {channel} channel is constant ({lo:g}) at percentiles "
                         f"{list(params.norm_percentiles)}; expected an H&E image with nuclei")
    info.update(channel=channel, norm_range=[lo, hi])
    normalizer = _normalizer(lo, hi)
    H, W = view.shape[:2]
    axes = "YXC" if channel == "rgb" else "YX"
    scale = None if params.scale == 1 else params.scale
    tile = params.tile_size
    kw = dict(normalizer=normalizer, prob_thresh=params.prob_thresh, nms_thresh=params.nms_thresh, scale=scale,
              show_tile_progress=False, predict_kwargs={"verbose": 0})
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
            labels, polys = model.predict_instances(x, axes=axes, n_tiles=nt + ((1,) if channel == "rgb" else ()),
                                                    **kw)
        del x
        info["prediction"] = f"predict_instances, n_tiles {list(nt)}"
        labels = np.asarray(labels, dtype=np.int32)
        if labels_out is not None:
            for r0 in range(0, H, 2048):
                labels_out[r0:r0 + 2048] = labels[r0:r0 + 2048]
            labels = labels_out
        return labels, int(len(polys["prob"]))
    nt_block = max(1, int(np.ceil(max(bs_yx) * s / tile)))
    n_tiles = (nt_block, nt_block) + ((1,) if channel == "rgb" else ())
    bsz = tuple(bs_yx) + ((3,) if channel == "rgb" else ())
    ovz = (ov, ov, 0) if channel == "rgb" else ov
    ctz = (ctx, ctx, 0) if channel == "rgb" else ctx
    bs = bs_yx
    out = labels_out if labels_out is not None else None
    with contextlib.redirect_stdout(quiet):
        labels, polys = model.predict_instances_big(view, axes=axes, block_size=bsz, min_overlap=ovz, context=ctz,
                                                    labels_out=out, show_progress=False, n_tiles=n_tiles, **kw)
    info["prediction"] = (f"predict_instances_big, block_size {bs}, min_overlap {ov}, context {ctx}, "
                          f"n_tiles per block {list(n_tiles[:2])}")
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
        arr[r0:min(H, r0 + band)] = b[r0 - a0: r0 - a0 + min(band, H - r0)]
    s = _stride_for((H, W))
    thresh = float(threshold_otsu(arr[::s, ::s]))
    if params.scale != 1:  # squidpy's 5 x 5 peak footprint suits nuclei ~8-16 px: rescale like StarDist's scale
        from skimage.transform import rescale

        arr = rescale(arr, params.scale, order=1, anti_aliasing=params.scale < 1, preserve_range=True
                      ).astype(np.float32)
    ic = sq.im.ImageContainer(arr[:, :, None], layer="image")
    chunks = params.tile_size if H * W > BIG_PIXELS else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # squidpy's internal "'n_jobs' is not a valid key!" notices
        sq.im.segment(img=ic, layer="image", method="watershed", channel=0, thresh=thresh, geq=True,
                      chunks=chunks, layer_added="segmented")
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
    info.update(channel=channel, norm_range=[lo, hi], otsu_threshold=thresh, watershed_sigma=sigma,
                watershed_min_area=min_area, prediction=f"squidpy watershed{' chunks ' + str(chunks) if chunks else ''}")
    if labels_out is not None:
        for r0 in range(0, H, 2048):
            labels_out[r0:r0 + 2048] = lab[r0:r0 + 2048]
        return labels_out, n
    return lab, n


# ---------------------------------------------------------------------------------------------------------------
# spots
# ---------------------------------------------------------------------------------------------------------------
def spot_diameter_px(slide: ad.AnnData, library_id: str | None = None, source: str = "slide") -> float:
    """``uns['spatial'][library_id]['scalefactors']['spot_diameter_fullres']`` with errors naming the field."""
    return scalefactors(slide, source, library_id)["spot_diameter_fullres"]


def check_image_covers_spots(image_shape, slide: ad.AnnData, source: str = "slide",
                             image_source: str = "image") -> None:
    """Every spot circle must lie inside the image; the error gives both extents."""
    validate_spatial(slide, source)
    spot_diameter_px(slide, source=source)
    _check_cover(tuple(image_shape[:2]), slide, source=source, image_source=image_source)


def assign_cells_to_spots(nuclei: pd.DataFrame, slide: ad.AnnData, params: SegmentationParams | None = None,
                          library_id: str | None = None, source: str = "slide"
                          ) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Assign nuclei to the spot whose circle contains the centroid; cap per spot; spot UMI QC.

    Returns ``cells`` (index ``<spot>_<k>``, k = 0.. by distance to the spot centre; columns x, y, area, label,
    spot, spot_distance, spot_n_cells) holding only cells kept (inside a QC-passing spot, within the cap);
    ``spots`` (index = slide obs names; n_cells_raw = nuclei inside, n_cells = kept, total_umi, qc_pass,
    qc_reason); and a summary of counts.
    """
    params = params or SegmentationParams()
    missing = [c for c in ("x", "y") if c not in nuclei.columns]
    if missing:
        raise InputError(f"nuclei table: columns {missing} missing; expected label, x, y, area")
    validate_spatial(slide, source)
    diam = spot_diameter_px(slide, library_id, source)
    spot_xy = np.asarray(slide.obsm["spatial"], dtype=float)[:, :2]
    names = np.asarray(slide.obs_names.astype(str))
    n_spots = len(names)
    X = slide.X
    umi = np.asarray(X.sum(1)).ravel().astype(float) if sp.issparse(X) else np.asarray(X).sum(1).astype(float)
    low, high = umi < params.min_umi, umi > params.max_umi
    qc_pass = ~(low | high)

    pts = nuclei[["x", "y"]].to_numpy(float)
    idx, dist = geometry.assign_to_spots(pts, spot_xy, diam / 2)
    inside = idx >= 0
    n_raw = np.bincount(idx[inside], minlength=n_spots)
    # rank within spot by distance to the centre (ties by label order): one lexsort, no per-spot loop
    cand = np.flatnonzero(inside)
    order = cand[np.lexsort((dist[cand], idx[cand]))]
    sidx = idx[order]
    first = np.searchsorted(sidx, sidx, side="left")
    rank = np.arange(len(order)) - first
    keep = (rank < params.max_cells_per_spot) & qc_pass[sidx]
    kept, kspot, krank = order[keep], sidx[keep], rank[keep]
    n_kept = np.bincount(kspot, minlength=n_spots)
    cell_ids = pd.Index(pd.Series(names[kspot]).str.cat(krank.astype(str), sep="_"), name="cell_id")
    cells = pd.DataFrame({
        "x": pts[kept, 0], "y": pts[kept, 1],
        "area": nuclei["area"].to_numpy()[kept] if "area" in nuclei else np.nan,
        "label": nuclei["label"].to_numpy()[kept] if "label" in nuclei else kept,
        "spot": names[kspot], "spot_distance": dist[kept], "spot_n_cells": n_kept[kspot],
    }, index=cell_ids)
    reason = np.where(low, f"umi<{params.min_umi:g}", np.where(high, f"umi>{params.max_umi:g}", ""))
    spots = pd.DataFrame({"n_cells_raw": n_raw, "n_cells": n_kept, "total_umi": umi, "qc_pass": qc_pass,
                          "qc_reason": reason, "x": spot_xy[:, 0], "y": spot_xy[:, 1]},
                         index=pd.Index(names, name=slide.obs_names.name or "spot"))
    in_failed = inside & ~qc_pass[np.maximum(idx, 0)]
    capped = (rank >= params.max_cells_per_spot) & qc_pass[sidx]
    summary = {
        "n_nuclei": int(len(pts)), "n_cells_kept": int(len(cells)), "n_outside_spots": int((~inside).sum()),
        "n_dropped_in_filtered_spots": int(in_failed.sum()), "n_dropped_over_cap": int(capped.sum()),
        "n_spots": int(n_spots), "n_spots_filtered": int((~qc_pass).sum()),
        "n_spots_low_umi": int(low.sum()), "n_spots_high_umi": int(high.sum()),
        "n_spots_capped": int((qc_pass & (n_raw > params.max_cells_per_spot)).sum()),
        "n_spots_without_cells": int((qc_pass & (n_kept == 0)).sum()),
        "filtered_spots_first": names[~qc_pass][:20].tolist(),
        "spot_diameter_px": diam, "max_cells_per_spot": params.max_cells_per_spot,
        "min_umi": params.min_umi, "max_umi": params.max_umi,
        "mean_cells_per_kept_spot": float(n_kept[qc_pass].mean()) if qc_pass.any() else 0.0,
    }
    return cells, spots, summary


def segment_slide(image, slide: ad.AnnData, params: SegmentationParams | None = None,
                  library_id: str | None = None, labels_out=None, **kwargs
                  ) -> tuple[SegmentationResult, pd.DataFrame, pd.DataFrame, dict]:
    """Check coverage, segment, assign to spots: (result, cells, spots, summary). ``kwargs`` -> segment_nuclei."""
    params = params or SegmentationParams()
    img = as_rgb_image(image)
    check_image_covers_spots(img.shape, slide)
    res = segment_nuclei(img, params, labels_out=labels_out, **kwargs)
    cells, spots, summary = assign_cells_to_spots(res.nuclei, slide, params, library_id)
    return res, cells, spots, summary


# ---------------------------------------------------------------------------------------------------------------
# accuracy
# ---------------------------------------------------------------------------------------------------------------
def match_f1(pred_labels: np.ndarray, true_labels: np.ndarray, iou: float = 0.5) -> dict:
    """Instance matching at an IoU threshold (stardist.matching): f1, precision, recall, tp, fp, fn, counts."""
    from stardist.matching import matching

    pred_labels, true_labels = np.asarray(pred_labels), np.asarray(true_labels)
    if pred_labels.shape != true_labels.shape:
        raise InputError(f"match_f1: predicted labels shape {pred_labels.shape} differs from the ground truth's "
                         f"{true_labels.shape}")
    m = matching(true_labels.astype(np.int32), pred_labels.astype(np.int32), thresh=iou)
    return {"f1": float(m.f1), "precision": float(m.precision), "recall": float(m.recall), "tp": int(m.tp),
            "fp": int(m.fp), "fn": int(m.fn), "n_true": int(m.n_true), "n_pred": int(m.n_pred), "iou": iou}
