"""Benchmark of cell typing (RCTD full mode + Potts labels): accuracy on the demo slide, speed at scale.

* Accuracy: the demo slide built from real osmFISH cells (``spatial_assets.datasets.build_demo``), typed from the TRUE
  cell positions per spot (so segmentation errors do not enter), against the true types, at the fine level
  (``cell_type``, 31 osmFISH clusters for 33 genes) and the coarse one (``cell_class``). Reported: per-cell
  accuracy and macro-F1 of the Potts labels and of the baseline "every cell gets its spot's top type", and the
  RMSE of the spot proportions against the true ones (cell fractions per spot).
* Speed: 5,000 spots, ~25,000 cells, 2,000 genes, 20 types simulated from the bundled MOp scRNA reference
  (spatial_assets/datasets/data/dot-mop-scrna; 500 real genes, 1,500 more simulated by :func:`spatial_assets.datasets.extend_genes`:
  copies of random real genes with per-type factors exp(N(0, 0.7^2)), Poisson-resampled per cell), half the cells
  as reference, spots summing real held-out cells (:func:`spatial_assets.datasets.simulate_slide`). Run in a
  subprocess so the peak memory (ru_maxrss) is clean.

``python -m benchmarks.bench_celltyping [--quick]``. Timings depend on the machine's load.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from spatial_assets.datasets import data_path

REPO = Path(__file__).resolve().parent.parent
MOP = data_path("dot-mop-scrna", "mop_scrna_ref_500genes.h5ad")


def _macro_f1(truth: np.ndarray, pred: np.ndarray) -> float:
    from sklearn.metrics import f1_score

    labels = np.unique(truth)
    return float(f1_score(truth, pred, labels=labels, average="macro", zero_division=0))


def demo_accuracy(level: str, crop_um=None, seed: int = 0, min_cells_per_type: int = 5) -> dict:
    """Type the demo slide at ``level`` ('cell_type' or 'cell_class') from the true cell positions."""
    import anndata as ad

    from spatial_assets.celltyping import identify_cell_types
    from spatial_assets.datasets import build_demo
    from spatial_assets.params import CellTypingParams

    with tempfile.TemporaryDirectory() as d:
        paths = build_demo(Path(d) / "demo", seed=seed, crop_um=crop_um)
        slide = ad.read_h5ad(paths.slide)
        ref = ad.read_h5ad(paths.reference)
        truth = ad.read_h5ad(paths.truth_cells).obs
    truth = truth[truth["spot"].astype(str) != ""]
    cells = truth[["x", "y", "spot"]].astype({"spot": str})
    counts = ref.obs[level].astype(str).value_counts()
    params = CellTypingParams(min_cells_per_type=min_cells_per_type)
    # reference types below the demo's min_cells_per_type are dropped (reported), as RCTD would refuse them
    small = counts[counts < min_cells_per_type]
    ref = ref[~ref.obs[level].astype(str).isin(small.index)].copy()
    t = time.perf_counter()
    res = identify_cell_types(slide, ref, level, cells, params, max_cells_per_spot=20)
    sec = time.perf_counter() - t
    tt = truth[level].astype(str).to_numpy()
    pred = res.cells["cell_type"].astype(str).to_numpy()
    base = res.cells["initial_type"].astype(str).to_numpy()
    # true proportions: fraction of each spot's cells of each type
    tp = pd.crosstab(truth["spot"].astype(str), tt, normalize="index")
    cols = sorted(set(tp.columns) | set(res.weights.columns))
    W = res.weights.reindex(index=tp.index, columns=cols, fill_value=0.0)
    T = tp.reindex(columns=cols, fill_value=0.0)
    ok = W.notna().all(1)
    rmse = float(np.sqrt(((W[ok] - T[ok]) ** 2).to_numpy().mean()))
    top_true = T[ok].to_numpy().argmax(1)
    top_pred = W[ok].to_numpy().argmax(1)
    multi = pd.Series(truth["spot"].astype(str)).value_counts()
    in_multi = truth["spot"].astype(str).map(multi).to_numpy() > 1
    pfx = f"demo_{level}"
    return {
        f"{pfx}_n_cells": int(len(cells)),
        f"{pfx}_n_spots": int(slide.n_obs),
        f"{pfx}_n_types_reference": int(res.weights.shape[1]),
        f"{pfx}_types_dropped_below_min_cells": {k: int(v) for k, v in small.items()},
        f"{pfx}_accuracy_potts": float((pred == tt).mean()),
        f"{pfx}_accuracy_baseline_top_type": float((base == tt).mean()),
        f"{pfx}_accuracy_potts_multi_cell_spots": float((pred == tt)[in_multi].mean()),
        f"{pfx}_accuracy_baseline_multi_cell_spots": float((base == tt)[in_multi].mean()),
        f"{pfx}_macro_f1_potts": _macro_f1(tt, pred),
        f"{pfx}_macro_f1_baseline": _macro_f1(tt, base),
        f"{pfx}_proportion_rmse": rmse,
        f"{pfx}_spot_top_type_accuracy": float((top_true == top_pred).mean()),
        f"{pfx}_majority_class_rate": float(pd.Series(tt).value_counts(normalize=True).iloc[0]),
        f"{pfx}_sigma": res.sigma,
        f"{pfx}_sigma_fit_note": res.info["sigma_fit"]["note"],
        f"{pfx}_genes_used": len(res.genes_used),
        f"{pfx}_sweeps": res.info["potts"].get("sweeps", 0),
        f"{pfx}_seconds": sec,
    }


def _scale_simulate(out_dir: str, n_spots: int, n_genes: int, n_types: int, mean_cells: float, seed: int) -> None:
    """Simulate the large slide and write slide / reference / cells / truth to ``out_dir``."""
    import anndata as ad

    from spatial_assets.datasets import extend_genes, simulate_slide

    key = "cell_type"
    ref = ad.read_h5ad(MOP)
    ref.obs[key] = ref.obs[key].astype(str)
    top = ref.obs[key].value_counts().index[:n_types]
    ref = ref[ref.obs[key].isin(top)].copy()
    ref = extend_genes(ref, key, n_genes, seed=seed)
    half = np.random.default_rng(seed).random(ref.n_obs) < 0.5
    refA, pool = ref[half].copy(), ref[~half].copy()
    slide, cells, props, _ = simulate_slide(pool, key, n_spots, mean_cells=mean_cells, seed=seed + 1)
    d = Path(out_dir)
    slide.write_h5ad(d / "slide.h5ad")
    refA.write_h5ad(d / "reference.h5ad")
    cells.to_csv(d / "cells.csv")
    props.to_csv(d / "props.csv")


def _scale_type(out_dir: str, seed: int) -> dict:
    """In a fresh process: read the simulated data and type it; timings and peak memory of this process."""
    import anndata as ad

    from spatial_assets.celltyping import identify_cell_types
    from spatial_assets.params import CellTypingParams

    d = Path(out_dir)
    slide = ad.read_h5ad(d / "slide.h5ad")
    refA = ad.read_h5ad(d / "reference.h5ad")
    cells = pd.read_csv(d / "cells.csv", index_col=0)
    props = pd.read_csv(d / "props.csv", index_col=0)
    t = time.perf_counter()
    res = identify_cell_types(slide, refA, "cell_type", cells[["x", "y", "spot"]], CellTypingParams(seed=seed))
    sec = time.perf_counter() - t
    W = res.weights.reindex(columns=props.columns, fill_value=0).loc[props.index]
    truth = cells["true_type"]
    umi = np.asarray(slide.X.sum(1)).ravel()
    return {
        "scale_n_spots": int(slide.n_obs),
        "scale_n_cells": int(len(cells)),
        "scale_n_genes": int(slide.n_vars),
        "scale_n_types": int(res.weights.shape[1]),
        "scale_genes_used": len(res.genes_used),
        "scale_median_spot_umi": float(np.median(umi)),
        "scale_seconds_total": sec,
        "scale_seconds_by_phase": {k: round(v, 2) for k, v in res.info["timings_s"].items()},
        "scale_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
        "scale_sweeps": res.info["potts"]["sweeps"],
        "scale_labels_changed_per_sweep": res.info["potts"]["labels_changed_per_sweep"],
        "scale_sigma": res.sigma,
        "scale_proportion_rmse": float(np.sqrt(((W - props) ** 2).to_numpy().mean())),
        "scale_accuracy_potts": float((res.cells["cell_type"] == truth).mean()),
        "scale_accuracy_baseline_top_type": float((res.cells["initial_type"] == truth).mean()),
    }


def _child(code: str, env: dict) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
    if out.returncode != 0:
        raise RuntimeError(f"scale benchmark failed:\n{out.stderr[-3000:]}")
    return out.stdout


def scale_run(
    n_spots: int = 5000,
    n_genes: int = 2000,
    n_types: int = 20,
    mean_cells: float = 5.0,
    seed: int = 0,
    threads: int = 2,
) -> dict:
    """The speed test: simulate in one subprocess, type in another (clean peak memory), ``threads`` threads."""
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(threads),
        NUMBA_NUM_THREADS=str(threads),
        OPENBLAS_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
    )
    pre = f"import json, sys; sys.path.insert(0, {str(REPO)!r}); from benchmarks import bench_celltyping as b; "
    with tempfile.TemporaryDirectory() as d:
        _child(pre + f"b._scale_simulate({d!r}, {n_spots:d}, {n_genes:d}, {n_types:d}, {mean_cells!r}, {seed:d})", env)
        t = time.perf_counter()
        stdout = _child(pre + f"print('RESULT' + json.dumps(b._scale_type({d!r}, {seed:d})))", env)
        wall = time.perf_counter() - t
    line = [ln for ln in stdout.splitlines() if ln.startswith("RESULT")][-1]
    res = json.loads(line[len("RESULT") :])
    res["scale_wall_seconds_process"] = wall
    res["scale_threads"] = threads
    return res


def run(quick: bool = False) -> dict:
    """All figures; ``quick`` uses a demo window and a 500-spot scale run."""
    crop = (0.0, 1200.0, 900.0, 2100.0) if quick else None
    out: dict = {}
    out.update(demo_accuracy("cell_class", crop_um=crop, min_cells_per_type=3 if quick else 5))
    out.update(demo_accuracy("cell_type", crop_um=crop, min_cells_per_type=3 if quick else 5))
    out.update(scale_run(n_spots=500 if quick else 5000))
    out["note"] = "timings on a shared machine (2 cores shared with other jobs)"
    return out


if __name__ == "__main__":
    res = run(quick="--quick" in sys.argv)
    for k, v in res.items():
        print(f"{k}: {v}")
