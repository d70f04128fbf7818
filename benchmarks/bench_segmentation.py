"""Benchmark of nuclei segmentation (SpatialScope step 1).

* F1 at IoU 0.5 on the held-out quarter of StarDist's annotated img2d (never seen in training) for the bundled
  StarDist model and squidpy's watershed;
* on the demo slide (real osmFISH cells; a crop in quick mode): nuclei F1 against the demo's nuclei_labels.tif,
  and nuclei per spot vs true cells per spot (mean absolute error, Pearson r), for each method and StarDist
  ``scale``;
* H&E models on realistic slides (:func:`spatial_assets.datasets.build_realistic_slide`, seeds 1 and 2; only the
  rows the H&E model never trained on, y >= ``TRAIN_Y_UM``): nuclei F1, recall of the true nuclei of crowded spots
  (>= ``CROWDED`` true cells), nuclei per spot MAE and r against the true cells per spot, for the bundled H&E model
  (``bundled:stardist_he``, RGB, with its own optimised thresholds, and at SpatialScope's prob_thresh 0.2 /
  nms_thresh 0.1), the old bundled fluorescence model (hematoxylin channel) and watershed;
* nucleus features (:func:`spatial_assets.segmentation.nucleus_features`) of those slides' true nuclei: seconds
  per 1,000 nuclei;
* the same models on the real Visium H&E crop (squidpy mouse brain, 49 spots, no ground truth): nuclei per 55-um
  spot (a mouse brain section shows roughly 1-15) and the fraction of spots over ``max_cells_per_spot``;
* a big image tiled from the demo H&E (6,000^2 px quick, 10,000^2 px full), read lazily from a tiled TIFF and
  labels written block-wise into an on-disk zarr array, in a subprocess: seconds and peak resident memory.

Run: ``python -m benchmarks.bench_segmentation [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CROWDED = 8  # true cells per spot from which a spot counts as crowded (the realistic slides' 75th percentile)
REALISTIC_SEEDS = (1, 2)


def _he_models() -> dict:
    from spatial_assets import segmentation as seg
    from spatial_assets.params import SegmentationParams

    base = SegmentationParams(min_umi=0, max_umi=1e12)
    return {
        "stardist_he": base.model_copy(update={"model": seg.BUNDLED_HE_MODEL, "prob_thresh": None, "nms_thresh": None}),
        "stardist_he_p0.2": base.model_copy(update={"model": seg.BUNDLED_HE_MODEL}),
        "stardist_nuclei_old": base.model_copy(update={"model": seg.BUNDLED_MODEL}),
        "watershed": base.model_copy(update={"method": "watershed"}),
    }


def _crop_slide(slide, r0: int, r1: int):
    """Spots whose circle lies in rows [r0, r1), coordinates shifted to the crop."""
    from spatial_assets import segmentation as seg

    rad = seg.spot_diameter_px(slide) / 2
    y = slide.obsm["spatial"][:, 1]
    sub = slide[(y - rad >= r0) & (y + rad < r1)].copy()
    sub.obsm["spatial"] = sub.obsm["spatial"] - np.array([0, r0])
    return sub


def crowded_recall(pred, truth, truth_cells, crowded_spots) -> tuple[float, int]:
    """Fraction of the true nuclei of ``crowded_spots`` matched (IoU >= 0.5) by a predicted nucleus."""
    from spatial_assets import segmentation as seg

    want = truth_cells.loc[truth_cells["spot"].astype(str).isin(crowded_spots), "label"].astype(int).to_numpy()
    if not len(want):
        return float("nan"), 0
    return float(np.isin(want, seg.matched_true_labels(pred, truth)).mean()), int(len(want))


def _realistic(out: dict, quick: bool, tmp: Path) -> None:
    import anndata as ad
    import tifffile

    from spatial_assets import segmentation as seg
    from spatial_assets.datasets import build_realistic_slide
    from spatial_assets.segmentation._he_training import TRAIN_Y_UM

    agg: dict = {}
    for seed in REALISTIC_SEEDS:
        p = build_realistic_slide(tmp / f"realistic{seed}", seed=seed)
        img = tifffile.imread(p.image)[..., :3]
        truth = tifffile.imread(p.nuclei_labels)
        um_per_px = json.loads(Path(p.info).read_text())["um_per_px"]
        r0 = int(TRAIN_Y_UM / um_per_px)
        r1 = min(img.shape[0], r0 + (900 if quick else img.shape[0]))
        img, truth = img[r0:r1], truth[r0:r1]
        slide = _crop_slide(ad.read_h5ad(p.slide), r0, r1)
        tc = ad.read_h5ad(p.truth_cells).obs
        tc = tc[tc["label"].isin(np.unique(truth))]
        true_n = slide.obs["n_cells_true"].to_numpy()
        crowded = slide.obs_names[true_n >= CROWDED].astype(str)
        t = time.time()
        feats = seg.nucleus_features(truth, img)
        out[f"realistic_s{seed}_nucleus_features_seconds_per_1000"] = round(1000 * (time.time() - t) / len(feats), 2)
        out[f"realistic_s{seed}_spots"] = int(slide.n_obs)
        out[f"realistic_s{seed}_crowded_spots"] = int(len(crowded))
        for k, prm in _he_models().items():
            t = time.time()
            r = seg.segment_nuclei(img, prm)
            sec = time.time() - t
            f1 = seg.match_f1(r.labels, truth)["f1"]
            rec, n_c = crowded_recall(r.labels, truth, tc, set(crowded))
            _, spots, _ = seg.assign_cells_to_spots(r.nuclei, slide, prm)
            n = spots["n_cells_raw"].to_numpy()
            vals = {
                "f1": f1,
                "crowded_recall": rec,
                "cells_per_spot_mae": float(np.abs(n - true_n).mean()),
                "cells_per_spot_r": float(np.corrcoef(n, true_n)[0, 1]),
            }
            for name, v in vals.items():
                out[f"realistic_s{seed}_{name}_{k}"] = round(v, 3)
                agg.setdefault((name, k), []).append(v)
            out[f"realistic_s{seed}_seconds_{k}"] = round(sec, 1)
        out[f"realistic_s{seed}_crowded_true_nuclei"] = n_c
    for (name, k), v in agg.items():
        out[f"realistic_mean_{name}_{k}"] = round(float(np.mean(v)), 3)


def _real_crop(out: dict) -> None:
    import anndata as ad

    from spatial_assets import segmentation as seg
    from spatial_assets.io import read_image

    d = REPO / "data" / "squidpy-visium-mousebrain"
    img = read_image(d / "test_img.jpg")
    slide = ad.read_h5ad(d / "test_data.h5ad")  # X is log-normalised: no UMI QC (min_umi 0, max_umi 1e12)
    for k, prm in _he_models().items():
        r = seg.segment_nuclei(img, prm)
        _, spots, summ = seg.assign_cells_to_spots(r.nuclei, slide, prm)
        n = spots["n_cells_raw"].to_numpy()
        out[f"real_crop_cells_per_spot_mean_{k}"] = round(float(n.mean()), 2)
        out[f"real_crop_cells_per_spot_range_{k}"] = f"{int(n.min())}-{int(n.max())}"
        out[f"real_crop_cells_per_spot_median_{k}"] = float(np.median(n))
        out[f"real_crop_fraction_spots_capped_{k}"] = round(summ["fraction_spots_capped"], 3)
        out[f"real_crop_n_nuclei_{k}"] = int(len(r.nuclei))


def _heldout(out: dict) -> None:
    from spatial_assets import segmentation as seg
    from spatial_assets.params import SegmentationParams
    from spatial_assets.segmentation._training import heldout_test_region

    img, truth = heldout_test_region()
    x = img.astype(np.float32)
    x = (x - x.min()) / (x.max() - x.min())
    fluo_rgb = np.repeat((x * 255).astype(np.uint8)[..., None], 3, 2)  # bright nuclei: model's native contrast
    bright_rgb = 255 - fluo_rgb  # dark nuclei on a bright background, as in brightfield
    sd = SegmentationParams(model=str(seg.BUNDLED_MODEL))
    runs = {
        "stardist_gray": (fluo_rgb, sd.model_copy(update={"channel": "gray"})),
        "stardist_hematoxylin_brightfield": (bright_rgb, sd),
        "watershed_hematoxylin_brightfield": (bright_rgb, SegmentationParams(method="watershed")),
    }
    for k, (im, p) in runs.items():
        r = seg.segment_nuclei(im, p)
        m = seg.match_f1(r.labels, truth)
        out[f"img2d_heldout_f1_{k}"] = round(m["f1"], 3)
        out[f"img2d_heldout_n_pred_{k}"] = m["n_pred"]
    out["img2d_heldout_n_true"] = int(truth.max())


def _demo(out: dict, quick: bool, tmp: Path) -> Path:
    import anndata as ad
    import tifffile

    from spatial_assets import segmentation as seg
    from spatial_assets.datasets import build_demo
    from spatial_assets.params import SegmentationParams

    paths = build_demo(tmp / "demo", seed=0, crop_um=(600, 1850, 1200, 2450) if quick else None)
    img = tifffile.imread(paths.image)
    truth = tifffile.imread(paths.nuclei_labels)
    slide = ad.read_h5ad(paths.slide)
    true_n = slide.obs["n_cells_true"].to_numpy()
    out["demo_image_shape"] = "x".join(map(str, img.shape[:2]))
    out["demo_n_true_nuclei"] = int(truth.max())
    out["demo_n_spots"] = int(slide.n_obs)
    scales = (1.0,) if quick else (0.75, 1.0, 1.25, 1.5)
    runs = {
        f"stardist_scale{s:g}": SegmentationParams(model=str(seg.BUNDLED_MODEL), scale=s, min_umi=0) for s in scales
    }
    runs["watershed"] = SegmentationParams(method="watershed", min_umi=0)
    for k, p in runs.items():
        t = time.time()
        r = seg.segment_nuclei(img, p)
        sec = time.time() - t
        m = seg.match_f1(r.labels, truth)
        _, spots, _ = seg.assign_cells_to_spots(r.nuclei, slide, p)
        n = spots["n_cells_raw"].to_numpy()
        out[f"demo_f1_{k}"] = round(m["f1"], 3)
        out[f"demo_n_pred_{k}"] = m["n_pred"]
        out[f"demo_cells_per_spot_mae_{k}"] = round(float(np.abs(n - true_n).mean()), 3)
        out[f"demo_cells_per_spot_r_{k}"] = round(float(np.corrcoef(n, true_n)[0, 1]), 3)
        out[f"demo_seconds_{k}"] = round(sec, 1)
    return paths.image


_BIG_CHILD = r"""
import json, resource, sys, time
import numpy as np, zarr
from spatial_assets import segmentation as seg
from spatial_assets.params import SegmentationParams
from spatial_assets.io import read_image
img_path, out_path, method = sys.argv[1], sys.argv[2], sys.argv[3]
img = read_image(img_path, lazy=True)
labels = zarr.create_array(store=out_path, shape=img.shape[:2], chunks=(1024, 1024), dtype="int32", fill_value=0)
t = time.time()
p = SegmentationParams(method=method, model=str(seg.BUNDLED_MODEL))
r = seg.segment_nuclei(img, p, labels_out=labels)
sec = time.time() - t
print(json.dumps({"seconds": round(sec, 1), "n_nuclei": int(len(r.nuclei)),
                  "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
                  "prediction": r.info["prediction"]}))
"""


def _big(out: dict, side: int, demo_image: Path, tmp: Path, methods=("stardist",)) -> None:
    import tifffile

    src = tifffile.imread(demo_image)
    reps = (int(np.ceil(side / src.shape[0])), int(np.ceil(side / src.shape[1])), 1)
    big = np.tile(src, reps)[:side, :side]
    path = tmp / f"big_{side}.tif"
    tifffile.imwrite(path, big, tile=(512, 512), compression="zlib", photometric="rgb")
    del big, src
    for method in methods:
        res = subprocess.run(
            [sys.executable, "-c", _BIG_CHILD, str(path), str(tmp / f"labels_{method}.zarr"), method],
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        if res.returncode != 0:
            out[f"big{side}_{method}_error"] = res.stderr.strip().splitlines()[-1][:300]
            continue
        r = json.loads(res.stdout.strip().splitlines()[-1])
        for k, v in r.items():
            out[f"big{side}_{method}_{k}"] = v


def run(quick: bool = False) -> dict:
    """Accuracy and scale figures of segmentation (see module docstring)."""
    import torch

    torch.set_num_threads(2)
    out: dict = {"quick": quick}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        _heldout(out)
        _realistic(out, quick, tmp)
        _real_crop(out)
        demo_image = _demo(out, quick, tmp)
        _big(
            out,
            6000 if quick else 10_000,
            demo_image,
            tmp,
            methods=("stardist",) if quick else ("stardist", "watershed"),
        )
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    for k, v in run(quick=a.quick).items():
        print(f"{k}: {v}")
