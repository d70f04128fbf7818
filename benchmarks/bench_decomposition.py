"""Benchmark of the decomposition (SpatialScope step 3): accuracy on the demo slide and speed at scale.

Accuracy: the demo slide (real osmFISH cells binned into Visium spots) is decomposed with its true cells per spot
and their true types, so the decomposition is measured on its own. The prior is a small score network trained on
the demo reference (``score_model.train_score_model``) and, beside it, its analytic Gaussian part alone; the
baselines are the type means scaled to the spot (one factor per spot) and the per-gene proportional split.
Leave-genes-out: the genes are hidden from the spot likelihood in folds, and each is scored against the truth.

Speed: a synthetic range of 500 spots x 5 cells x 2,000 genes, default schedule (232 levels x 5 steps), 3 replicates
batched as rows (7,500 x 2,000), with the project's score network (default architecture, hidden 512, 3 blocks) and
with the network-free Gaussian prior, run in a fresh process for a clean peak memory. Only a few levels are run
(``level_stride``) and the time per Langevin step is extrapolated to the full schedule (labelled so).

Run: ``python -m benchmarks.bench_decomposition [--quick]``. Timings depend on the machine's load.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent


def _threads() -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))


def _r(v, k=4):
    return None if v is None or not np.isfinite(v) else round(float(v), k)


# ---------------------------------------------------------------------------------------------------------------
# accuracy on the demo slide
# ---------------------------------------------------------------------------------------------------------------
def accuracy(quick: bool = False, workdir: Path | None = None) -> dict:
    import anndata as ad

    from spatial_assets.datasets import build_demo
    from spatial_assets.decomposition import (
        GaussianScoreModel,
        baseline_type_mean,
        decompose,
        evaluate_against_truth,
        prepare_spots,
    )
    from spatial_assets.generative import train_score_model
    from spatial_assets.params import DecompositionParams, ScoreModelParams

    _threads()
    workdir = Path(workdir or tempfile.mkdtemp(prefix="bench_decomp_"))
    crop = (0.0, 1200.0, 900.0, 2100.0) if quick else None
    paths = build_demo(workdir / "demo", seed=0, crop_um=crop)
    slide, truth, ref = (ad.read_h5ad(p) for p in (paths.slide, paths.truth_cells, paths.reference))
    out: dict = {"demo_spots": slide.n_obs}

    steps = 300 if quick else 4000
    sp_ = ScoreModelParams(hidden=128, n_blocks=2, train_steps=steps, mixed_precision=False, seed=0)
    t0 = time.perf_counter()
    net = train_score_model(ref, "cell_type", sp_, workdir / "score_ckpt", log=lambda m: None)
    out["score_model_train_s"] = round(time.perf_counter() - t0, 1)
    out["score_model"] = f"residual MLP hidden 128 x 2 blocks, {steps} steps on the demo reference"
    gauss = GaussianScoreModel(
        net.genes,
        net.cell_types,
        net.type_means.cpu().numpy(),
        net.net.type_var.sqrt().cpu().numpy(),
        sigmas=net.sigmas.cpu().numpy(),
        cell_type_key=net.cell_type_key,
        ref_library_size=net.ref_library_size,
        target_sum=net.target_sum,
        decomposition_step=net.decomposition_step,
    )

    tc = truth.obs
    inside = tc["spot"].astype(str) != ""
    cells = pd.DataFrame(
        {
            "spot": tc.loc[inside, "spot"].astype(str),
            "cell_type": tc.loc[inside, "cell_type"],
            "x": tc.loc[inside, "x"],
            "y": tc.loc[inside, "y"],
        }
    )
    stride = 4 if quick else 1
    params = DecompositionParams(estimator="langevin", level_stride=stride, seed=0)
    inp = prepare_spots(slide, cells, net, cell_type_key="cell_type")
    out.update(
        cells=inp.n_cells,
        spots=inp.n_spots,
        level_stride=stride,
        multi_cell_spots=int((inp.spots["n_cells"] > 1).sum()),
    )

    def scores(prefix, res, pred=None, genes=None):
        for tag, multi in (("", False), ("_multi", True)):
            ev = evaluate_against_truth(res, truth, genes=genes, prediction=pred, multi_cell_only=multi)
            for k in ("gene_r_median", "gene_r_log1p_median", "cell_r_median", "spot_rel_error"):
                out[f"{prefix}{tag}_{k}"] = _r(ev[k])

    res = decompose(inp, net, params)
    out["net_seconds"] = round(res.info["seconds_total"], 1)
    out["net_reconstruction_rel_error"] = _r(res.info["reconstruction_rel_error"])
    scores("net", res)
    resg = decompose(inp, gauss, params)
    scores("gauss", resg)
    scores("baseline_typemean", res, baseline_type_mean(inp, net))
    scores("baseline_pergene", res, baseline_type_mean(inp, net, per_gene=True))
    if not quick:
        res10 = decompose(inp, net, params.model_copy(update={"n_replicates": 10}))
        scores("net_10rep", res10)

    # leave genes out, in folds: every gene hidden once
    genes = [g for g in net.genes if g in set(slide.var_names)]
    n_folds = 3 if quick else 6
    held_pred = np.full((inp.n_cells, len(net.genes)), np.nan)
    held_base = np.full_like(held_pred, np.nan)
    spot_r = {}
    for f in range(n_folds):
        fold = genes[f::n_folds]
        rf = decompose(inp, net, params.model_copy(update={"leave_out_genes": fold}))
        cols = [net.genes.index(g) for g in fold]
        held_pred[:, cols] = rf.adata.X[:, cols]
        held_base[:, cols] = baseline_type_mean(inp, net, leave_out_genes=fold)[:, cols]
        spot_r.update(rf.info["leave_out_spot_r"])
    res_held = res.adata.copy()
    for tag, pred in (("heldout_net", held_pred), ("heldout_baseline_typemean", held_base)):
        ev = evaluate_against_truth(res_held, truth, genes=genes, prediction=pred)
        out[f"{tag}_gene_r_median"] = _r(ev["gene_r_median"])
        out[f"{tag}_gene_r_log1p_median"] = _r(ev["gene_r_log1p_median"])
    out["heldout_net_spot_r_median"] = _r(np.nanmedian(list(spot_r.values())))
    out["heldout_folds"] = n_folds
    return out


# ---------------------------------------------------------------------------------------------------------------
# speed at scale (run in a child process for a clean peak memory)
# ---------------------------------------------------------------------------------------------------------------
def _rss_mb(field: str = "VmHWM") -> float:
    """Peak (VmHWM) or current (VmRSS) resident memory of this process, from /proc (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) so the next peak is the decomposition's own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _speed_child(n_spots: int, cells_per_spot: int, n_genes: int, stride: int, which: str) -> dict:
    import anndata as ad
    import torch

    from spatial_assets.decomposition import decompose, prepare_spots
    from spatial_assets.generative import GaussianScoreModel
    from spatial_assets.params import DecompositionParams, ScoreModelParams

    _threads()
    rng = np.random.default_rng(0)
    T = 20
    genes = [f"g{i}" for i in range(n_genes)]
    types = [f"t{i}" for i in range(T)]
    mu = np.log1p(rng.gamma(0.5, 4.0, (T, n_genes)))
    if which == "network":
        from spatial_assets.generative import train_score_model

        t = rng.integers(0, T, 40 * T)
        counts = rng.poisson(np.expm1(mu[t] + 0.3 * rng.standard_normal((len(t), n_genes))).clip(0))
        ref = ad.AnnData(
            counts.astype(np.float32),
            obs=pd.DataFrame({"cell_type": np.array(types)[t]}, index=[f"c{i}" for i in range(len(t))]),
            var=pd.DataFrame(index=genes),
        )
        with tempfile.TemporaryDirectory() as d:
            model = train_score_model(
                ref,
                "cell_type",
                ScoreModelParams(train_steps=1, mixed_precision=False),
                d,
                log=lambda m: None,
                genes=genes,
            )
        arch = (
            f"residual MLP hidden {model.config['architecture']['hidden']} x "
            f"{model.config['architecture']['n_blocks']} blocks"
        )
    else:
        model = GaussianScoreModel(genes, types, mu, 0.3)
        arch = "analytic Gaussian (no network)"
    n = np.full(n_spots, cells_per_spot)
    spot_idx = np.repeat(np.arange(n_spots), n)
    cell_types = rng.integers(0, T, len(spot_idx))
    spot_counts = np.zeros((n_spots, n_genes))
    np.add.at(spot_counts, spot_idx, rng.poisson(np.expm1(mu[cell_types])))
    spots = [f"s{i}" for i in range(n_spots)]
    slide = ad.AnnData(spot_counts.astype(np.float32), obs=pd.DataFrame(index=spots), var=pd.DataFrame(index=genes))
    cells = pd.DataFrame(
        {"spot": np.array(spots)[spot_idx], "cell_type": np.array(types)[cell_types]},
        index=[f"c{i}" for i in range(len(spot_idx))],
    )
    inp = prepare_spots(slide, cells, model)
    rss_before = _rss_mb("VmRSS")
    reset = _reset_peak()
    res = decompose(inp, model, DecompositionParams(estimator="langevin", level_stride=stride))
    peak = _rss_mb("VmHWM")
    info = res.info
    full_steps = len(model.sigmas) * model.steps_per_level + 1
    est = info["seconds_per_step"] * full_steps
    return {
        "prior": arch,
        "spots": inp.n_spots,
        "cells": inp.n_cells,
        "genes": n_genes,
        "rows_per_step": info["rows_per_step"],
        "steps_run": info["langevin_steps"],
        "seconds_per_step": _r(info["seconds_per_step"]),
        "network_seconds_per_step": _r(info["network_seconds_per_step"]),
        "non_network_seconds_per_step": _r(info["other_seconds_per_step"]),
        "full_schedule_steps": full_steps,
        "EXTRAPOLATED_full_schedule_minutes": _r(est / 60, 2),
        "EXTRAPOLATED_spots_per_second": _r(inp.n_spots / est),
        # CPU time of this process (all its threads): what the run costs on an unloaded machine
        "cpu_seconds_per_step": _r(info["cpu_seconds_total"] / info["langevin_steps"]),
        "network_cpu_seconds_per_step": _r(info["network_thread_cpu_seconds_per_step"]),
        "non_network_cpu_seconds_per_step": _r(info["other_thread_cpu_seconds_per_step"]),
        "EXTRAPOLATED_full_schedule_cpu_minutes": _r(
            info["cpu_seconds_total"] / info["langevin_steps"] * full_steps / 60, 2
        ),
        "rss_before_decompose_mb": round(rss_before, 1),
        "peak_rss_during_decompose_mb": round(peak, 1) if reset else None,
        "peak_rss_increase_mb": round(peak - rss_before, 1) if reset else None,
        "working_set_estimate_mb": round(8 * info["rows_per_step"] * n_genes * 4 / 2**20, 1),
        "retry_rounds": info["retry_rounds"],
        "non_finite_cells": len(info["non_finite_cells"]),
        "torch_threads": torch.get_num_threads(),
    }


def speed(quick: bool = False) -> dict:
    n_spots, stride = (60, 58) if quick else (500, 29)  # stride 29 -> 8 of 232 levels (41 steps), timed
    out = {}
    for which in ("gaussian", "network"):
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.bench_decomposition",
            "--speed-child",
            which,
            str(n_spots),
            str(stride),
        ]
        p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=3000)
        if p.returncode != 0:
            raise RuntimeError(f"speed child ({which}) failed:\n{p.stderr[-3000:]}")
        out[which] = json.loads(p.stdout.strip().splitlines()[-1])
    return out


def run(quick: bool = False) -> dict:
    """Accuracy on the demo slide and speed at 500 spots x 5 cells x 2,000 genes (see the module docstring)."""
    t0 = time.perf_counter()
    acc = accuracy(quick)
    spd = speed(quick)
    res = {f"accuracy_{k}": v for k, v in acc.items()}
    for which, d in spd.items():
        res.update({f"speed_{which}_{k}": v for k, v in d.items()})
    res["benchmark_seconds"] = round(time.perf_counter() - t0, 1)
    res["note"] = "CPU timings on a shared machine (2 cores shared with other jobs); full-schedule times extrapolated"
    return res


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--speed-child":
        which, n_spots, stride = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
        print(json.dumps(_speed_child(n_spots, 5, 2000, stride, which)))
    else:
        for k, v in run(quick="--quick" in sys.argv).items():
            print(f"{k}: {v}")
