"""Benchmark of per-cell typing on realistic slides: morphology-aware labels vs the baselines, side by side.

Slides: :func:`spatial_assets.realistic.build_realistic_slide` (real MOp cells at osmFISH positions, ~6 cells per
55-um spot), two kinds per seed: ``morphology="by_type"`` (nuclei differ by class: size, shape, darkness) and
``"uniform"`` (the same nuclei shuffled across cells: no type information). Cells are typed from their TRUE
positions and spots (segmentation errors do not enter) at two levels: ``cell_class`` (12 classes) and
``cell_type`` (44 subtypes; the 16 below min_cells_per_type=25 merged into their class by
``prepare_reference_types(small_types="merge")``; the truth is mapped the same way).

Label columns compared, all from the same run (same RCTD weights):

* ``top_type``: every cell gets its spot's top RCTD type (the baseline the issue names);
* ``potts``: the current labels (SpatialScope's likelihood + Potts ICM);
* ``final`` with nucleus features MEASURED from the label image and the H&E
  (:func:`spatial_assets.morphology_typing.measure_nucleus_features`: area, axis ratio, hematoxylin mean);
* ``final`` with the TRUE nucleus parameters of the generator (radius, axis ratio, stain strength): the
  true-feature oracle, the ceiling of what better nucleus measurement could bring;
* the Sinkhorn-constrained variant (each spot's label counts held to its prior composition), measured features.

Speed: the morphology step alone at 5,000 spots (~25,000 cells, 20 types; synthetic features), and the feature
measurement on the realistic slides' images.

Per case: per-cell accuracy and macro-F1, composition RMSE of the labels per spot, proportions RMSE of the
weights, ECE and the reliability table of the confidences, the morphology gate's z against its permutation null, and the time of
the labelling steps. Seeds 0-2 were used while developing, 3-5 only to confirm (``--seeds``).

``python -m benchmarks.bench_typing [--quick] [--seeds 3 4 5] [--with-rctd]`` (``--with-rctd``: also the rctd-py
parity figures of :mod:`benchmarks.bench_rctd_parity`, when rctd-py is importable).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

TRUE_FEATURES = ["nucleus_radius_px", "nucleus_ratio", "nucleus_strength"]
LEVELS = ("cell_class", "cell_type")


def _slide_inputs(paths):
    import anndata as ad
    import tifffile

    from spatial_assets.celltyping import measure_nucleus_features

    slide = ad.read_h5ad(paths.slide)
    ref = ad.read_h5ad(paths.reference)
    truth = ad.read_h5ad(paths.truth_cells).obs
    truth = truth[truth["spot"].astype(str) != ""]
    cells = truth[["x", "y", "spot"]].astype({"spot": str}).copy()
    t = time.perf_counter()
    feats = measure_nucleus_features(
        tifffile.imread(paths.nuclei_labels), tifffile.imread(paths.image), truth["label"].to_numpy()
    )
    sec = time.perf_counter() - t
    for c in feats.columns:
        cells[c] = feats[c].to_numpy()
    for c in TRUE_FEATURES:
        cells["true_" + c] = truth[c].to_numpy()
    return slide, ref, truth, cells, sec


def run_case(slide, ref, truth, cells, level: str, seed: int, **overrides) -> dict:
    """One typing run and its evaluation (truth mapped through the reference's merged small types)."""
    from spatial_assets.celltyping import evaluate_typing, identify_cell_types
    from spatial_assets.params import CellTypingParams

    params = CellTypingParams(seed=seed, small_types="merge", **overrides)
    t = time.perf_counter()
    res = identify_cell_types(slide, ref, level, cells, params, class_key="cell_class")
    sec = time.perf_counter() - t
    merged = res.info["reference_types"]["merged"]
    tr = truth[["spot"]].copy()
    tr[level] = truth[level].astype(str).map(lambda v: merged.get(v, v))
    ev = evaluate_typing(res.cells, tr, level, res.weights)
    mi = res.info["morphology"]
    ev.update(
        {
            "morphology_used": bool(mi.get("used")),
            "gate_z": mi.get("gate", {}).get("z"),
            "gate_gain_nats_per_cell": mi.get("gate", {}).get("mean"),
            "seconds_total": sec,
            "seconds_cell_labels": res.info["timings_s"]["cell_labels"],
            "seconds_morphology": mi.get("seconds"),
            "n_types": int(res.weights.shape[1]),
            "n_types_merged": len(merged),
        }
    )
    ok = res.cells["cell_type"].astype(str).to_numpy() == tr.loc[res.cells.index, level].to_numpy()
    ev["_conf"] = res.cells["confidence"].to_numpy(dtype=float)
    ev["_ok"] = ok
    return ev


def morphology_scale(n_spots: int = 5000, n_types: int = 20, n_features: int = 3, seed: int = 0) -> dict:
    """Time of the morphology step alone (gate with its permutations, EM, labels) at slide scale: ~5 cells per
    spot, synthetic features whose means differ by type, RCTD-like noisy weights."""
    from spatial_assets.celltyping import morphology_labels

    rng = np.random.default_rng(seed)
    n_s = rng.integers(1, 10, n_spots)
    cs = np.repeat(np.arange(n_spots), n_s)
    props = rng.dirichlet(np.full(n_types, 0.3), n_spots)
    u = rng.random(len(cs))
    true = (u[:, None] > np.cumsum(props[cs], 1)).sum(1).clip(0, n_types - 1)
    F = rng.normal(0, 1.5, (n_types, n_features))[true] + rng.normal(0, 1, (len(cs), n_features))
    W = np.abs(props + rng.normal(0, 0.05, props.shape))
    top = W.argmax(1)[cs]
    t = time.perf_counter()
    r = morphology_labels(F, [f"f{i}" for i in range(n_features)], cs, W, top, np.ones(len(cs)), seed=seed)
    sec = time.perf_counter() - t
    return {
        "n_cells": len(cs),
        "n_spots": n_spots,
        "n_types": n_types,
        "seconds": round(sec, 2),
        "gate_cells": r.info["gate"]["n_cells"],
        "em_iterations": r.info.get("em", {}).get("iterations"),
        "accuracy": round(float((r.labels == true).mean()), 3),
        "accuracy_top_type": round(float((top == true).mean()), 3),
    }


def run(quick: bool = False, seeds=None, with_rctd: bool = False) -> dict:
    """All figures (``run_all`` calls ``run(quick)``): seeds 0-5 on full slides, or seed 0 on a crop."""
    from spatial_assets.celltyping import reliability_table
    from spatial_assets.datasets import build_realistic_slide

    seeds = tuple(seeds) if seeds else ((0,) if quick else (0, 1, 2, 3, 4, 5))
    crop = (0.0, 1100.0, 1400.0, 2100.0) if quick else None
    rows, pooled = [], {}
    variants = {
        "measured": dict(),
        "true_oracle": dict(morphology_features=["true_" + c for c in TRUE_FEATURES]),
        "measured_sinkhorn": dict(morphology_assignment="sinkhorn"),
    }
    meas_sec = []
    with tempfile.TemporaryDirectory() as d:
        for seed in seeds:
            for morph in ("by_type", "uniform"):
                paths = build_realistic_slide(Path(d) / f"s{seed}_{morph}", seed=seed, morphology=morph, crop_um=crop)
                slide, ref, truth, cells, ms = _slide_inputs(paths)
                meas_sec.append(ms)
                for level in LEVELS:
                    for vname, ov in variants.items():
                        ev = run_case(slide, ref, truth, cells, level, seed, **ov)
                        key = (morph, level, vname)
                        pc = pooled.setdefault(key, ([], []))
                        pc[0].append(ev.pop("_conf"))
                        pc[1].append(ev.pop("_ok"))
                        row = {
                            "seed": seed,
                            "morphology": morph,
                            "level": level,
                            "variant": vname,
                            **{k: v for k, v in ev.items() if not k.endswith(".reliability")},
                        }
                        rows.append(row)
                        print(
                            json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}),
                            flush=True,
                        )
    df = pd.DataFrame(rows)
    df["gain_vs_top"] = df["final.accuracy"] - df["top_type.accuracy"]
    df["gain_vs_potts"] = df["final.accuracy"] - df["potts.accuracy"]
    agg = (
        df.groupby(["morphology", "level", "variant"])
        .agg(
            top=("top_type.accuracy", "mean"),
            potts=("potts.accuracy", "mean"),
            final=("final.accuracy", "mean"),
            f1_top=("top_type.macro_f1", "mean"),
            f1_potts=("potts.macro_f1", "mean"),
            f1_final=("final.macro_f1", "mean"),
            comp_top=("top_type.composition_rmse", "mean"),
            comp_potts=("potts.composition_rmse", "mean"),
            comp_final=("final.composition_rmse", "mean"),
            ece_potts=("potts.ece", "mean"),
            ece_final=("final.ece", "mean"),
            gain_vs_top_min=("gain_vs_top", "min"),
            gain_vs_top_mean=("gain_vs_top", "mean"),
            gain_vs_potts_min=("gain_vs_potts", "min"),
            used=("morphology_used", "mean"),
            gate_z=("gate_z", "mean"),
            proportions_rmse=("proportions_rmse", "mean"),
            sec_morph=("seconds_morphology", "mean"),
        )
        .round(4)
    )
    rel = {}
    for key, (conf, ok) in pooled.items():
        tab, ece = reliability_table(np.concatenate(conf), np.concatenate(ok))
        rel["/".join(key)] = {"ece": round(ece, 4), "table": tab.round(3).to_dict(orient="records")}
    out = {
        "seeds": list(seeds),
        "quick": quick,
        "per_run": df.round(4).to_dict(orient="records"),
        "summary": agg.reset_index().to_dict(orient="records"),
        "reliability_pooled_over_seeds": rel,
        "feature_measurement_seconds_mean": float(np.mean(meas_sec)),
        "morphology_scale": morphology_scale(n_spots=1000 if quick else 5000),
    }
    if with_rctd:
        from benchmarks import bench_rctd_parity

        out["rctd_parity"] = bench_rctd_parity.run(quick=quick)
    with pd.option_context("display.width", 250, "display.max_columns", 40):
        print(agg.to_string())
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="per-cell typing benchmark on realistic slides")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, nargs="*", default=None)
    ap.add_argument("--with-rctd", action="store_true")
    ap.add_argument("--json", default=None, help="write the full result here")
    a = ap.parse_args()
    res = run(quick=a.quick, seeds=a.seeds, with_rctd=a.with_rctd)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1, default=str))
    for k, v in res["reliability_pooled_over_seeds"].items():
        if k.endswith(("measured", "true_oracle")):
            print(k, "ECE", v["ece"])
            print(pd.DataFrame(v["table"]).to_string(index=False))
    sys.exit(0)
