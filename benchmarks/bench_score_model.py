"""Benchmark of the cell-type-conditioned score model (SpatialScope's generative prior).

* speed: one forward pass (= one Langevin / decomposition step) for 2,500 cells x 2,000 genes on CPU, float32 and
  bfloat16 autocast, hidden 512 (the params default) and 256; training throughput (steps/s, cells/s);
* quality on the bundled MOp scRNA reference (500 genes, 'cell_class', 12 types; 80/20 split of cells, seeded)
  and on the demo reference (osmFISH, 33 genes, 'cell_type'): pseudo-cells sampled by annealed Langevin vs
  held-out cells, per type: correlation over genes of means and of variances, kNN two-sample AUC (0.5 =
  indistinguishable) - for the model, two baselines with independent genes (per-type diagonal Gaussian; zero-
  inflated per gene) and real training cells (the floor);
* design choices on MOp at equal training length (1,000 steps): L2 (default) vs L1 (SpatialScope) DSM loss,
  Gaussian (default) vs zero-inflated analytic skip;
* a figure: PCA of held-out vs generated MOp cells coloured by type (PNG written to ``out_dir``).

Timings are wall-clock on whatever machine runs it (2 shared CPU cores when these numbers were taken).
Run: ``python -m benchmarks.bench_score_model [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from spatial_assets.datasets import data_path

REPO = Path(__file__).resolve().parents[1]
MOP = data_path("dot-mop-scrna", "mop_scrna_ref_500genes.h5ad")


def _split(ref, key: str, frac: float = 0.2, seed: int = 0):
    rng = np.random.default_rng(seed)
    test = rng.random(ref.n_obs) < frac
    return ref[~test].copy(), ref[test].copy()


def _summary(res: dict) -> dict:
    out = {}
    for name in ("model", "diag_gaussian", "zi_independent", "train_cells"):
        if name in res:
            out[name] = {k: round(float(v), 4) for k, v in res[name].items() if k != "per_type"}
    out["n_cells"], out["n_types"] = res["n_cells"], res["n_types"]
    out["sample_seconds"] = round(res["sample_seconds"], 2)
    out["nonfinite_fraction"] = res["nonfinite_fraction"]
    return out


def forward_timing(n_cells: int = 2500, n_genes: int = 2000, n_types: int = 30, repeats: int = 5) -> dict:
    """Median seconds of one ScoreModel.score call (scalar sigma, as in decomposition / sampling)."""
    from spatial_assets.generative import ScoreModel, ScoreNet

    g = torch.Generator().manual_seed(0)
    stats = {
        "type_means": torch.rand(n_types, n_genes, generator=g),
        "type_var": torch.rand(n_types, n_genes) + 0.1,
        "zi_pi": torch.rand(n_types, n_genes, generator=g),
        "zi_mean": torch.rand(n_types, n_genes),
        "zi_var": torch.rand(n_types, n_genes) + 0.1,
    }
    x = torch.randn(n_cells, n_genes, generator=g)
    t = torch.randint(n_types, (n_cells,), generator=g)
    out = {"shape": f"{n_cells} cells x {n_genes} genes"}
    for hidden in (512, 256):
        net = ScoreNet(stats, 100.0, 0.01, hidden=hidden, n_blocks=3)
        for p in net.out.parameters():  # non-zero output layer, as after training
            torch.nn.init.normal_(p, std=0.01, generator=g)
        cfg = {
            "genes": [f"g{i}" for i in range(n_genes)],
            "cell_types": [f"t{i}" for i in range(n_types)],
            "cell_type_key": "ct",
            "target_sum": 1.0,
            "ref_library_size": 1.0,
            "fingerprint": "",
            "seed": 0,
            "train_step": 0,
            "schedule": {
                "sigma_begin": 100.0,
                "sigma_end": 0.01,
                "n_sigmas": 232,
                "sampling_step": 6.6e-6,
                "decomposition_step": 1e-5,
                "steps_per_level": 5,
            },
        }
        model = ScoreModel(net, cfg)
        ref = None
        for dtype in ("float32", "bfloat16"):
            model.set_precision(dtype)
            model.score(x, t, 0.5)
            ts = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                s = model.score(x, t, 0.5)
                ts.append(time.perf_counter() - t0)
            key = f"hidden{hidden}_{dtype}"
            out[f"{key}_s"] = round(float(np.median(ts)), 4)
            if dtype == "float32":
                ref = s
            else:
                out[f"{key}_rel_err"] = round(float((s - ref).norm() / ref.norm()), 5)
        out[f"hidden{hidden}_params"] = sum(p.numel() for p in net.parameters())
    return out


def _train_eval(train, held, key: str, params, n_per_type: int, level_stride: int, log, **fit_kw):
    from spatial_assets.generative import evaluate_samples, fit_score_model, prepare_training_data

    data = prepare_training_data(train, key, params)
    t0 = time.perf_counter()
    model = fit_score_model(data, params, None, log=log, log_every=max(params.train_steps // 5, 1), **fit_kw)
    secs = time.perf_counter() - t0
    res = evaluate_samples(
        model, held, n_per_type=n_per_type, seed=0, level_stride=level_stride, train_data=data, return_samples=True
    )
    thr = {
        "train_seconds": round(secs, 1),
        "steps_per_s": round(params.train_steps / secs, 2),
        "cells_per_s": round(params.train_steps * params.batch_size / secs, 1),
    }
    return model, data, res, thr


def run(quick: bool = False, out_dir: str | None = None, log=print) -> dict:
    import anndata as ad

    from spatial_assets.params import ScoreModelParams
    from spatial_assets.pl import real_vs_generated as plot_real_vs_generated

    torch.manual_seed(0)
    out_dir = Path(out_dir or tempfile.mkdtemp(prefix="bench_score_model_"))
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        result[f"forward_{threads}thread"] = forward_timing(repeats=3 if quick else 5)
        log(f"forward: {result[f'forward_{threads}thread']}")
    # training / sampling on one thread: on a CPU shared with other jobs, two threads were slower than one
    torch.set_num_threads(1)

    # --- MOp reference (real scRNA, 12 classes) ---------------------------------------------------------------
    steps = 300 if quick else 3000
    common = dict(
        n_genes=500,
        max_cells_per_type=3000,
        hidden=256,
        n_blocks=3,
        lr=1e-3,
        batch_size=256,
        ema_decay=0.999,
        save_every=10**6,
    )
    mop = ad.read_h5ad(MOP)
    tr, he = _split(mop, "cell_class")
    p = ScoreModelParams(train_steps=steps, **common)
    stride = 4 if quick else 2
    model, data, res, thr = _train_eval(tr, he, "cell_class", p, 100 if quick else 200, stride, log)
    result["mop"] = {
        "n_train_cells": len(data.x),
        "genes": len(data.genes),
        "types": len(data.cell_types),
        "train_steps": steps,
        "hidden": p.hidden,
        "level_stride": stride,
        **thr,
        **_summary(res),
    }
    log(f"mop: {result['mop']}")
    png = plot_real_vs_generated(
        res["real"],
        res["type_idx"],
        res["samples"],
        res["type_idx"],
        model.cell_types,
        title=f"MOp cell_class: held-out vs generated ({steps} steps)",
    )
    (out_dir / "score_model_mop_pca.png").write_bytes(png)
    result["figure"] = str(out_dir / "score_model_mop_pca.png")
    result["figure_bytes"] = len(png)

    # --- design choices at equal (shorter) training ------------------------------------------------------------
    if not quick:
        abl_steps = 1000
        pa = ScoreModelParams(train_steps=abl_steps, **common)
        result["mop_ablation"] = {"train_steps": abl_steps}
        for name, kw in (("l2_gaussian", {}), ("l1_gaussian", {"loss": "l1"}), ("l2_zi", {"skip": "zi_gaussian"})):
            _, _, r, _ = _train_eval(tr, he, "cell_class", pa, 150, 4, lambda m: None, **kw)
            result["mop_ablation"][name] = {k: round(float(r["model"][k]), 4) for k in ("mean_corr", "var_corr", "auc")}
            log(f"ablation {name}: {result['mop_ablation'][name]}")

    # --- demo reference (osmFISH cells, 33 genes, 31 types) ----------------------------------------------------
    from spatial_assets.datasets import build_demo

    paths = build_demo(out_dir / "demo", seed=0)
    demo_ref = ad.read_h5ad(paths.reference)
    dtr, dhe = _split(demo_ref, "cell_type")
    pd_ = ScoreModelParams(train_steps=300 if quick else 2000, **(common | {"n_genes": 2000}))
    dmodel, ddata, dres, dthr = _train_eval(dtr, dhe, "cell_type", pd_, 200, stride, log)
    result["demo"] = {
        "n_train_cells": len(ddata.x),
        "genes": len(ddata.genes),
        "types": len(ddata.cell_types),
        "train_steps": pd_.train_steps,
        **dthr,
        **_summary(dres),
    }
    log(f"demo: {result['demo']}")
    result["quick"] = quick
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out-dir", default=None)
    a = ap.parse_args(argv)
    res = run(quick=a.quick, out_dir=a.out_dir)
    print(json.dumps(res, indent=2, default=str))


if __name__ == "__main__":
    main()
