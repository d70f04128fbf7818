"""Asset checks: blocking where a failure would make downstream work garbage."""


import dagster as dg
import numpy as np

from .. import storage
from .resources import ProjectResource


def build_checks(assets_by_name: dict) -> list:
    segmented_slide = assets_by_name["segmented_slide"]
    typed_cells = assets_by_name["typed_cells"]
    decomposed_cells = assets_by_name["decomposed_cells"]
    enhanced_subspots = assets_by_name["enhanced_subspots"]
    score_checkpoint = assets_by_name["score_checkpoint"]

    @dg.asset_check(asset=score_checkpoint, blocking=True,
                    description="generated pseudo-cells are at least as close to the reference cells as a per-type "
                                "diagonal Gaussian (two-sample AUC and per-type mean correlation, margin 0.05)")
    def checkpoint_sample_quality(context: dg.AssetCheckExecutionContext, project: ProjectResource):
        import json

        q_path = project.store("score_checkpoint", context.partition_key, suffix="") / "quality.json"
        if not q_path.exists():
            return dg.AssetCheckResult(passed=False, metadata={"reason": f"{q_path} missing (evaluation failed)"})
        q = json.loads(q_path.read_text())
        passed = (q.get("auc", 1.0) <= q.get("gaussian_auc", 0.0) + 0.05
                  and q.get("mean_corr", 0.0) >= q.get("gaussian_mean_corr", 1.0) - 0.05)
        return dg.AssetCheckResult(passed=passed, metadata={k: v for k, v in q.items() if not isinstance(v, dict)})

    @dg.asset_check(asset=segmented_slide, blocking=True, description="cells per spot within 0..max_cells_per_spot "
                    "and at least one spot with cells")
    def cells_per_spot_in_range(context: dg.AssetCheckExecutionContext, project: ProjectResource):
        sample = context.partition_key if context.has_partition_key else None
        results = []
        samples = [sample] if sample else [p.name for p in (project.config.storage_root / "segmented_slide").glob("*")]
        for s in samples:
            spots = storage.read_dataframe(project.folder("segmented_slide", s) / "spots.zarr")
            cap = project.params(s).segmentation.max_cells_per_spot
            n = spots["n_cells"].to_numpy()
            ok = bool((n >= 0).all() and (n <= cap).all() and (n > 0).any())
            results.append((s, ok, int(n.max()) if len(n) else 0, float((n > 0).mean()) if len(n) else 0.0))
        passed = all(r[1] for r in results)
        return dg.AssetCheckResult(passed=passed, metadata={
            "max_cells_per_spot": max((r[2] for r in results), default=0),
            "fraction_spots_with_cells": min((r[3] for r in results), default=0.0)})

    @dg.asset_check(asset=typed_cells, blocking=True,
                    description="spot type proportions sum to 1 and every cell has a known type")
    def proportions_sum_to_one(context: dg.AssetCheckExecutionContext, project: ProjectResource):
        s = context.partition_key
        folder = project.folder("typed_cells", s)
        w = storage.read_dataframe(folder / "weights.zarr")
        cells = storage.read_dataframe(folder / "cells.zarr")
        sums = w.to_numpy(dtype=float).sum(1)
        max_dev = float(np.abs(sums - 1).max()) if len(sums) else 0.0
        known = set(w.columns.astype(str))
        typed = cells["cell_type"].astype(str)
        unknown = sorted(set(typed) - known - {"unassigned"})
        return dg.AssetCheckResult(passed=max_dev < 1e-4 and not unknown,
                                   metadata={"max_abs_deviation": max_dev, "unknown_types": str(unknown)})

    @dg.asset_check(asset=decomposed_cells, blocking=True,
                    description="decomposed cells reconstruct their spots (relative error of spot sums)")
    def spot_reconstruction(context: dg.AssetCheckExecutionContext, project: ProjectResource):
        keys = context.partition_key.keys_by_dimension
        a = storage.read_anndata(project.store("decomposed_cells", keys["sample"], keys["spot_range"]))
        info = dict(a.uns.get("decomposition", {}))
        err = float(info.get("reconstruction_rel_error", np.nan)) if info else np.nan
        finite = bool(a.n_obs == 0 or np.isfinite(np.asarray(a.X.sum())).all())
        passed = finite and (a.n_obs == 0 or (np.isfinite(err) and err < 0.5))
        return dg.AssetCheckResult(passed=passed, metadata={"spot_reconstruction_error": err, "cells": a.n_obs})

    @dg.asset_check(asset=enhanced_subspots, blocking=True,
                    description="every spot has its sub-spots; the conserved profiles sum exactly to the spot and "
                                "the model's own sub-spot means reconstruct it (relative L1 < 0.75)")
    def subspots_sum_to_spot(context: dg.AssetCheckExecutionContext, project: ProjectResource):
        import pandas as pd

        s = context.partition_key
        sub = storage.read_anndata(project.store("enhanced_subspots", s))
        slide = storage.read_anndata(project.store("slide_inputs", s))
        spot = sub.obs["spot"].astype(str).to_numpy()

        def rel_error(M) -> float:
            M = M.toarray() if hasattr(M, "toarray") else np.asarray(M)
            sums = pd.DataFrame(M, columns=sub.var_names).groupby(spot).sum()
            obs = slide[sums.index].to_df()[sums.columns].to_numpy()
            return float(np.abs(sums.to_numpy() - obs).sum() / max(np.abs(obs).sum(), 1e-9))

        model_err = rel_error(sub.X)
        conserved_err = rel_error(sub.layers["conserved"]) if "conserved" in sub.layers else model_err
        covered = float(np.isin(slide.obs_names, np.unique(spot)).mean())
        return dg.AssetCheckResult(passed=covered == 1.0 and conserved_err < 1e-3 and model_err < 0.75,
                                   metadata={"model_relative_sum_error": model_err,
                                             "conserved_relative_sum_error": conserved_err,
                                             "spots_covered": covered})

    return [checkpoint_sample_quality, cells_per_spot_in_range, proportions_sum_to_one, spot_reconstruction, subspots_sum_to_spot]
