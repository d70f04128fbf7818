"""Benchmark of the bounded checkpoint quality evaluation (issue #13 point 4).

On the bundled MOp scRNA reference (500 genes, 'cell_class', 12 types) a score model with the default architecture
and noise schedule is trained briefly (the sampling cost does not depend on training length), then
``checkpoint_quality`` runs unbounded (the baseline: every type's ``quality_cells_per_type`` cells, full schedule) and
under time budgets. Printed per run: cells per type, noise-level stride, the pilot's estimated sampling seconds
(``over_budget`` when even ``quality_min_cells_per_type`` cells per type do not fit),
the measured sampling seconds and total wall seconds, and the verdict metrics (AUC, mean correlation) beside the
Gaussian baseline's, so one sees what a budget costs in evaluation fidelity.

Timings are wall-clock on whatever machine runs it. Run: ``python -m benchmarks.bench_quality_budget [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import time

import anndata as ad

from spatial_assets.datasets import data_path
from spatial_assets.generative import checkpoint_quality, train_score_model
from spatial_assets.params import ScoreModelParams

MOP = data_path("dot-mop-scrna", "mop_scrna_ref_500genes.h5ad")


def main(quick: bool = False, seed: int = 0) -> list[dict]:
    ref = ad.read_h5ad(MOP)
    ref.obs["cell_class"] = ref.obs["cell_class"].astype(str)
    p = ScoreModelParams(train_steps=100 if quick else 300, seed=seed, early_stop_patience=None)
    if quick:
        p = p.model_copy(update={"n_sigmas": 60})
    model = train_score_model(ref, "cell_class", p, None, log=lambda m: None)
    rows = []
    for budget in (None, 20.0, 5.0, 1.0):
        t0 = time.perf_counter()
        q = checkpoint_quality(model, ref, "cell_class", p, time_budget_s=budget, seed=seed)
        row = {
            "budget_s": budget,
            "n_per_type": q["n_per_type"],
            "n_cells": q["n_cells"],
            "level_stride": q["level_stride"],
            "estimated_sample_s": None
            if q["estimated_sample_seconds"] is None
            else round(q["estimated_sample_seconds"], 1),
            "sample_s": round(q["sample_seconds"], 1),
            "total_s": round(time.perf_counter() - t0, 1),
            "auc": round(q["auc"], 3),
            "gaussian_auc": round(q["gaussian_auc"], 3),
            "mean_corr": round(q["mean_corr"], 3),
            "gaussian_mean_corr": round(q["gaussian_mean_corr"], 3),
            "over_budget": q["over_budget"],
            "passed": q["passed"],
            "bounded_by": q["bounded_by"],
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    main(a.quick, a.seed)
