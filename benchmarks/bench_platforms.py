"""Benchmark of SpatialScope's other platforms: Slide-seq beads (RCTD doublet mode), imaging panels (MERFISH
imputation of unmeasured genes), aligned slices (3D Potts neighbours).

* Beads, demo: every bead is 1 real osmFISH cell of the demo tissue, or 2 neighbouring cells of different types
  (:func:`spatial_assets.datasets.simulate_beads`); the demo reference (the other half of the cells) types them at
  the fine level (31 types) with RCTD's classes (``cell_class``). Singlet/doublet accuracy (against "all singlets"),
  doublet recall, reject rate, type precision / recall (types and classes), AUC of the doublet evidence; also
  at lower thresholds than RCTD's (10, 25), because 33 genes x ~190 molecules give little evidence.
* Beads, MOp: the same from real MOp scRNA-seq cells (500 genes, 12 classes; spatial_assets/datasets/data/dot-mop-scrna), half reference,
  half beads (random pairs of cells of different classes) -- a Slide-seq-like depth and panel.
* Speed: doublet mode on 20,000 MOp beads (all pair fits batched).
* Imaging: the demo's tissue cells measured on 22 of 33 genes (seeded panels), typed (RCTD + Potts), decomposed
  with the unmeasured genes imputed: Pearson r per held-out gene against the real counts, versus a library-size
  baseline (reference mean profile x the cell's measured total) and a type-mean baseline (the called type's
  mean profile x total), on panel seeds 0, 1, 2; the default estimator (``mixture``: responsibility-weighted
  reference clusters of the called type given the measured genes, as the asset graph runs it) and the published
  annealed Langevin estimator with the analytic Gaussian prior (1, 3, 10 replicates; 1, 3 in ``--quick``) and a
  trained score model (not in ``--quick``).
* Slices: the demo tissue split into two interleaved halves (two "slices", same x-y frame) typed per slice (2D
  Potts) or jointly with z 10 um apart (3D Potts neighbours), type accuracy of each, and the share of neighbours
  across slices.

``python -m benchmarks.bench_platforms [--quick] [--imaging]`` (``--imaging``: that section alone). Timings were taken on a shared, loaded 2-core machine.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np

from spatial_assets.datasets import data_path

REPO = Path(__file__).resolve().parent.parent
MOP = data_path("dot-mop-scrna", "mop_scrna_ref_500genes.h5ad")


def _demo(quick: bool):
    from spatial_assets.datasets import build_demo

    tmp = tempfile.mkdtemp(prefix="bench_platforms_")
    p = build_demo(Path(tmp) / "demo", seed=0)
    return ad.read_h5ad(p.truth_cells), ad.read_h5ad(p.reference)


def _round(d: dict) -> dict:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items() if not isinstance(v, dict)}


def beads_demo(truth, ref, quick: bool) -> dict:
    from spatial_assets.celltyping import classify_beads, identify_cell_types
    from spatial_assets.datasets import simulate_beads
    from spatial_assets.params import CellTypingParams
    from spatial_assets.platforms import cells_from_spots, evaluate_beads

    slide, tr = simulate_beads(truth, seed=1, n_beads=400 if quick else None)
    cells, _, _ = cells_from_spots(slide, "slideseq")
    captured = {}
    import spatial_assets.celltyping._doublets as D

    orig = D.classify_beads

    def keep(*a, **k):
        captured["a"], captured["k"] = a, k
        return orig(*a, **k)

    D.classify_beads = keep
    try:
        t = time.perf_counter()
        res = identify_cell_types(
            slide,
            ref,
            "cell_type",
            cells,
            CellTypingParams(min_cells_per_type=5, sigma_fit_min_umi=50),
            mode="doublet",
            class_key="cell_class",
        )
        sec = time.perf_counter() - t
    finally:
        D.classify_beads = orig
    tc = res.info["type_classes"]
    ev = evaluate_beads(res.beads, tr, type_class=tc)
    out = {f"beads_demo.{k}": v for k, v in _round(ev).items()}
    umi = float(np.median(np.asarray(slide.X.sum(1)).ravel()))
    out.update(
        {
            "beads_demo.n_beads": slide.n_obs,
            "beads_demo.median_umi": umi,
            "beads_demo.trivial_class_accuracy": round(1 - ev["true_doublet_fraction"], 4),
            "beads_demo.sigma": res.sigma,
            "beads_demo.seconds_total": round(sec, 2),
            "beads_demo.seconds_doublet_mode": round(res.info["doublet_mode"]["seconds"], 2),
        }
    )
    a, k = captured["a"], dict(captured["k"])
    for ct, dt in ((3.0, 10.0), (1.0, 3.0)):
        k.update(confidence_threshold=ct, doublet_threshold=dt)
        ev2 = evaluate_beads(classify_beads(*a, **k).beads, tr, type_class=tc)
        for m in (
            "class_accuracy",
            "doublet_recall",
            "singlet_recall",
            "reject_rate",
            "type_precision",
            "type_recall",
            "class_level_type_precision",
        ):
            out[f"beads_demo.thresholds_{ct:g}_{dt:g}.{m}"] = round(ev2[m], 4)
    return out


def beads_mop(quick: bool) -> dict:
    from spatial_assets.celltyping import identify_cell_types
    from spatial_assets.datasets import simulate_beads
    from spatial_assets.params import CellTypingParams
    from spatial_assets.platforms import cells_from_spots, evaluate_beads

    a = ad.read_h5ad(MOP)
    half = np.random.default_rng(0).random(a.n_obs) < 0.5
    ref, pool = a[half].copy(), a[~half].copy()
    slide, tr = simulate_beads(
        pool,
        type_key="cell_class",
        class_key="cell_class",
        seed=1,
        n_beads=500 if quick else 2500,
        random_positions=True,
        max_pair_distance_um=1e9,
        pair_by="class",
    )
    cells, _, _ = cells_from_spots(slide, "slideseq")
    t = time.perf_counter()
    res = identify_cell_types(slide, ref, "cell_class", cells, CellTypingParams(), mode="doublet")
    sec = time.perf_counter() - t
    ev = evaluate_beads(res.beads, tr)
    out = {f"beads_mop.{k}": v for k, v in _round(ev).items()}
    umi = float(np.median(np.asarray(slide.X.sum(1)).ravel()))
    out.update(
        {
            "beads_mop.n_beads": slide.n_obs,
            "beads_mop.median_umi": umi,
            "beads_mop.trivial_class_accuracy": round(1 - ev["true_doublet_fraction"], 4),
            "beads_mop.sigma": res.sigma,
            "beads_mop.seconds_total": round(sec, 2),
        }
    )
    return out


def doublet_speed(quick: bool) -> dict:
    """classify_beads alone (full-mode weights, all single and pair fits, decisions) on many MOp beads."""
    import torch

    from spatial_assets.celltyping import classify_beads, reference_profiles
    from spatial_assets.datasets import simulate_beads

    a = ad.read_h5ad(MOP)
    half = np.random.default_rng(0).random(a.n_obs) < 0.5
    ref, pool = a[half].copy(), a[~half].copy()
    types = sorted(ref.obs["cell_class"].astype(str).unique())
    codes = np.searchsorted(types, ref.obs["cell_class"].astype(str).to_numpy())
    P = np.asarray(reference_profiles(ref.X, codes, types))
    n = 2000 if quick else 20000
    # beads from real cells drawn with replacement (the pool has ~5,700 cells)
    rng = np.random.default_rng(2)
    big = pool[rng.integers(0, pool.n_obs, n + n // 2)].copy()
    big.obs_names_make_unique()
    slide, _ = simulate_beads(
        big, type_key="cell_class", class_key=None, seed=3, n_beads=n, random_positions=True, max_pair_distance_um=1e9
    )
    Y = slide.X.toarray().astype(float)
    numi = Y.sum(1)
    torch.set_num_threads(2)
    t = time.perf_counter()
    res = classify_beads(Y, numi, P, 0.6, types)
    sec = time.perf_counter() - t
    return {
        "doublet_speed.beads": int(slide.n_obs),
        "doublet_speed.genes": int(Y.shape[1]),
        "doublet_speed.types": len(types),
        "doublet_speed.seconds": round(sec, 2),
        "doublet_speed.beads_per_second": round(slide.n_obs / sec, 1),
        "doublet_speed.pair_fits": res.info["rows_fitted"]["pairs"],
        "doublet_speed.single_fits": res.info["rows_fitted"]["singles"],
    }


def imaging(truth, ref, quick: bool) -> dict:
    import torch

    from spatial_assets import decomposition as dec
    from spatial_assets.celltyping import identify_cell_types
    from spatial_assets.datasets import simulate_imaging_sample
    from spatial_assets.generative import GaussianScoreModel, train_score_model
    from spatial_assets.params import CellTypingParams, DecompositionParams, ScoreModelParams
    from spatial_assets.platforms import cells_from_spots, imputation_scores

    torch.set_num_threads(2)
    out: dict = {}
    cells_ad = truth if not quick else truth[np.sort(np.random.default_rng(0).permutation(truth.n_obs)[:700])].copy()
    gauss = GaussianScoreModel.from_reference(
        ref,
        "cell_type",
        target_sum=float(np.median(np.asarray(ref.X.sum(1)).ravel())),
        sigmas=np.geomspace(50, 0.002, 40),
    )
    trained = None
    if not quick:
        p = ScoreModelParams(
            sigma_begin=50,
            sigma_end=0.002,
            sampling_step=3e-7,
            n_sigmas=40,
            train_steps=1000,
            save_every=1000,
            hidden=128,
            n_blocks=2,
            mixed_precision=False,
        )
        t = time.perf_counter()
        trained = train_score_model(ref, "cell_type", p, Path(tempfile.mkdtemp()) / "ckpt", log=lambda m: None)
        out["imaging.score_model_train_seconds"] = round(time.perf_counter() - t, 1)
    # the default estimator (as the asset graph runs it): mixture prior fitted on the reference
    t = time.perf_counter()
    prior = dec.fit_mixture_prior(ref, gauss, n_components=DecompositionParams().mixture_components, seed=0)
    out["imaging.mixture_prior_seconds"] = round(time.perf_counter() - t, 2)
    rows = []
    for panel_seed in (0, 1, 2):
        slide, held = simulate_imaging_sample(cells_ad, n_measured=22, seed=panel_seed)
        cells, _, _ = cells_from_spots(slide, "merfish")
        typed = identify_cell_types(
            slide, ref, "cell_type", cells, CellTypingParams(min_cells_per_type=5, sigma_fit_min_umi=50)
        )
        true_t = cells_ad.obs["cell_type"].astype(str).reindex(typed.cells["spot"]).to_numpy()
        acc = float((typed.cells["cell_type"].to_numpy() == true_t).mean())
        out["imaging.cells_untyped"] = int((typed.cells["cell_type"] == "unassigned").sum())
        runs = [("mixture", gauss, 1)] + [("gaussian", gauss, r) for r in ((1, 3) if quick else (1, 3, 10))]
        if trained is not None:
            runs.append(("trained", trained, 3))
        typed_cells = typed.cells[typed.cells["cell_type"] != "unassigned"]  # skipped: no informative counts
        for name, model, R in runs:
            inputs = dec.prepare_spots(slide, typed_cells, model, typed.platform_effect)
            t = time.perf_counter()
            if name == "mixture":
                res = dec.decompose(inputs, model, DecompositionParams(seed=panel_seed), prior=prior)
            else:
                res = dec.decompose(
                    inputs, model, DecompositionParams(estimator="langevin", n_replicates=R, seed=panel_seed)
                )
            sec = time.perf_counter() - t
            sc = imputation_scores(res.adata, cells_ad, held, reference=ref)
            rows.append((panel_seed, name, R, acc, sc, sec))
    import pandas as pd

    df = pd.DataFrame(
        [
            {
                "panel": p,
                "model": m,
                "replicates": R,
                "type_accuracy": acc,
                "seconds": s,
                "r": sc["r_median"],
                "r_log1p": sc["r_log1p_median"],
                "r_pooled": sc["r_pooled_log1p"],
                "mean_r": sc["baseline_mean_r_median"],
                "type_mean_r": sc["baseline_type_mean_r_median"],
                "type_mean_r_log1p": sc["baseline_type_mean_r_log1p_median"],
            }
            for p, m, R, acc, sc, s in rows
        ]
    )
    agg = df.groupby(["model", "replicates"]).mean(numeric_only=True)
    for (m, R), row in agg.iterrows():
        for c in ("r", "r_log1p", "r_pooled", "seconds"):
            out[f"imaging.{m}_R{R}.{c}"] = round(float(row[c]), 4)
    # per panel: the default (mixture) beside the type mean (same typed cells, same measured library)
    for _, row in df[df["model"] == "mixture"].iterrows():
        p = int(row["panel"])
        out[f"imaging.panel{p}.mixture.r"] = round(float(row["r"]), 4)
        out[f"imaging.panel{p}.mixture.r_log1p"] = round(float(row["r_log1p"]), 4)
        out[f"imaging.panel{p}.type_mean.r"] = round(float(row["type_mean_r"]), 4)
        out[f"imaging.panel{p}.type_mean.r_log1p"] = round(float(row["type_mean_r_log1p"]), 4)
    first = agg.iloc[0]
    out.update(
        {
            "imaging.cells": int(cells_ad.n_obs),
            "imaging.measured_genes": 22,
            "imaging.held_out_genes": 11,
            "imaging.panels": int(df["panel"].nunique()),
            "imaging.type_accuracy_fine": round(float(first["type_accuracy"]), 4),
            "imaging.baseline_mean.r": round(float(first["mean_r"]), 4),
            "imaging.baseline_type_mean.r": round(float(first["type_mean_r"]), 4),
            "imaging.baseline_type_mean.r_log1p": round(float(first["type_mean_r_log1p"]), 4),
        }
    )
    return out


def slices(truth, ref, quick: bool) -> dict:
    from spatial_assets.celltyping import identify_cell_types
    from spatial_assets.params import CellTypingParams
    from spatial_assets.platforms import (
        cells_from_spots,
        cross_slice_fraction,
        simulate_imaging_sample,
        stack_slices,
        unstack_result,
    )

    params = CellTypingParams(min_cells_per_type=5, sigma_fit_min_umi=50)
    rng = np.random.default_rng(0)
    idx = rng.permutation(truth.n_obs)
    if quick:
        idx = idx[:800]
    parts = {"s0": np.sort(idx[::2]), "s1": np.sort(idx[1::2])}
    data, um = {}, {}
    for name, part in parts.items():
        s, _ = simulate_imaging_sample(truth[part], measured_genes=list(truth.var_names), um_per_px=0.8)
        data[name] = (s, cells_from_spots(s, "merfish")[0])
        um[name] = 0.8
    true_type = truth.obs["cell_type"].astype(str)

    def accuracy(cells):
        return float((cells["cell_type"].to_numpy() == true_type.reindex(cells["spot"]).to_numpy()).mean())

    out = {"slices.cells_per_slice": int(len(parts["s0"]))}
    t = time.perf_counter()
    acc2d = [accuracy(identify_cell_types(s, ref, "cell_type", c, params).cells) for s, c in data.values()]
    out["slices.seconds_2d"] = round(time.perf_counter() - t, 2)
    out["slices.type_accuracy_2d"] = round(float(np.mean(acc2d)), 4)
    for dz in (10.0, 1000.0):
        joint, jc = stack_slices(data, {"s0": 0.0, "s1": dz}, um)
        t = time.perf_counter()
        res = identify_cell_types(joint, ref, "cell_type", jc, params)
        sec = time.perf_counter() - t
        acc = [accuracy(unstack_result(res, n, um[n]).cells) for n in data]
        out[f"slices.dz{dz:g}.type_accuracy_3d"] = round(float(np.mean(acc)), 4)
        out[f"slices.dz{dz:g}.cross_slice_neighbour_fraction"] = round(
            cross_slice_fraction(jc[["x", "y", "z"]].to_numpy(), jc["slice"], params.n_neighbors), 4
        )
        out[f"slices.dz{dz:g}.seconds"] = round(sec, 2)
    return out


def run(quick: bool = False, only: str | None = None) -> dict:
    """All figures; ``quick`` uses fewer beads / cells, fewer Langevin runs and no trained score model.

    ``only="imaging"`` runs the imaging section alone.
    """
    truth, ref = _demo(quick)
    if only == "imaging":
        return imaging(truth, ref, quick)
    out: dict = {}
    out.update(beads_demo(truth, ref, quick))
    out.update(beads_mop(quick))
    out.update(doublet_speed(quick))
    out.update(imaging(truth, ref, quick))
    out.update(slices(truth, ref, quick))
    out["note"] = "timings on a shared, loaded 2-core machine"
    return out


if __name__ == "__main__":
    res = run(quick="--quick" in sys.argv, only="imaging" if "--imaging" in sys.argv else None)
    for k, v in res.items():
        print(f"{k}: {v}")
