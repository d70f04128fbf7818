"""Decomposition on realistic slides: the default estimator against the simple splits, on the same cells.

Slides: :func:`spatial_assets.datasets.build_realistic_slide` (real MOp 500-gene cells at real osmFISH positions,
Visium 55-um spots), seeds 0, 1, 2 (``--quick``: the same seeds on a dense 1 x 1 mm crop). Reference = the disjoint MOp half. Two
levels: class (12 types, ``cell_class``) and subtype (44 types, ``cell_type``).

Mode "true cells": every true cell inside a spot, with its true type, is decomposed (segmentation and typing are
taken out to measure the decomposition alone; so the same-types split here *is* the oracle split with true types).
Mode "segmented" (``--no-segmented`` skips it): the slide's H&E is segmented by the project's default model
(bundled H&E StarDist with its own thresholds), the nuclei typed by ``celltyping.identify_cell_types`` (defaults but ``min_cells_per_type=10``)
at each level and decomposed by the default; decomposed cells are matched one-to-one to true cells within 4 um,
the matched fraction of the true cells in spots is reported, and the rows are scored on the matched cells: the
mixture, the proportional split by the same *predicted* types (the same-input baseline), type mean, spot / n, and
the oracle split (true cells, true types) on the same true cells.

Rows, all on the same cells, log1p, median Pearson r per gene (across cells) and per cell (across genes):
``mixture`` (the default, ``DecompositionParams()``), ``langevin_gaussian`` (the published annealed-Langevin
posterior mean, 3 replicates, with the analytic per-type Gaussian prior as the score model; ``level_stride`` 4, or
8 with ``--quick``; a trained score network is not run here for CPU time), ``split`` (proportional split by type
means ``expm1(mean log1p)``, the project's type means), ``split_library`` (the same split with each type's
mean scaled by the type's mean raw reference library: types with more RNA per cell take larger shares),
``split_arithmetic`` (the same split by the arithmetic
mean of the reference's normalised expression per type: the mixture with one cluster per type and no size
factors), ``*_log1p_posterior`` (the same shares, reported as the posterior mean of log1p under the binomial
allocation of the spot's molecules: the mixture's ``layers['log1p_posterior']``, and the same transform applied to
the split's shares, for a like-for-like baseline), ``type_mean`` (type means scaled to the spot), ``spot_over_n`` (spot / n cells).
Leave-genes-out: genes hidden from the likelihood in 3 folds; hidden-gene r of ``mixture`` vs ``type_mean``.
Calibration: Spearman of the mixture's per-cell spread vs its per-cell mean abs log1p error (cells in spots of >= 2
cells), and the error by spread quintile.

Speed: the default estimator on a synthetic range of 500 spots x 5 cells x 2,000 genes (100 spots with
``--quick``), wall and CPU seconds.

Run: ``python -m benchmarks.bench_realistic_decomposition [--quick] [--no-segmented]``; writes
``benchmarks/results/realistic_decomposition{_quick}.json|.md|.png``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
LEVELS = {"class": "cell_class", "subtype": "cell_type"}
QUICK_CROP = (300.0, 1500.0, 1300.0, 2500.0)  # a dense 1 x 1 mm window (~150 spots, ~600 cells in spots)
METHODS = (
    "mixture",
    "mixture_log1p_posterior",
    "langevin_gaussian",
    "split",
    "split_arithmetic",
    "split_library",
    "split_log1p_posterior",
    "type_mean",
    "spot_over_n",
)
SEG_METHODS = ("mixture", "split", "split_library", "type_mean", "spot_over_n", "oracle_split")


def _library_profiles(ref, key: str, model) -> np.ndarray:
    """Type means ``expm1(mean log1p)`` times each type's mean raw reference library (relative to the mean)."""
    import pandas as pd

    lib = np.asarray(ref.X.sum(1), dtype=np.float64).ravel()
    tl = pd.Series(lib).groupby(ref.obs[key].astype(str).to_numpy()).mean().reindex(list(model.cell_types))
    prof = np.expm1(model.type_means.detach().cpu().numpy().astype(np.float64))
    return prof * (tl.to_numpy() / lib.mean())[:, None]


def _slide(seed: int, quick: bool, workdir: Path):
    import anndata as ad

    from spatial_assets.datasets import build_realistic_slide

    crop = QUICK_CROP if quick else None
    p = build_realistic_slide(workdir / f"s{seed}{'q' if quick else ''}", seed=seed, crop_um=crop)
    return ad.read_h5ad(p.slide), ad.read_h5ad(p.truth_cells), ad.read_h5ad(p.reference), p


def _scores(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    from spatial_assets.metrics import pearson_columns

    lp, lt = np.log1p(np.clip(pred, 0, None)), np.log1p(truth)
    return float(np.nanmedian(pearson_columns(lp, lt))), float(np.nanmedian(pearson_columns(lp.T, lt.T)))


def _log_posterior(inp, pred: np.ndarray, scale: np.ndarray, si: np.ndarray) -> np.ndarray:
    """expm1 of E[log1p] under the binomial allocation of each spot's raw molecules by ``pred``'s shares."""
    from spatial_assets.decomposition import binomial_log1p_moments

    ss = np.zeros((inp.n_spots, pred.shape[1]))
    np.add.at(ss, si, pred)
    w = pred / np.where(ss > 0, ss, 1)[si]
    raw = (inp.counts * inp.platform_effect)[si]
    k = scale[si, None] / np.where(inp.platform_effect > 0, inp.platform_effect, 1)[None, :]
    m, _ = binomial_log1p_moments(raw, w, k)
    out = np.log1p(np.clip(pred, 0, None))
    cols = inp.in_slide
    out[:, cols] = m[:, cols]
    return np.expm1(out)


def evaluate_slide(slide, truth, ref, key: str, quick: bool) -> dict:
    """All rows of one slide at one level (see the module docstring)."""
    import pandas as pd
    import scipy.sparse as sp
    from scipy.stats import spearmanr

    from spatial_assets.decomposition import (
        baseline_type_mean,
        decompose,
        fit_mixture_prior,
        prepare_spots,
        reference_type_profiles,
    )
    from spatial_assets.decomposition._inputs import _targets
    from spatial_assets.generative import GaussianScoreModel
    from spatial_assets.params import DecompositionParams

    lib = np.asarray(ref.X.sum(1)).ravel()
    model = GaussianScoreModel.from_reference(ref, key, target_sum=float(np.median(lib)))
    tc = truth.obs
    inside = tc["spot"].astype(str) != ""
    cells = pd.DataFrame(
        {
            "spot": tc.loc[inside, "spot"].astype(str),
            "cell_type": tc.loc[inside, key].astype(str),
            "x": tc.loc[inside, "x"],
            "y": tc.loc[inside, "y"],
        }
    )
    inp = prepare_spots(slide, cells, model)
    params = DecompositionParams()
    t0 = time.perf_counter()
    prior = fit_mixture_prior(ref, model, key, n_components=params.mixture_components, seed=params.seed)
    res = decompose(inp, model, params, prior=prior)
    t_mix = time.perf_counter() - t0
    t0 = time.perf_counter()
    lang = decompose(inp, model, DecompositionParams(estimator="langevin", level_stride=8 if quick else 4))
    t_lang = time.perf_counter() - t0

    target, scale, _ = _targets(inp, model, np.zeros(len(inp.genes), bool))
    si = inp.cells["spot_idx"].to_numpy(np.int64)
    T = truth[inp.cells.index, inp.genes].X
    T = (T.toarray() if sp.issparse(T) else np.asarray(T)).astype(np.float64) / inp.platform_effect
    T = T * scale[si, None]  # truth in the decomposition's scale
    n = inp.spots["n_cells"].to_numpy(float)
    preds = {
        "mixture": np.asarray(res.adata.X, np.float64),
        "langevin_gaussian": np.asarray(lang.adata.X, np.float64),
        "mixture_log1p_posterior": np.expm1(np.asarray(res.adata.layers["log1p_posterior"], np.float64)),
        "split": baseline_type_mean(inp, model, per_gene=True),
        "split_arithmetic": baseline_type_mean(inp, model, per_gene=True, profiles=reference_type_profiles(prior)),
        "split_library": baseline_type_mean(inp, model, per_gene=True, profiles=_library_profiles(ref, key, model)),
        "type_mean": baseline_type_mean(inp, model),
        "spot_over_n": target[si] / n[si, None],
    }
    preds["split_log1p_posterior"] = _log_posterior(inp, preds["split"], scale, si)
    out: dict = {"cells": inp.n_cells, "spots": inp.n_spots, "mixture_seconds": t_mix, "langevin_seconds": t_lang}
    # the oracle split (true cells, true types) by cell id, with its truth, for the segmented mode's matched cells
    out["_oracle"] = (inp.cells.index.astype(str).to_numpy(), preds["split"], T)
    multi = n[si] > 1
    for m, p in preds.items():
        g, c = _scores(p, T)
        gm, cm = _scores(p[multi], T[multi])
        out[m] = {"gene_r": g, "cell_r": c, "gene_r_multi": gm, "cell_r_multi": cm}

    # calibration of the mixture's per-cell spread (cells sharing a spot)
    err = np.abs(np.log1p(preds["mixture"]) - np.log1p(T)).mean(1)[multi]
    spread = res.adata.obs["replicate_spread"].to_numpy(float)[multi]
    rho = spearmanr(spread, err).statistic
    q = np.quantile(spread, np.linspace(0, 1, 6))
    b = np.clip(np.searchsorted(q, spread, side="right") - 1, 0, 4)
    out["calibration"] = {
        "spearman_spread_vs_abs_error": float(rho),
        "abs_error_by_spread_quintile": [float(err[b == k].mean()) for k in range(5)],
        "spread_quintile_edges": [float(v) for v in q],
    }
    lspread = lang.adata.obs["replicate_spread"].to_numpy(float)[multi]
    lerr = np.abs(np.log1p(preds["langevin_gaussian"]) - np.log1p(T)).mean(1)[multi]
    out["calibration"]["langevin_spearman_spread_vs_abs_error"] = float(spearmanr(lspread, lerr).statistic)

    # leave genes out (3 folds): hidden genes' recovery, mixture vs type mean
    genes = np.asarray(inp.genes)[inp.in_slide]
    held = np.full_like(T, np.nan)
    held_tm = np.full_like(T, np.nan)
    for f in range(3):
        fold = list(genes[f::3])
        cols = np.isin(inp.genes, fold)
        rf = decompose(inp, model, params.model_copy(update={"leave_out_genes": fold}), prior=prior)
        held[:, cols] = rf.adata.X[:, cols]
        held_tm[:, cols] = baseline_type_mean(inp, model, leave_out_genes=fold)[:, cols]
    # scale of hidden genes: truth scaled with the spot's scale from all genes; compare within-gene (Pearson)
    cols = np.isin(inp.genes, genes)
    out["heldout_mixture_gene_r"] = _scores(held[:, cols], T[:, cols])[0]
    out["heldout_type_mean_gene_r"] = _scores(held_tm[:, cols], T[:, cols])[0]
    return out


def segment(paths) -> tuple:
    """The project's default nuclei segmentation of the slide's H&E (bundled H&E StarDist, its own thresholds).

    Returns the cells table (assigned to spots, nucleus features), the segmentation summary and seconds.
    """
    import anndata as ad
    import tifffile

    from spatial_assets.params import SegmentationParams
    from spatial_assets.segmentation import segment_slide

    prm = SegmentationParams(model="bundled:stardist_he", prob_thresh=None, nms_thresh=None, min_umi=20)
    img = tifffile.imread(paths.image)[..., :3]
    t0 = time.perf_counter()
    _, cells, _, summary = segment_slide(img, ad.read_h5ad(paths.slide), prm)
    return cells, summary, time.perf_counter() - t0


def evaluate_segmented(slide, truth, ref, key: str, cells, um_per_px: float, oracle) -> dict:
    """Segmented mode: segmented nuclei typed by the project (``identify_cell_types``), decomposed by the default.

    Decomposed cells are matched one-to-one to the nearest true cell within 4 um (closest wins); scores on the
    matched cells against their true expression, for the mixture and the proportional split by the same
    *predicted* types (the same-input baseline), the type mean and spot / n; the oracle row is the true-cells
    mode's split with true types on the same matched true cells (its own scale).
    """
    import pandas as pd
    import scipy.sparse as sp
    from scipy.spatial import cKDTree

    from spatial_assets.celltyping import identify_cell_types
    from spatial_assets.decomposition import baseline_type_mean, decompose, fit_mixture_prior, prepare_spots
    from spatial_assets.decomposition._inputs import _targets
    from spatial_assets.generative import GaussianScoreModel
    from spatial_assets.params import CellTypingParams, DecompositionParams

    t0 = time.perf_counter()
    # defaults, except min_cells_per_type (the subtype reference's smallest types hold 13-23 cells)
    typed = identify_cell_types(slide, ref, key, cells, CellTypingParams(min_cells_per_type=10))
    t_typing = time.perf_counter() - t0
    tcells = typed.cells
    lib = np.asarray(ref.X.sum(1)).ravel()
    model = GaussianScoreModel.from_reference(ref, key, target_sum=float(np.median(lib)))
    inp = prepare_spots(slide, tcells, model, typed.platform_effect)
    params = DecompositionParams()
    prior = fit_mixture_prior(ref, model, key, n_components=params.mixture_components, seed=params.seed)
    res = decompose(inp, model, params, prior=prior)
    target, scale, _ = _targets(inp, model, np.zeros(len(inp.genes), bool))
    si = inp.cells["spot_idx"].to_numpy(np.int64)
    n = inp.spots["n_cells"].to_numpy(float)
    preds = {
        "mixture": np.asarray(res.adata.X, np.float64),
        "split": baseline_type_mean(inp, model, per_gene=True),
        "split_library": baseline_type_mean(inp, model, per_gene=True, profiles=_library_profiles(ref, key, model)),
        "type_mean": baseline_type_mean(inp, model),
        "spot_over_n": target[si] / n[si, None],
    }
    # one-to-one matching to true cells inside spots (nearest within 4 um; the closest decomposed cell wins)
    tin = truth.obs[truth.obs["spot"].astype(str) != ""]
    d, j = cKDTree(tin[["x", "y"]].to_numpy(float)).query(inp.cells[["x", "y"]].to_numpy(float))
    ok = d * um_per_px < 4.0
    order = np.lexsort((d, j))
    first = np.zeros(len(j), bool)
    jj = j[order]
    first[order[np.r_[True, jj[1:] != jj[:-1]]]] = True
    ok &= first
    rows = np.flatnonzero(ok)
    tid = tin.index[j[rows]].astype(str)
    T = truth[tid, inp.genes].X
    pe = np.asarray(inp.platform_effect, float)
    T = (T.toarray() if sp.issparse(T) else np.asarray(T)).astype(np.float64) / pe * scale[si[rows], None]
    true_type = tin[key].astype(str).to_numpy()[j[rows]]
    pred_type = inp.cells["cell_type"].astype(str).to_numpy()[rows]
    out: dict = {
        "true_cells_in_spots": int(len(tin)),
        "segmented_cells": int(len(cells)),
        "decomposed_cells": int(inp.n_cells),
        "matched_cells": int(len(rows)),
        "matched_fraction": float(len(rows) / max(len(tin), 1)),
        "unassigned_cells": int((tcells["cell_type"].astype(str) == "unassigned").sum()),
        "type_accuracy_matched": float((pred_type == true_type).mean()) if len(rows) else float("nan"),
        "typing_seconds": t_typing,
    }
    for m, pr in preds.items():
        g, c = _scores(pr[rows], T)
        out[m] = {"gene_r": g, "cell_r": c}
    oid, opred, otruth = oracle
    pos = pd.Index(oid).get_indexer(tid)
    have = pos >= 0
    g, c = _scores(opred[pos[have]], otruth[pos[have]])
    out["oracle_split"] = {"gene_r": g, "cell_r": c}
    out["oracle_cells"] = int(have.sum())
    return out


def speed(n_spots: int = 500, cells_per_spot: int = 5, n_genes: int = 2000, n_types: int = 20) -> dict:
    """Wall and CPU time of the default mixture decomposition on a synthetic range (counts drawn from the prior)."""
    import anndata as ad
    import pandas as pd

    from spatial_assets.decomposition import decompose, fit_mixture_prior, prepare_spots
    from spatial_assets.generative import GaussianScoreModel
    from spatial_assets.params import DecompositionParams

    rng = np.random.default_rng(0)
    genes = [f"g{i}" for i in range(n_genes)]
    types = [f"t{i}" for i in range(n_types)]
    base = rng.gamma(0.5, 1.0, (n_types, n_genes))
    n_ref = 150 * n_types
    ref_t = np.repeat(np.arange(n_types), 150)
    ref_x = rng.poisson(base[ref_t] * rng.lognormal(0, 0.5, (n_ref, 1)) * 2000 / base.sum(1, keepdims=True)[ref_t])
    ref = ad.AnnData(ref_x.astype(np.float32), obs=pd.DataFrame({"cell_type": np.array(types)[ref_t]}))
    ref.var_names = genes
    ref.obs_names = [f"r{i}" for i in range(n_ref)]
    model = GaussianScoreModel.from_reference(ref, "cell_type", target_sum=2000.0)
    n_cells = n_spots * cells_per_spot
    ct = rng.integers(0, n_types, n_cells)
    spot = np.repeat(np.arange(n_spots), cells_per_spot)
    cx = rng.poisson(base[ct] * 2000 / base.sum(1, keepdims=True)[ct])
    sx = np.zeros((n_spots, n_genes))
    np.add.at(sx, spot, cx)
    slide = ad.AnnData(sx.astype(np.float32))
    slide.var_names = genes
    slide.obs_names = [f"s{i}" for i in range(n_spots)]
    cells = pd.DataFrame(
        {"spot": [f"s{i}" for i in spot], "cell_type": np.array(types)[ct]},
        index=[f"c{i}" for i in range(n_cells)],
    )
    inp = prepare_spots(slide, cells, model)
    params = DecompositionParams()
    t0, c0 = time.perf_counter(), time.process_time()
    prior = fit_mixture_prior(ref, model, n_components=params.mixture_components)
    t_prior = time.perf_counter() - t0
    res = decompose(inp, model, params, prior=prior)
    return {
        "size": f"{n_spots} spots x {cells_per_spot} cells x {n_genes} genes, {n_types} types x 16 clusters",
        "prior_seconds": round(t_prior, 1),
        "decompose_seconds": round(res.info["seconds_total"], 1),
        "total_wall_seconds": round(time.perf_counter() - t0, 1),
        "total_cpu_seconds": round(time.process_time() - c0, 1),
        "torch_threads": int(__import__("torch").get_num_threads()),
    }


def _figure(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, metric in zip(axes, ("gene_r", "cell_r")):
        x = np.arange(len(METHODS))
        for j, lvl in enumerate(LEVELS):
            vals = [summary[lvl][m][metric]["mean"] for m in METHODS]
            sds = [summary[lvl][m][metric]["sd"] for m in METHODS]
            ax.bar(x + (j - 0.5) * 0.38, vals, 0.38, yerr=sds, label=lvl)
        ax.set_xticks(x, METHODS, rotation=25, ha="right")
        ax.set_title(f"median per-{metric.split('_')[0]} r (log1p)")
        ax.set_ylim(0, 1)
        ax.legend()
    fig.suptitle("Decomposition on realistic slides (true cells, mean +- sd over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(quick: bool = False, out_dir: Path | None = None, segmented: bool = True) -> dict:
    """Every seed and level; mean and sd over seeds; JSON, markdown table and figure in benchmarks/results/.

    ``segmented``: also the segmented mode (nuclei segmented and typed by the project, matched to true cells).
    """
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    seeds = (0, 1, 2)
    workdir = Path(tempfile.mkdtemp(prefix="bench_realistic_decomp_"))
    per: dict = {lvl: {} for lvl in LEVELS}
    segm: dict = {lvl: {} for lvl in LEVELS}
    seg_info: dict = {}
    for s in seeds:
        slide, truth, ref, paths = _slide(s, quick, workdir)
        if segmented:
            seg_cells, seg_summary, seg_sec = segment(paths)
            seg_info[s] = {"seconds": seg_sec, "cells": int(len(seg_cells))}
            um = float(json.loads(Path(paths.info).read_text()).get("um_per_px", 0.8))
        for lvl, key in LEVELS.items():
            per[lvl][s] = evaluate_slide(slide, truth, ref, key, quick)
            oracle = per[lvl][s].pop("_oracle")
            r = per[lvl][s]
            print(
                f"seed {s} {lvl}: cells {r['cells']} | "
                + " | ".join(f"{m} {r[m]['gene_r']:.3f}/{r[m]['cell_r']:.3f}" for m in METHODS),
                flush=True,
            )
            if segmented:
                segm[lvl][s] = q = evaluate_segmented(slide, truth, ref, key, seg_cells, um, oracle)
                print(
                    f"seed {s} {lvl} segmented: matched {q['matched_cells']}/{q['true_cells_in_spots']} "
                    f"({q['matched_fraction']:.2f}), type accuracy {q['type_accuracy_matched']:.2f} | "
                    + " | ".join(f"{m} {q[m]['gene_r']:.3f}/{q[m]['cell_r']:.3f}" for m in SEG_METHODS),
                    flush=True,
                )
    summary: dict = {}
    for lvl in LEVELS:
        summary[lvl] = {}
        for m in METHODS:
            summary[lvl][m] = {}
            for k in ("gene_r", "cell_r", "gene_r_multi", "cell_r_multi"):
                v = np.array([per[lvl][s][m][k] for s in seeds])
                summary[lvl][m][k] = {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0}
        for k in ("gene_r", "cell_r"):
            for base in ("split", "split_arithmetic", "split_library"):
                d = np.array([per[lvl][s]["mixture"][k] - per[lvl][s][base][k] for s in seeds])
                summary[lvl][f"mixture_minus_{base}_{k}"] = {"mean": float(d.mean()), "min": float(d.min())}
        summary[lvl]["spearman_spread_vs_error"] = [
            per[lvl][s]["calibration"]["spearman_spread_vs_abs_error"] for s in seeds
        ]
        summary[lvl]["heldout_mixture_gene_r"] = [per[lvl][s]["heldout_mixture_gene_r"] for s in seeds]
        summary[lvl]["heldout_type_mean_gene_r"] = [per[lvl][s]["heldout_type_mean_gene_r"] for s in seeds]
    seg_summary_all: dict = {}
    if segmented:
        for lvl in LEVELS:
            d: dict = {}
            for m in SEG_METHODS:
                d[m] = {}
                for k in ("gene_r", "cell_r"):
                    v = np.array([segm[lvl][s][m][k] for s in seeds])
                    d[m][k] = {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0}
            for k in ("gene_r", "cell_r"):
                v = np.array([segm[lvl][s]["mixture"][k] - segm[lvl][s]["split"][k] for s in seeds])
                d[f"mixture_minus_split_{k}"] = {"mean": float(v.mean()), "min": float(v.min())}
            for k in ("matched_fraction", "type_accuracy_matched"):
                d[k] = [segm[lvl][s][k] for s in seeds]
            seg_summary_all[lvl] = d
    spd = speed(n_spots=100 if quick else 500)
    print(f"speed: {spd}", flush=True)
    res = {
        "quick": quick,
        "seeds": list(seeds),
        "mode": "true cells, true types",
        "summary": summary,
        "per_slide": per,
        "segmented": {"summary": seg_summary_all, "per_slide": segm, "segmentation": seg_info},
        "speed": spd,
    }

    out_dir = Path(out_dir or HERE / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "realistic_decomposition" + ("_quick" if quick else "")
    (out_dir / f"{stem}.json").write_text(json.dumps(res, indent=1, default=float))
    lines = [
        f"# Decomposition on realistic slides ({'quick' if quick else 'full'}; seeds {list(seeds)}; true cells)",
        "",
        "Median Pearson r on log1p, mean +- sd over seeds; all rows on the same cells.",
        "",
        "| level | method | per-gene r | per-cell r | per-gene r (multi-cell spots) | per-cell r (multi-cell spots) |",
        "|---|---|---|---|---|---|",
    ]
    for lvl in LEVELS:
        for m in METHODS:
            d = summary[lvl][m]
            cells = " | ".join(
                f"{d[k]['mean']:.3f} +- {d[k]['sd']:.3f}" for k in ("gene_r", "cell_r", "gene_r_multi", "cell_r_multi")
            )
            lines.append(f"| {lvl} | {m} | {cells} |")
    lines += [
        "",
        "| level | mixture - split, per-gene (mean, min over seeds) | per-cell | mixture - split_arithmetic, per-gene "
        "| per-cell | mixture - split_library, per-gene | per-cell | Spearman(spread, error) "
        "| held-out genes r: mixture / type mean |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for lvl in LEVELS:
        s = summary[lvl]
        g, c = s["mixture_minus_split_gene_r"], s["mixture_minus_split_cell_r"]
        ga, ca = s["mixture_minus_split_arithmetic_gene_r"], s["mixture_minus_split_arithmetic_cell_r"]
        gl, cl = s["mixture_minus_split_library_gene_r"], s["mixture_minus_split_library_cell_r"]
        lines.append(
            f"| {lvl} | {g['mean']:+.3f} ({g['min']:+.3f}) | {c['mean']:+.3f} ({c['min']:+.3f}) | "
            f"{ga['mean']:+.3f} ({ga['min']:+.3f}) | {ca['mean']:+.3f} ({ca['min']:+.3f}) | "
            f"{gl['mean']:+.3f} ({gl['min']:+.3f}) | {cl['mean']:+.3f} ({cl['min']:+.3f}) | "
            f"{', '.join(f'{v:.2f}' for v in s['spearman_spread_vs_error'])} | "
            f"{np.mean(s['heldout_mixture_gene_r']):.3f} / {np.mean(s['heldout_type_mean_gene_r']):.3f} |"
        )
    if segmented:
        lines += [
            "",
            "Segmented mode: nuclei segmented (bundled H&E StarDist) and typed (identify_cell_types) by the project, "
            "decomposed cells matched one-to-one to true cells within 4 um; scores on the matched cells; `split` "
            "= proportional split by the same predicted types; `oracle_split` = true cells, true types (same "
            "matched cells).",
            "",
            "| level | matched fraction | type accuracy (matched) | "
            + " | ".join(f"{m} gene / cell r" for m in SEG_METHODS)
            + " | mixture - split gene (min) | cell (min) |",
            "|---|---|---|" + "---|" * len(SEG_METHODS) + "---|---|",
        ]
        for lvl in LEVELS:
            d = seg_summary_all[lvl]
            g, c = d["mixture_minus_split_gene_r"], d["mixture_minus_split_cell_r"]
            lines.append(
                f"| {lvl} | {np.mean(d['matched_fraction']):.2f} | {np.mean(d['type_accuracy_matched']):.2f} | "
                + " | ".join(f"{d[m]['gene_r']['mean']:.3f} / {d[m]['cell_r']['mean']:.3f}" for m in SEG_METHODS)
                + f" | {g['mean']:+.3f} ({g['min']:+.3f}) | {c['mean']:+.3f} ({c['min']:+.3f}) |"
            )
    lines += ["", f"Speed of the default estimator: {spd}"]
    (out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    _figure(summary, out_dir / f"{stem}.png")
    print("\n".join(lines))
    flat = {}
    for lvl in LEVELS:
        for m in METHODS:
            flat[f"{lvl}_{m}_gene_r"] = round(summary[lvl][m]["gene_r"]["mean"], 4)
            flat[f"{lvl}_{m}_cell_r"] = round(summary[lvl][m]["cell_r"]["mean"], 4)
        flat[f"{lvl}_mixture_minus_split_gene_r_min"] = round(summary[lvl]["mixture_minus_split_gene_r"]["min"], 4)
        flat[f"{lvl}_mixture_minus_split_cell_r_min"] = round(summary[lvl]["mixture_minus_split_cell_r"]["min"], 4)
    flat.update({f"speed_{k}": v for k, v in spd.items()})
    return flat


if __name__ == "__main__":
    for k, v in run(quick="--quick" in sys.argv, segmented="--no-segmented" not in sys.argv).items():
        print(f"{k}: {v}")
