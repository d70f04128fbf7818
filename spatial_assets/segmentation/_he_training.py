"""Seeded training of the bundled 3-channel (RGB) H&E StarDist model ``models/stardist_he``.

No annotated H&E is available offline, so the training images are H&E-like renders of real nuclear masks:

* StarDist's annotated nuclei ``mask2d.tif`` (DSB2018, ``data/stardist-test-images``): its train and validation
  quarters (the held-out test quarter is never used), down-scaled so nuclei are 8-18 px across;
* the nuclei of a realistic slide (:func:`spatial_assets.datasets.build_realistic_slide`, real osmFISH positions,
  per-class nucleus sizes; seed ``realistic_seed``) inside its training window (y < ``TRAIN_Y_UM`` um), both
  re-rendered by :func:`render_he_like` and in the slide's own rendering;
* random ellipse layouts from sparse to crowded (touching nuclei).

:func:`render_he_like` turns a label image into RGB by Beer-Lambert with jittered hematoxylin / eosin stain
vectors: a granular (neuropil-like) background that carries some hematoxylin (the texture a fluorescence model
outlines as nuclei), optional tears / vessels, nuclei of random darkness with chromatin texture and soft edges,
small dark debris that is not a nucleus, blur and noise. Validation: renders of the realistic slide's nuclei
outside the training window and fresh random layouts.

Run (budgeted for ~25 minutes on 2 shared CPU cores)::

    python -m spatial_assets.segmentation train-he --out /work/scratch/nuclei/stardist_he --seed 0
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np

from ._training import DEFAULT_DATA, load_img2d, new_stardist_model, split_regions

H_VEC = np.array([0.65, 0.70, 0.29])  # Ruifrok & Johnston's hematoxylin optical density (RGB)
E_VEC = np.array([0.07, 0.99, 0.11])  # ... and eosin
TRAIN_Y_UM = 1800.0  # realistic slide: rows with y < this (um) train, the others validate / are benchmarked
MASK_SCALES = (0.35, 0.45, 0.55, 0.7)


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.clip(v, 0.02, None)
    return v / np.linalg.norm(v)


def _smooth_noise(rng, shape, sigma) -> np.ndarray:
    from scipy import ndimage as ndi

    g = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return g / max(float(g.std()), 1e-6)


def render_he_like(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An H&E-like RGB uint8 image of the nuclei of ``labels`` (0 = background), with random stain and texture.

    Parameters
    ----------
    labels
        (H, W) integer instance labels.
    rng
        Random generator (stain vectors, background, nuclei darkness, debris, blur, noise).

    Returns
    -------
    numpy.ndarray
        (H, W, 3) uint8 RGB.
    """
    from scipy import ndimage as ndi

    H, W = labels.shape
    shape = (H, W)
    hv = _unit(H_VEC + rng.uniform(-0.12, 0.12, 3))
    ev = _unit(E_VEC + rng.uniform(-0.08, 0.08, 3) + rng.uniform(0, 0.35) * H_VEC)  # purple-ish tissue
    # background: eosin with granular texture at 1-3 px (neuropil) that also holds hematoxylin, large-scale
    # variation; the granules are the texture a nuclei model must not outline
    gran = _smooth_noise(rng, shape, rng.uniform(0.8, 2.2))
    gran_h = 0.6 * gran + 0.8 * _smooth_noise(rng, shape, rng.uniform(0.8, 2.0))
    low = _smooth_noise(rng, shape, rng.uniform(10, 30))
    e_level = rng.uniform(0.25, 2.5)
    e = e_level * np.clip(1 + rng.uniform(0.1, 0.4) * gran + rng.uniform(0, 0.25) * low, 0.05, None)
    h_level = rng.uniform(0.0, 0.8)
    h_bg = h_level * np.clip(1 + rng.uniform(0.2, 0.6) * gran_h, 0, None)
    if rng.random() < 0.3:  # tears / vessel lumen: unstained
        hole = _smooth_noise(rng, shape, rng.uniform(8, 20)) > rng.uniform(1.2, 2.2)
        e = np.where(hole, 0.03, e)
        h_bg = np.where(hole, 0.0, h_bg)
    # nuclei: darker than the background by a per-nucleus margin (a few paler), chromatin texture, soft edges,
    # less eosin inside
    n = int(labels.max())
    strength = h_level * rng.uniform(1.8, 2.5, n + 1) + rng.uniform(0.5, 1.6, n + 1)
    pale = rng.random(n + 1) < rng.uniform(0, 0.15)
    strength[pale] *= rng.uniform(0.6, 0.8)
    strength[0] = 0.0
    fg = labels > 0
    tex = _smooth_noise(rng, shape, rng.uniform(0.6, 1.5))
    h_nuc = strength[labels] * np.clip(1 + rng.uniform(0.1, 0.35) * tex, 0.2, None)
    soft = rng.uniform(0.3, 1.1)
    h_nuc = ndi.gaussian_filter(h_nuc.astype(np.float32), soft)
    w = ndi.gaussian_filter(fg.astype(np.float32), soft)
    h = h_bg * (1 - w) + h_nuc
    e = e * (1 - w * rng.uniform(0.2, 0.7))
    # debris: small dark dots that are not nuclei (< 3 px)
    n_deb = rng.poisson(H * W / rng.uniform(300, 3000))
    if n_deb:
        dots = np.zeros(shape, np.float32)
        dots[rng.integers(0, H, n_deb), rng.integers(0, W, n_deb)] = rng.uniform(2, 8, n_deb)
        h = h + ndi.gaussian_filter(dots, rng.uniform(0.5, 0.9)) * (~fg)
    od = h[..., None] * hv * rng.uniform(0.9, 1.3) + e[..., None] * ev * rng.uniform(0.35, 0.6)
    rgb = rng.uniform(220, 250) * np.exp(-od)
    if rng.random() < 0.5:  # faded / greyish scans: lower saturation
        g = rgb.mean(-1, keepdims=True)
        rgb = g + rng.uniform(0.45, 1.0) * (rgb - g)
    sig = rng.uniform(0, 1.2)
    if sig > 0.2:
        rgb = ndi.gaussian_filter(rgb, (sig, sig, 0))
    rgb = rgb + rng.normal(0, rng.uniform(1, 6), rgb.shape)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def random_layout(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """Labels of random elliptical nuclei (radius 3-9 px) from sparse to crowded (touching)."""
    from spatial_assets.datasets import render_he

    r_mean = rng.uniform(3.5, 8.0)
    frac = rng.uniform(0.05, 0.45)  # nuclear area fraction
    n = max(3, int(frac * size * size / (np.pi * r_mean**2)))
    if rng.random() < 0.5:  # clustered: more nuclei near a few centres
        c = rng.uniform(0, size, (rng.integers(1, 4), 2))
        pts = c[rng.integers(0, len(c), n)] + rng.normal(0, size / 5, (n, 2))
        pts = pts[(pts >= 0).all(1) & (pts < size).all(1)]
    else:
        pts = rng.uniform(0, size, (n, 2))
    from scipy.spatial import cKDTree

    # thin points closer than ~1.4 radii (render_he caps overlapping nuclei, but too-close ones become slivers)
    keep = np.ones(len(pts), bool)
    for i, j in cKDTree(pts).query_pairs(1.4 * r_mean):
        if keep[i] and keep[j]:
            keep[j] = False
    pts = pts[keep]
    radii = np.clip(rng.normal(r_mean, 0.25 * r_mean, len(pts)), 2.5, 10)
    _, lab = render_he(pts, radii, (size, size), rng)
    return lab


def _tiles(lab: np.ndarray, img: np.ndarray | None, tile: int):
    H, W = lab.shape
    for r in range(0, H - tile + 1, tile):
        for c in range(0, W - tile + 1, tile):
            lt = lab[r : r + tile, c : c + tile]
            if (lt > 0).mean() > 0.03:
                yield lt, None if img is None else img[r : r + tile, c : c + tile]


def _relabel(y: np.ndarray) -> np.ndarray:
    from skimage.segmentation import relabel_sequential

    return relabel_sequential(y.astype(np.int32))[0]


def training_sets(
    seed: int, data_dir=DEFAULT_DATA, realistic_dir: str | os.PathLike | None = None, n_random: int = 60
) -> tuple[tuple[list, list], tuple[list, list], dict]:
    """(train X, Y), (validation X, Y) and a description; X float32 RGB in [0, 1], Y int32 labels."""
    import tifffile

    from ._training import _rescale_pair

    rng = np.random.default_rng(seed)
    X, Y, Xv, Yv = [], [], [], []
    counts = {"stardist_mask2d": 0, "realistic_rerendered": 0, "realistic_own_render": 0, "random": 0}
    img2d, mask2d = load_img2d(data_dir)
    for role in ("train", "val"):
        for _, lab in split_regions(img2d, mask2d, role):
            for s in MASK_SCALES:
                _, ys = _rescale_pair(np.zeros(lab.shape, np.float32), lab, s)
                ys = _pad(_relabel(ys))  # pad the labels, then render: the padding is plain background
                for _ in range(2):
                    X.append(render_he_like(ys, rng))
                    Y.append(ys)
                    counts["stardist_mask2d"] += 1
    if realistic_dir is not None:
        from spatial_assets.datasets import DemoPaths

        p = DemoPaths.at(realistic_dir)
        lab = tifffile.imread(p.nuclei_labels)
        img = tifffile.imread(p.image)[..., :3]
        info = json.loads(Path(p.info).read_text())
        um_per_px = float(info.get("um_per_px", 0.8))
        cut = int(TRAIN_Y_UM / um_per_px)
        for lt, it in _tiles(lab[:cut], img[:cut], 192):
            y = _relabel(lt)
            X.append(render_he_like(y, rng))
            Y.append(y)
            counts["realistic_rerendered"] += 1
            if rng.random() < 0.5:
                X.append(it)
                Y.append(y)
                counts["realistic_own_render"] += 1
        for k, (lt, it) in enumerate(_tiles(lab[cut:], img[cut:], 192)):
            if k % 4 == 0:
                y = _relabel(lt)
                Xv.append(render_he_like(y, rng))
                Yv.append(y)
                Xv.append(it)
                Yv.append(y)
    for _ in range(n_random):
        y = random_layout(rng)
        X.append(render_he_like(y, rng))
        Y.append(y)
        counts["random"] += 1
    for _ in range(8):
        y = random_layout(rng)
        Xv.append(render_he_like(y, rng))
        Yv.append(y)
    X = [_pad(x) for x in X]
    Y = [_pad(y) for y in Y]
    Xv = [_pad(x) for x in Xv]
    Yv = [_pad(y) for y in Yv]
    X = [x.astype(np.float32) / 255 for x in X]
    Xv = [x.astype(np.float32) / 255 for x in Xv]
    return (X, Y), (Xv, Yv), {"train_images": counts, "val_images": len(Xv)}


def _pad(a: np.ndarray, size: int = 128) -> np.ndarray:
    ph, pw = max(0, size - a.shape[0]), max(0, size - a.shape[1])
    if not (ph or pw):
        return a
    if a.ndim == 3:  # an image whose labels were not padded first: edge pixels (no mirrored nuclei)
        return np.pad(a, ((0, ph), (0, pw), (0, 0)), mode="edge")
    return np.pad(a, ((0, ph), (0, pw)), constant_values=0)


def make_rgb_augmenter(rng: np.random.Generator):
    """Flips / rot90, colour jitter in optical density (per-channel gain), brightness, blur, noise."""
    from scipy import ndimage as ndi

    def augment(x: np.ndarray, y: np.ndarray):
        k = int(rng.integers(4))
        x, y = np.rot90(x, k), np.rot90(y, k)
        if rng.random() < 0.5:
            x, y = x[:, ::-1], y[:, ::-1]
        od = -np.log(np.clip(x, 1 / 255, 1))
        od = od * rng.uniform(0.8, 1.25) * rng.uniform(0.9, 1.1, 3)
        x = np.exp(-od)
        if rng.random() < 0.3:
            x = ndi.gaussian_filter(x, (rng.uniform(0.3, 1.0), rng.uniform(0.3, 1.0), 0))
        x = x + rng.normal(0, rng.uniform(0, 0.02), x.shape)
        return np.ascontiguousarray(np.clip(x, 0, 1), dtype=np.float32), np.ascontiguousarray(y)

    return augment


def train_he(
    out: str | os.PathLike,
    seed: int = 0,
    epochs: int = 40,
    steps_per_epoch: int = 50,
    patch: int = 128,
    batch_size: int = 8,
    n_filter_base: int = 16,
    n_depth: int = 3,
    threads: int = 2,
    data_dir: str | os.PathLike = DEFAULT_DATA,
    realistic_dir: str | os.PathLike | None = None,
) -> dict:
    """Train the RGB H&E model into folder ``out`` (config.json, weights_best.h5, thresholds.json, training_info.json).

    Parameters
    ----------
    out
        Model folder (replaced).
    seed
        Seeds the renders, the augmenter, numpy's / python's / TensorFlow's global generators.
    epochs, steps_per_epoch, patch, batch_size, n_filter_base, n_depth
        StarDist training / network sizes.
    threads
        TensorFlow intra / inter-op threads.
    data_dir
        Folder with StarDist's ``img2d.tif`` / ``mask2d.tif``.
    realistic_dir
        A built realistic slide (its nuclei_labels.tif and image.tif) or None to skip it.

    Returns
    -------
    dict
        The training info written to ``training_info.json``.
    """
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - csbdeep / StarDist data generators draw from the global numpy RNG
    tf.keras.utils.set_random_seed(seed)

    out = Path(out)
    t0 = time.time()
    (X, Y), (Xv, Yv), dinfo = training_sets(seed, data_dir, realistic_dir)
    t_data = time.time() - t0
    model = new_stardist_model(
        out,
        n_channel_in=3,
        n_depth=n_depth,
        n_filter_base=n_filter_base,
        patch=patch,
        batch_size=batch_size,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        lr_patience=6,
    )
    t1 = time.time()
    hist = model.train(
        X,
        Y,
        validation_data=(Xv, Yv),
        augmenter=make_rgb_augmenter(np.random.default_rng(seed + 1)),
        seed=seed,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
    )
    t_train = time.time() - t1
    model.load_weights("weights_best.h5")
    thr = model.optimize_thresholds(
        Xv,
        Yv,
        nms_threshs=[0.2, 0.3, 0.4],
        iou_threshs=[0.5],
        predict_kwargs={"show_tile_progress": False},
        optimize_kwargs={"tol": 1e-2, "maxiter": 20, "verbose": 0},
    )
    for f in ("weights_last.h5", "weights_now.h5"):
        (out / f).unlink(missing_ok=True)
    shutil.rmtree(out / "logs", ignore_errors=True)
    val_loss = [float(v) for v in hist.history.get("val_loss", [])]
    info = {
        "what": "StarDist2D nuclei model for H&E, 3 channels (RGB in [0, 1] after percentile normalisation), "
        "trained on H&E-like renders of real nuclear masks by spatial_assets.segmentation (train-he)",
        "command": f"python -m spatial_assets.segmentation train-he --out {out} --seed {seed} --epochs {epochs} "
        f"--steps-per-epoch {steps_per_epoch}" + (f" --realistic {realistic_dir}" if realistic_dir else ""),
        "seed": seed,
        "data": "data/stardist-test-images mask2d.tif train+val quarters (DSB2018 via StarDist 0.9.2, BSD-3) at "
        f"scales {list(MASK_SCALES)}; realistic slide nuclei (y < {TRAIN_Y_UM} um); random ellipse layouts",
        **dinfo,
        "render": "spatial_assets.segmentation._he_training.render_he_like (jittered H/E vectors, granular "
        "background with hematoxylin, tears, pale / dark nuclei with chromatin texture, debris, blur, noise)",
        "augmentation": "flips/rot90, optical-density gain 0.8-1.25 and per-channel 0.9-1.1, blur, noise",
        "epochs": epochs,
        "steps_per_epoch": steps_per_epoch,
        "batch_size": batch_size,
        "patch": patch,
        "data_seconds": round(t_data, 1),
        "train_seconds": round(t_train, 1),
        "val_loss_last": val_loss[-1] if val_loss else None,
        "val_loss_best": min(val_loss) if val_loss else None,
        "optimized_thresholds": {k: float(v) for k, v in thr.items()},
        "nuclei_diameter_px_range": [6, 25],
        "tensorflow": tf.__version__,
    }
    (out / "training_info.json").write_text(json.dumps(info, indent=1))
    return info
