"""Seeded training of the small 1-channel StarDist nuclei model shipped in ``spatial_assets/segmentation/models/stardist_nuclei``.

Data: StarDist's annotated nuclei image ``img2d.tif`` + ``mask2d.tif`` (DSB2018, 512 x 512, bundled in
``data/stardist-test-images``). Split into four 256 x 256 quarters: the top two train, the bottom-left one
validates (checkpoint choice and threshold tuning), the bottom-right one is held out for the F1 test and never
seen in training. Nuclei there are ~24 px across; the demo H&E's nuclei are ~8-17 px, so the training regions are
also used at several fixed down-scales plus a continuous random zoom, with flips / rot90 and intensity, blur and
noise augmentation, so that one model segments nuclei ~7-30 px across.

Run (about 10 minutes on 2 cores)::

    python -m spatial_assets.segmentation train --out spatial_assets/segmentation/models/stardist_nuclei --seed 0
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np

# StarDist's sample images live in the repository's data/ folder (not in the installed package): training and the
# held-out F1 test are developer tools run from the repository root, or given --data.
DEFAULT_DATA = Path("data") / "stardist-test-images"
# quarter (row, col) of the 512 x 512 image -> role; rows/cols of 256 px.
SPLIT = {"train": [(0, 0), (0, 1)], "val": [(1, 0)], "test": [(1, 1)]}
QUARTER = 256
TRAIN_SCALES = (0.33, 0.45, 0.6, 0.8, 1.0)


def load_img2d(data_dir: str | os.PathLike = DEFAULT_DATA) -> tuple[np.ndarray, np.ndarray]:
    """The raw fluorescence image and its ground-truth instance labels (both 2-D)."""
    import tifffile

    data_dir = Path(data_dir)
    img = tifffile.imread(data_dir / "img2d.tif")
    mask = tifffile.imread(data_dir / "mask2d.tif")
    if img.shape != mask.shape or img.ndim != 2:
        raise ValueError(
            f"{data_dir}: expected 2-D img2d.tif and mask2d.tif of one shape, found {img.shape} and {mask.shape}"
        )
    return img, mask


def split_regions(img: np.ndarray, mask: np.ndarray, role: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (image, labels) quarters of one role ('train', 'val' or 'test'), labels relabelled 1..n per quarter."""
    from skimage.segmentation import relabel_sequential

    if role not in SPLIT:
        raise ValueError(f"role must be one of {sorted(SPLIT)}, got {role!r}")
    out = []
    for r, c in SPLIT[role]:
        sl = (slice(r * QUARTER, (r + 1) * QUARTER), slice(c * QUARTER, (c + 1) * QUARTER))
        out.append((img[sl], relabel_sequential(mask[sl].astype(np.int32))[0]))
    return out


def heldout_test_region(data_dir: str | os.PathLike = DEFAULT_DATA) -> tuple[np.ndarray, np.ndarray]:
    """The held-out bottom-right quarter of img2d (raw image, labels): never seen in training or validation."""
    img, mask = load_img2d(data_dir)
    return split_regions(img, mask, "test")[0]


def _rescale_pair(x: np.ndarray, y: np.ndarray, s: float) -> tuple[np.ndarray, np.ndarray]:
    from skimage.transform import rescale

    xs = rescale(x, s, order=1, anti_aliasing=s < 1, preserve_range=True).astype(np.float32)
    ys = rescale(y, s, order=0, anti_aliasing=False, preserve_range=True).astype(np.int32)
    return xs, ys


def _pad_to(x: np.ndarray, y: np.ndarray, size: int, bg: float) -> tuple[np.ndarray, np.ndarray]:
    ph, pw = max(0, size - x.shape[0]), max(0, size - x.shape[1])
    if ph or pw:
        x = np.pad(x, ((0, ph), (0, pw)), constant_values=bg)
        y = np.pad(y, ((0, ph), (0, pw)), constant_values=0)
    return x, y


def multiscale_set(regions, scales, patch: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Normalised (1, 99.8 percentiles per region) copies of every region at every scale, padded to >= patch."""
    from csbdeep.utils import normalize

    X, Y = [], []
    for img, lab in regions:
        xn = normalize(img.astype(np.float32), 1, 99.8)
        bg = float(np.percentile(xn, 1))
        for s in scales:
            xs, ys = (xn, lab) if s == 1 else _rescale_pair(xn, lab, s)
            xs, ys = _pad_to(xs, ys, patch, bg)
            X.append(xs.astype(np.float32))
            Y.append(ys)
    return X, Y


def make_augmenter(rng: np.random.Generator):
    """Flips / rot90, a random zoom in [0.8, 1.25] (crop or pad), intensity gain / offset / gamma, blur, noise."""
    from scipy import ndimage as ndi
    from skimage.transform import resize

    def augment(x: np.ndarray, y: np.ndarray):
        x = x.copy()
        p = x.shape[0]
        # random zoom, keeping the patch size
        s = float(np.exp(rng.uniform(np.log(0.8), np.log(1.25))))
        if s > 1.02:  # zoom in: crop a centre window then upsample
            w = max(8, int(round(p / s)))
            o = (p - w) // 2
            x = resize(x[o : o + w, o : o + w], (p, p), order=1, preserve_range=True, anti_aliasing=False)
            y = resize(y[o : o + w, o : o + w], (p, p), order=0, preserve_range=True, anti_aliasing=False)
        elif s < 0.98:  # zoom out: downsample then pad with the patch's background level
            w = max(8, int(round(p * s)))
            bg = float(np.percentile(x, 5))
            xs = resize(x, (w, w), order=1, preserve_range=True, anti_aliasing=True)
            ys = resize(y, (w, w), order=0, preserve_range=True, anti_aliasing=False)
            o = (p - w) // 2
            x = np.full((p, p), bg, dtype=np.float32)
            yy = np.zeros((p, p), dtype=y.dtype)
            x[o : o + w, o : o + w] = xs
            yy[o : o + w, o : o + w] = ys
            y = yy
        x = x.astype(np.float32)
        y = y.astype(np.int32)
        k = int(rng.integers(4))
        x, y = np.rot90(x, k), np.rot90(y, k)
        if rng.random() < 0.5:
            x, y = x[:, ::-1], y[:, ::-1]
        # intensity
        if rng.random() < 0.5:
            x = ndi.gaussian_filter(x, rng.uniform(0.3, 1.5))
        x = np.clip(x, 0, None) ** rng.uniform(0.7, 1.4)
        x = x * rng.uniform(0.6, 1.4) + rng.uniform(-0.15, 0.15)
        x = x + rng.normal(0, rng.uniform(0, 0.06), x.shape)
        return np.ascontiguousarray(x, dtype=np.float32), np.ascontiguousarray(y)

    return augment


def new_stardist_model(
    out: Path,
    *,
    n_channel_in: int,
    n_depth: int,
    n_filter_base: int,
    patch: int,
    batch_size: int,
    epochs: int,
    steps_per_epoch: int,
    lr_patience: int,
):
    """A fresh StarDist2D (32 rays, grid 2, CPU) in the folder ``out`` (replaced if it exists), configured for
    training: ``patch`` x ``patch`` patches, Adam at 1e-3 halved after ``lr_patience`` epochs without improvement.

    Parameters
    ----------
    out : pathlib.Path
        Model folder (its name is the model's name).
    n_channel_in : int
        1 (a single channel, e.g. hematoxylin) or 3 (RGB).
    n_depth, n_filter_base : int
        U-Net depth and base filter count.
    patch, batch_size, epochs, steps_per_epoch : int
        Training patch side, batch size, epochs and steps per epoch.
    lr_patience : int
        Epochs without validation improvement before the learning rate is halved.

    Returns
    -------
    stardist.models.StarDist2D
        The untrained model.
    """
    from stardist.models import Config2D, StarDist2D

    conf = Config2D(
        n_rays=32,
        grid=(2, 2),
        n_channel_in=n_channel_in,
        unet_n_depth=n_depth,
        unet_n_filter_base=n_filter_base,
        net_conv_after_unet=64,
        train_patch_size=(patch, patch),
        train_batch_size=batch_size,
        train_epochs=epochs,
        train_steps_per_epoch=steps_per_epoch,
        train_learning_rate=1e-3,
        train_tensorboard=False,
        train_reduce_lr={"factor": 0.5, "patience": lr_patience, "min_delta": 0},
        use_gpu=False,
    )
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return StarDist2D(conf, name=out.name, basedir=str(out.parent))


def train(
    out: str | os.PathLike,
    seed: int = 0,
    epochs: int = 60,
    steps_per_epoch: int = 50,
    patch: int = 128,
    batch_size: int = 8,
    n_filter_base: int = 16,
    n_depth: int = 3,
    threads: int = 2,
    data_dir: str | os.PathLike = DEFAULT_DATA,
) -> dict:
    """Train the model into folder ``out`` (config.json, weights_best.h5, thresholds.json, training_info.json)."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - csbdeep / StarDist data generators draw from the global numpy RNG
    tf.keras.utils.set_random_seed(seed)
    try:
        tf.config.experimental.enable_op_determinism()
    except Exception:  # pragma: no cover - older TF
        pass

    out = Path(out)
    img, mask = load_img2d(data_dir)
    X, Y = multiscale_set(split_regions(img, mask, "train"), TRAIN_SCALES, patch)
    Xv, Yv = multiscale_set(split_regions(img, mask, "val"), (0.45, 0.7, 1.0), patch)
    model = new_stardist_model(
        out,
        n_channel_in=1,
        n_depth=n_depth,
        n_filter_base=n_filter_base,
        patch=patch,
        batch_size=batch_size,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        lr_patience=8,
    )
    t0 = time.time()
    rng = np.random.default_rng(seed)
    hist = model.train(
        X,
        Y,
        validation_data=(Xv, Yv),
        augmenter=make_augmenter(rng),
        seed=seed,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
    )
    t_train = time.time() - t0
    model.load_weights("weights_best.h5")
    Xv1, Yv1 = multiscale_set(split_regions(img, mask, "val"), (0.5, 1.0), 0)
    thr = model.optimize_thresholds(
        Xv1,
        Yv1,
        nms_threshs=[0.1, 0.3],
        iou_threshs=[0.5],
        predict_kwargs={"show_tile_progress": False},
        optimize_kwargs={"tol": 1e-2, "maxiter": 20, "verbose": 0},
    )
    for f in ("weights_last.h5", "weights_now.h5"):
        (out / f).unlink(missing_ok=True)
    for d in ("logs",):
        shutil.rmtree(out / d, ignore_errors=True)
    val_loss = [float(v) for v in hist.history.get("val_loss", [])]
    info = {
        "what": "StarDist2D nuclei model, 1 channel (fluorescence-like: bright nuclei on dark; use the H&E "
        "hematoxylin channel of rgb2hed), trained by spatial_assets.segmentation (train)",
        "seed": seed,
        "data": "data/stardist-test-images img2d.tif + mask2d.tif (DSB2018 via StarDist 0.9.2, BSD-3)",
        "split": {
            k: [f"rows {r * QUARTER}:{(r + 1) * QUARTER}, cols {c * QUARTER}:{(c + 1) * QUARTER}" for r, c in v]
            for k, v in SPLIT.items()
        },
        "train_scales": list(TRAIN_SCALES),
        "augmentation": "flips/rot90, random zoom 0.8-1.25, gaussian blur, gamma 0.7-1.4, gain 0.6-1.4, "
        "offset +-0.15, gaussian noise sd <= 0.06",
        "normalisation": "csbdeep normalize percentiles 1 / 99.8 per image",
        "epochs": epochs,
        "steps_per_epoch": steps_per_epoch,
        "batch_size": batch_size,
        "patch": patch,
        "train_seconds": round(t_train, 1),
        "val_loss_last": val_loss[-1] if val_loss else None,
        "val_loss_best": min(val_loss) if val_loss else None,
        "optimized_thresholds": {k: float(v) for k, v in thr.items()},
        "nuclei_diameter_px_range": [7, 30],
        "tensorflow": tf.__version__,
    }
    (out / "training_info.json").write_text(json.dumps(info, indent=1))
    return info
