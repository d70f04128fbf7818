"""RCTD parity with a peer: this project's RCTD (spatial_assets.rctd / celltyping / doublets) against rctd-py.

rctd-py (https://github.com/p-gueguen/rctd-py, PyPI ``rctd-py``, a PyTorch port that matches R spacexr) is the
reference implementation. It is GPL-3, so it is used here only, as an optional dependency, through its public
API; none of its code is copied. Install it beside the project without touching the project's environment::

    python3.11 -m venv /path/venv
    echo /path/to/project/.venv/lib/python3.11/site-packages > /path/venv/lib/python3.11/site-packages/main.pth
    /path/venv/bin/pip install --no-deps rctd-py==0.4.0   # needs anndata, click, natsort, numpy, scipy, torch
    /path/venv/bin/python -m benchmarks.bench_rctd_parity [--quick] [--threads 1] [--q-cache DIR]

Without rctd-py the benchmark prints a message and exits 0.

rctd-py downloads its likelihood tables (404 MB) at run time, which cannot happen offline. They are built here
with rctd-py's own ``compute_q_matrix`` (K_val = 1000, as R) for a subset of its sigma grid
(:data:`Q_SIGMAS`, ~75 s each on one core, cached in ``--q-cache``) and handed to it through ``RCTD_Q_MATRICES``.
rctd-py's sigma search then walks that subset (its window of +-8 grid steps always holds a few of them), so its
sigma is quantised to the subset; the full-mode figures are also given at this project's sigma when it is in the
subset (``sigma_override``), which isolates the weight fit from the sigma choice.

Figures, on realistic slides (:func:`spatial_assets.realistic.build_realistic_slide`, by-type nuclei; spots hold
real MOp cells, truth = the fractions of each spot's cells per type):

* full mode, per seed and level: proportions RMSE vs truth of both (same spots: those both fit), their RMSE
  against each other, each one's sigma, and the weight-fitting wall time on CPU (gene selection, platform
  effect, sigma, weights; same thread count, one run each after a warm-up) and its ratio;
  at subtype level the reference's small types are dropped by ``prepare_reference_types`` (rctd-py's Reference
  drops types below 25 cells itself), so both see the same type list;
* doublet mode on Slide-seq-like beads (:func:`spatial_assets.platforms.simulate_beads` from the slide's true
  cells, class level): agreement of spot classes and first types, and each one's singlet/doublet accuracy and
  type recovery vs truth (:func:`spatial_assets.platforms.evaluate_beads`), same thresholds in both.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
# A subset of RCTD's sigma grid (x 100): the start (100), the path down to the realistic slides' sigmas
# (~0.6-0.7) and a margin around them.
Q_SIGMAS = (100, 92, 84, 76, 70, 67, 64, 61, 58, 54)
K_VAL = 1000


def rctd_available() -> tuple[bool, str]:
    try:
        import rctd  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the environment
        return False, f"rctd-py is not importable ({type(exc).__name__}: {exc})"
    return True, getattr(sys.modules["rctd"], "__version__", "?")


def build_q_matrices(path: str | os.PathLike, sigmas=Q_SIGMAS, k_val: int = K_VAL) -> Path:
    """rctd-py's likelihood tables for ``sigmas`` (x 100) with its own ``compute_q_matrix``, as the npz its
    loader reads (X_vals, Q_<sigma>). Reuses a file that already holds these sigmas at this K_val."""
    from rctd._likelihood import build_x_vals, compute_q_matrix

    path = Path(path)
    if path.is_dir() or not path.suffix:
        path = path / "q_matrices.npz"
    want = {f"Q_{int(s)}" for s in sigmas}
    if path.exists():
        with np.load(path) as z:
            have = set(z.files)
            if want <= have and z[next(iter(want))].shape[0] == k_val + 3:
                return path
    path.parent.mkdir(parents=True, exist_ok=True)
    x = build_x_vals()
    out = {"X_vals": x}
    for s in sigmas:
        t = time.perf_counter()
        out[f"Q_{int(s)}"] = compute_q_matrix(s / 100.0, x, K_val=k_val)
        print(f"  Q matrix sigma {s / 100:.2f}: {time.perf_counter() - t:.0f} s", flush=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **out)
    os.replace(tmp, path)
    return path


def _limit_threads(n: int) -> None:
    import numba
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(n)
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    threadpool_limits(n)


def _true_props(truth: pd.DataFrame, level: str) -> pd.DataFrame:
    t = truth[truth["spot"].astype(str) != ""]
    return pd.crosstab(t["spot"].astype(str), t[level].astype(str), normalize="index")


def _rmse(a: pd.DataFrame, b: pd.DataFrame) -> float:
    cols = sorted(set(a.columns) | set(b.columns))
    A = a.reindex(columns=cols, fill_value=0.0)
    B = b.reindex(index=A.index, columns=cols, fill_value=0.0)
    return float(np.sqrt(((A.to_numpy() - B.to_numpy()) ** 2).mean()))


def _ours_full(slide, ref, level, cells, params):
    from spatial_assets.celltyping import identify_cell_types

    t = time.perf_counter()
    res = identify_cell_types(slide, ref, level, cells, params)
    wall = time.perf_counter() - t
    tm = res.info["timings_s"]
    fit = tm["reference_and_genes"] + tm["platform_effect"] + tm["sigma_fit"] + tm["spot_weights"]
    return res, fit, wall


def _rctd_full(slide, ref, level, sigma_override=None):
    import contextlib
    import io

    import anndata as ad
    from rctd import RCTD, RCTDConfig, Reference
    from rctd._full import run_full_mode

    spatial = ad.AnnData(
        X=slide.X.copy(),
        obs=pd.DataFrame(index=slide.obs_names.astype(str)),
        var=pd.DataFrame(index=slide.var_names.astype(str)),
    )
    buf = io.StringIO()
    t = time.perf_counter()
    with contextlib.redirect_stdout(buf):
        reference = Reference(ref, cell_type_col=level, cell_min=25)
        r = RCTD(spatial, reference, RCTDConfig(device="cpu", compile=False))
        r.fit_platform_effects(sigma_override=sigma_override)
        fr = run_full_mode(
            spatial_counts=r.counts,
            spatial_numi=r.nUMI,
            norm_profiles=r.norm_profiles,
            cell_type_names=r.reference.cell_type_names,
            q_mat=r.q_mat,
            sq_mat=r.sq_mat,
            x_vals=r.x_vals,
            device="cpu",
            pixel_mask=r._pixel_mask,
        )
    sec = time.perf_counter() - t
    names = spatial.obs_names[np.asarray(fr.pixel_mask, bool)] if fr.pixel_mask is not None else spatial.obs_names
    W = pd.DataFrame(np.maximum(fr.weights, 0), index=names, columns=list(fr.cell_type_names))
    W = W.div(W.sum(1).where(W.sum(1) > 0, 1.0), axis=0)
    return W, float(r.sigma) / 100.0, sec


def full_mode(seeds, levels, threads: int, work: Path) -> dict:
    import anndata as ad

    from spatial_assets.celltyping import prepare_reference_types
    from spatial_assets.datasets import build_realistic_slide
    from spatial_assets.params import CellTypingParams

    out: dict = {}
    warm = False
    for seed in seeds:
        paths = build_realistic_slide(work / f"slide{seed}", seed=seed)
        slide = ad.read_h5ad(paths.slide)
        ref0 = ad.read_h5ad(paths.reference)
        truth = ad.read_h5ad(paths.truth_cells).obs
        cells = truth.loc[truth["spot"].astype(str) != "", ["x", "y", "spot"]].astype({"spot": str})
        for level in levels:
            params = CellTypingParams(seed=seed, small_types="drop", max_sweeps=1)
            ref, rep = prepare_reference_types(ref0, level, params)
            if not warm:  # numba / TorchScript warm-up, not timed
                _ours_full(slide, ref, level, cells, params)
                _rctd_full(slide, ref, level)
                warm = True
            res, ours_fit, _ = _ours_full(slide, ref, level, cells, params)
            W_r, sig_r, sec_r = _rctd_full(slide, ref, level)
            tp = _true_props(truth, level)
            common = res.weights.index.intersection(W_r.index).intersection(tp.index)
            key = f"full.seed{seed}.{level}"
            o = {
                "n_spots_common": len(common),
                "n_types": int(res.weights.shape[1]),
                "n_reference_types_dropped": len(rep["dropped"]),
                "rmse_vs_truth_ours": _rmse(res.weights.loc[common], tp.loc[common]),
                "rmse_vs_truth_rctd_py": _rmse(W_r.loc[common], tp.loc[common]),
                "rmse_ours_vs_rctd_py": _rmse(res.weights.loc[common], W_r.loc[common]),
                "sigma_ours": res.info["sigma_rctd"],
                "sigma_rctd_py": sig_r,
                "fit_seconds_ours": ours_fit,
                "fit_seconds_rctd_py": sec_r,
                "speed_ratio_rctd_py_over_ours": sec_r / max(ours_fit, 1e-9),
            }
            o["rmse_gap_ours_minus_rctd_py"] = o["rmse_vs_truth_ours"] - o["rmse_vs_truth_rctd_py"]
            s100 = int(round(100 * res.info["sigma_rctd"]))
            if s100 in Q_SIGMAS:
                W_s, _, _ = _rctd_full(slide, ref, level, sigma_override=s100)
                o["rmse_vs_truth_rctd_py_at_our_sigma"] = _rmse(W_s.loc[common], tp.loc[common])
                o["rmse_ours_vs_rctd_py_at_our_sigma"] = _rmse(res.weights.loc[common], W_s.loc[common])
            out[key] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in o.items()}
            print(key, json.dumps(out[key]), flush=True)
    out["threads"] = threads
    return out


def doublet_mode(seed: int, threads: int, work: Path, n_beads: int | None) -> dict:
    import contextlib
    import io

    import anndata as ad
    from rctd import RCTDConfig, Reference, run_rctd

    from spatial_assets.celltyping import identify_cell_types
    from spatial_assets.datasets import build_realistic_slide, simulate_beads
    from spatial_assets.params import CellTypingParams
    from spatial_assets.platforms import cells_from_spots, evaluate_beads

    paths = build_realistic_slide(work / f"slide{seed}", seed=seed)
    ref = ad.read_h5ad(paths.reference)
    truth_cells = ad.read_h5ad(paths.truth_cells)
    level = "cell_class"
    beads, bt = simulate_beads(truth_cells, type_key=level, class_key=None, seed=seed + 1, n_beads=n_beads)
    cells, _, _ = cells_from_spots(beads, "slideseq")
    params = CellTypingParams(seed=seed)
    ct, dt = params.doublet_confidence_threshold, params.doublet_threshold
    t = time.perf_counter()
    res = identify_cell_types(beads, ref, level, cells, params, mode="doublet")
    sec_o = time.perf_counter() - t
    ours = res.beads
    spatial = ad.AnnData(
        X=beads.X.copy(),
        obs=pd.DataFrame(index=beads.obs_names.astype(str)),
        var=pd.DataFrame(index=beads.var_names.astype(str)),
    )
    buf = io.StringIO()
    t = time.perf_counter()
    with contextlib.redirect_stdout(buf):
        dr = run_rctd(
            spatial,
            Reference(ref, cell_type_col=level, cell_min=25),
            mode="doublet",
            config=RCTDConfig(device="cpu", compile=False, CONFIDENCE_THRESHOLD=ct, DOUBLET_THRESHOLD=dt),
        )
    sec_r = time.perf_counter() - t
    from rctd import SPOT_CLASS_NAMES

    names = spatial.obs_names[np.asarray(dr.pixel_mask, bool)] if dr.pixel_mask is not None else spatial.obs_names
    tn = np.asarray(dr.cell_type_names, dtype=object)
    theirs = pd.DataFrame(
        {
            "spot_class": np.asarray(SPOT_CLASS_NAMES, dtype=object)[np.asarray(dr.spot_class)],
            "first_type": tn[np.asarray(dr.first_type)],
            "second_type": tn[np.asarray(dr.second_type)],
        },
        index=names,
    )
    common = ours.index.intersection(theirs.index)
    a, b = ours.loc[common], theirs.loc[common]
    ev_o, ev_r = evaluate_beads(a, bt), evaluate_beads(b, bt)
    keys = (
        "class_accuracy",
        "doublet_recall",
        "singlet_recall",
        "reject_rate",
        "type_precision",
        "type_recall",
        "singlet_type_accuracy",
    )
    out = {
        "n_beads": int(beads.n_obs),
        "n_beads_common": len(common),
        "true_doublet_fraction": round(float((bt.loc[common, "n_cells"] == 2).mean()), 4),
        "spot_class_agreement": round(float((a["spot_class"].astype(str) == b["spot_class"].astype(str)).mean()), 4),
        "first_type_agreement": round(float((a["first_type"].astype(str) == b["first_type"].astype(str)).mean()), 4),
        "seconds_ours": round(sec_o, 2),
        "seconds_rctd_py": round(sec_r, 2),
        "thresholds": {"confidence": ct, "doublet": dt},
    }
    for k in keys:
        out[f"{k}_ours"] = round(float(ev_o[k]), 4)
        out[f"{k}_rctd_py"] = round(float(ev_r[k]), 4)
    out["spot_class_crosstab"] = pd.crosstab(a["spot_class"].astype(str), b["spot_class"].astype(str)).to_dict()
    print("doublet", json.dumps(out), flush=True)
    return {"doublet": out}


def run(quick: bool = False, threads: int = 1, q_cache: str | None = None) -> dict:
    ok, why = rctd_available()
    if not ok:
        msg = f"bench_rctd_parity skipped: {why}. Install it as the module docstring says."
        print(msg)
        return {"skipped": msg}
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    _limit_threads(threads)
    cache = Path(
        q_cache or os.environ.get("SPATIAL_ASSETS_RCTD_Q", Path.home() / ".cache" / "spatial_assets" / "rctd_q")
    )
    t = time.perf_counter()
    qpath = build_q_matrices(cache)
    os.environ["RCTD_Q_MATRICES"] = str(qpath)
    out: dict = {
        "rctd_py_version": why,
        "q_sigmas": list(Q_SIGMAS),
        "q_k_val": K_VAL,
        "q_build_or_load_seconds": round(time.perf_counter() - t, 1),
    }
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        seeds = (0,) if quick else (0, 1, 2)
        levels = ("cell_class",) if quick else ("cell_class", "cell_type")
        out.update(full_mode(seeds, levels, threads, work))
        out.update(doublet_mode(0, threads, work, 400 if quick else None))
    full = [v for k, v in out.items() if k.startswith("full.")]
    out["summary"] = {
        "max_abs_rmse_gap": round(max(abs(v["rmse_gap_ours_minus_rctd_py"]) for v in full), 4),
        "within_0.01_everywhere": bool(all(abs(v["rmse_gap_ours_minus_rctd_py"]) <= 0.01 for v in full)),
        "fit_seconds_ours_total": round(sum(v["fit_seconds_ours"] for v in full), 2),
        "fit_seconds_rctd_py_total": round(sum(v["fit_seconds_rctd_py"] for v in full), 2),
    }
    out["summary"]["speed_ratio_total"] = round(
        out["summary"]["fit_seconds_rctd_py_total"] / max(out["summary"]["fit_seconds_ours_total"], 1e-9), 2
    )
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--q-cache", default=None)
    a = ap.parse_args()
    res = run(quick=a.quick, threads=a.threads, q_cache=a.q_cache)
    print(json.dumps(res, indent=1, default=str))
