"""The image a segmentation model sees: RGB, the hematoxylin channel (colour deconvolution) or luminance, read
block-wise from any array-like, with percentile normalisation estimated on a sample of pixels.
"""

from __future__ import annotations

import os

import numpy as np

from ..io._readers import InputError, read_image
from ..params import SegmentationParams

# Pixels read to estimate normalisation percentiles / the Otsu threshold of a large image.
SAMPLE_PIXELS = 4_000_000


# ---------------------------------------------------------------------------------------------------------------
# image access
# ---------------------------------------------------------------------------------------------------------------
def _hed_h_column() -> np.ndarray:
    from skimage.color import hed_from_rgb

    return np.asarray(hed_from_rgb[:, 0], dtype=np.float32)


def hematoxylin(rgb: np.ndarray) -> np.ndarray:
    """Hematoxylin channel of an RGB block, float32; equals ``skimage.color.rgb2hed(rgb)[..., 0]``.

    Computes only the H column of the deconvolution (a third of rgb2hed's float64 memory).

    Parameters
    ----------
    rgb : numpy.ndarray
        RGB(A) pixels (..., 3|4), integer (scaled by the dtype's maximum) or float in [0, 1].

    Returns
    -------
    numpy.ndarray
        Hematoxylin optical density of each pixel, float32, clipped at 0.
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

    Parameters
    ----------
    rgb : array-like
        The RGB(A) image (H, W, 3|4): numpy array, ``zarr.Array``, memmap, ...
    mode : str
        'hematoxylin', 'gray' or 'rgb'.
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
    """Validate an H&E image (path, numpy array or array-like (H, W, 3|4)); returns an array-like, never a copy.

    Parameters
    ----------
    image : str or os.PathLike or array-like
        An image file (read lazily) or an RGB(A) array-like of shape (H, W, 3|4).
    name : str
        Name of the input in error messages.

    Returns
    -------
    array-like
        The image itself, or the lazily read file.

    Raises
    ------
    InputError
        If the image is not an RGB array-like of at least 16 x 16 px with integer or float values, or the file
        cannot be read as RGB.
    """
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
        raise InputError(
            "parameters.segmentation.channel: 'rgb' cannot be used with method watershed; expected "
            "'auto', 'hematoxylin' or 'gray'"
        )
    if n_channel_in == 3:
        if ch not in ("auto", "rgb"):
            raise InputError(
                f"parameters.segmentation.channel: '{ch}' given, but the model takes 3 channels; "
                "expected 'auto' or 'rgb'"
            )
        return "rgb"
    if n_channel_in == 1:
        if ch == "rgb":
            raise InputError(
                "parameters.segmentation.channel: 'rgb' given, but the model takes 1 channel; expected "
                "'auto' / 'hematoxylin' (rgb2hed) or 'gray'"
            )
        return "hematoxylin" if ch == "auto" else ch
    raise InputError(f"segmentation model: n_channel_in = {n_channel_in}; expected 1 (nuclear) or 3 (H&E RGB)")
