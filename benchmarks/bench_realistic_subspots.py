"""Enhanced sub-spots on realistic slides: soScope against the simple splits of each spot, on several seeds.

Slides: ``datasets.build_realistic_slide`` (real MOp 500-gene cells at real osmFISH positions, Visium 55-um spots,
H&E-like image with one nucleus per cell, ``morphology="by_type"``), seeds 0, 1, 2, plus seed 0 with
``morphology="uniform"`` (nuclei do not follow the type; ``--no-uniform`` skips it). 7 sub-spots per spot; truth =
the sum of the true cells nearest each sub-spot centre (``truth_subspots.h5ad``). Nuclei: the rendered nucleus labels
(``nuclei_labels.tif``, i.e. a perfect segmentation) as an x, y, area table with the segmentation's per-nucleus
features; predicted types: the project's typing of those nuclei (``celltyping.type_sample``, class level, cached).

Reported per method, median Pearson r on log1p: per gene (over sub-spots) and per sub-spot (over genes):

- ``spot_div_k``: every sub-spot = spot / 7; ``nuclei_split``: each spot split by the number of nuclei nearest
  each sub-spot; ``true_cell_split``: the same with the true cells (ceiling of count splits);
- ``typed_split_<pred|true>_cell_class``: each spot split per gene by each sub-spot's share of the sum over its
  nuclei of their type-mean profile (predicted / true classes; ``_soft``: weighted by the typing's confidence);
- ``<config>_X`` / ``_model_mean`` / ``_conserved`` / ``_prior_split`` for every soScope configuration of
  :data:`CONFIGS` (``_prior_split`` is the run's own start point: its same-input baseline);
- ``soscope_published``: soScope's published setup (flat spot / K offsets, all squidpy features z-scored,
  X = likelihood mean), same features and epochs (``--no-published`` skips it).

``run(quick=False) -> dict``; ``python -m benchmarks.bench_realistic_subspots [--quick] [--out DIR]`` writes
``realistic_subspots.json``, ``.md`` and ``.png`` to ``benchmarks/results/`` (or DIR); ``--epochs E`` (VGAE and
soScope epochs, default 400), ``--cache DIR`` (built slides and their squidpy features, default a temp folder).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SEEDS = (0, 1, 2)
BASELINES = ("spot_div_k", "nuclei_split", "true_cell_split")
LEVELS = ("cell_class", "cell_type")  # 12 classes, 44 subtypes
# soScope configurations run on every slide ("_types": which nucleus labels and type profiles are fed; "pred_*": the
# project's typing of the nuclei with their morphology, "true_*": the true types; "_soft": labels weighted by the
# typing's confidence)
CONFIGS = {
    "soscope": {},  # project defaults, no types: nuclei prior + pooled nucleus morphology features
    "soscope_no_morphology": {"nuclei_morphology_features": []},  # the previous default
    "soscope_typed": {"_types": "pred_cell_class"},  # project defaults fed the predicted class labels
    "soscope_typed_morphology": {"_types": "pred_cell_class", "nuclei_morphology": "on"},  # + pooled morphology
    "soscope_typed_soft": {"_types": "pred_cell_class_soft", "nuclei_morphology": "on"},
    "soscope_typed_true": {"_types": "true_cell_class"},
}
PRED_LEVELS = ("cell_class",)


def _log_r(est: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Median per-gene and per-sub-spot Pearson r of log1p(est) vs log1p(truth)."""
    from spatial_assets.metrics import pearson_columns

    a, b = np.log1p(np.maximum(np.asarray(est, np.float64), 0)), np.log1p(np.asarray(truth, np.float64))
    return float(np.nanmedian(pearson_columns(a, b))), float(np.nanmedian(pearson_columns(a.T, b.T)))


def nuclei_table(labels_path, image=None) -> pd.DataFrame:  # noqa: F821
    """x, y, area (px) and label of every labelled nucleus of a label image; with the H&E ``image``, also the
    segmentation's per-nucleus features (``segmentation.FEATURE_COLUMNS``, as ``segment_sample`` writes them)."""
    import pandas as pd
    import tifffile
    from skimage.measure import regionprops_table

    labels = tifffile.imread(labels_path)
    rp = regionprops_table(labels, properties=("label", "centroid", "area"))
    out = pd.DataFrame(
        {"x": rp["centroid-1"], "y": rp["centroid-0"], "area": rp["area"].astype(float), "label": rp["label"]}
    )
    if image is not None:
        from spatial_assets.segmentation import nucleus_features

        f = nucleus_features(labels, image, label_ids=out["label"].to_numpy())
        for c in f.columns:
            out[c] = f[c].to_numpy()
    return out


def predicted_types(slide, nuclei, reference, level: str) -> np.ndarray:
    """The project's typing (``celltyping.type_sample``, defaults) of every nucleus inside a spot ('' outside)."""
    import pandas as pd

    from spatial_assets import celltyping
    from spatial_assets import soscope as ss

    geom = ss.build_subspots(slide, "visium")
    row = ss.nuclei_subspots(nuclei, geom)
    ok = row >= 0
    feats = [c for c in nuclei.columns if c.startswith("nucleus_")]  # segmentation's nucleus features
    cells = nuclei.loc[ok, ["x", "y", *feats]].reset_index(drop=True)
    cells.index = pd.Index([f"n{i}" for i in np.flatnonzero(ok)])
    cells["spot"] = geom.spot_names[row[ok] // geom.n_sub]
    res = celltyping.type_sample(slide, reference, level, cells, class_key="cell_class")
    lab = res.cells["cell_type"].astype(str).reindex(cells.index).fillna("").to_numpy()
    conf = res.cells["confidence"].astype(float).reindex(cells.index).fillna(0.0).to_numpy()
    potts = res.cells["potts_type"].astype(str).reindex(cells.index).fillna("").to_numpy()
    out, c, pt = np.full(len(nuclei), "", dtype=object), np.zeros(len(nuclei)), np.full(len(nuclei), "", dtype=object)
    out[ok], c[ok], pt[ok] = lab, conf, potts
    return out, c, pt


def load_slide(seed: int, cache: Path, crop_um=None, morphology: str = "by_type") -> dict:
    """Build (or reuse from ``cache``) a realistic slide; returns slide, image, nuclei, truth and true counts."""
    import anndata as ad
    import pandas as pd
    import tifffile

    from spatial_assets.datasets import build_realistic_slide

    d = cache / (
        f"seed{seed}"
        + ("" if morphology == "by_type" else f"_{morphology}")
        + ("" if crop_um is None else "_crop" + "_".join(str(int(c)) for c in crop_um))
    )
    if not (d / "demo_info.json").exists():
        build_realistic_slide(d, seed=seed, crop_um=crop_um, morphology=morphology)
    slide = ad.read_h5ad(d / "slide.h5ad")
    truth = ad.read_h5ad(d / "truth_subspots.h5ad")
    cells = ad.read_h5ad(d / "truth_cells.h5ad")
    if slide.n_obs * 7 != truth.n_obs or not (truth.obs["spot"].to_numpy()[::7] == slide.obs_names.to_numpy()).all():
        raise ValueError(f"{d}: truth_subspots.h5ad is not spot-major over slide.h5ad's spots")
    inside = cells.obs["spot"].astype(str).to_numpy() != ""
    row = slide.obs_names.get_indexer(cells.obs["spot"].astype(str)[inside]) * 7 + cells.obs["subspot"][inside]
    true_counts = np.bincount(row.to_numpy(), minlength=truth.n_obs).astype(float)
    image = tifffile.imread(d / "he.tif")
    nf = d / "nuclei.parquet"  # cache of the nuclei table with the per-nucleus features
    if not nf.exists():
        nuclei_table(d / "nuclei_labels.tif", image).to_parquet(nf)
    nuclei = pd.read_parquet(nf)
    for level in LEVELS:  # true type of each nucleus (label i + 1 = true cell i)
        nuclei[f"true_{level}"] = cells.obs[level].astype(str).to_numpy()[nuclei["label"].to_numpy() - 1]
    reference = ad.read_h5ad(d / "reference.h5ad")
    for level in PRED_LEVELS:  # the project's typing of the nuclei, cached
        f = d / f"predicted_{level}.npz"
        if not f.exists():
            lab, conf, potts = predicted_types(slide, nuclei, reference, level)
            np.savez(f, labels=lab.astype(str), confidence=conf, potts=potts.astype(str))
        z = np.load(f)
        nuclei[f"pred_{level}"], nuclei[f"pred_{level}_confidence"] = z["labels"], z["confidence"]
        nuclei[f"pred_{level}_potts"] = z["potts"]
    feats = d / "squidpy_features.npy"  # cache of the default squidpy features (slow: minutes per slide)
    raw = np.load(feats) if feats.exists() else None
    if raw is None:
        from spatial_assets import soscope as ss
        from spatial_assets.params import SoScopeParams

        geom = ss.build_subspots(slide, "visium")
        raw = ss.squidpy_features(tifffile.imread(d / "he.tif"), geom, tuple(SoScopeParams().squidpy_features))
        np.save(feats, raw)
    return {
        "raw_image_features": raw,
        "slide": slide,
        "truth": np.asarray(truth.X.toarray() if hasattr(truth.X, "toarray") else truth.X, np.float64),
        "image": image,
        "nuclei": nuclei,
        "reference": reference,
        "true_counts": true_counts,
    }


def count_split(x: np.ndarray, counts: np.ndarray, k: int = 7) -> np.ndarray:
    """Split each spot by the per-sub-spot counts (an even split where a spot has none); (N K, G)."""
    c = np.asarray(counts, np.float64).reshape(-1, k)
    tot = c.sum(1, keepdims=True)
    w = np.where(tot > 0, c / np.where(tot > 0, tot, 1.0), 1.0 / k)
    return (x[:, None, :] * w[:, :, None]).reshape(-1, x.shape[1])


def evaluate_slide(data: dict, epochs: int, seed: int = 0, configs=None) -> dict:
    """All methods on one slide: {method: {"gene_r", "subspot_r", ...}}."""
    from spatial_assets import soscope as ss
    from spatial_assets.params import SoScopeParams

    slide, truth = data["slide"], data["truth"]
    x = np.asarray(slide.X.toarray() if hasattr(slide.X, "toarray") else slide.X, np.float64)
    geom = ss.build_subspots(slide, "visium")
    nuc_counts = ss.nuclei_features(data["nuclei"], geom)[:, 0]
    raw = data.get("raw_image_features")
    if raw is None:  # squidpy features of the default set, computed once and shared by every configuration
        raw = ss.squidpy_features(data["image"], geom, tuple(SoScopeParams().squidpy_features))
    out: dict = {}
    for name, est in (
        ("spot_div_k", ss.baseline_split(x, 7)),
        ("nuclei_split", count_split(x, nuc_counts)),
        ("true_cell_split", count_split(x, data["true_counts"])),
    ):
        g, s = _log_r(est, truth)
        out[name] = {"gene_r": g, "subspot_r": s}
    nuclei = data["nuclei"]
    typings = sorted({extra["_types"] for extra in (configs or {}).values() if "_types" in extra})
    profiles, typed_nuclei = {}, {}
    for t in typings:  # "true_cell_class", "pred_cell_class[_soft]", ...: the typed-nuclei split (no training)
        soft = t.endswith("_soft")
        col = t.removesuffix("_soft")
        level = col.split("_", 1)[1]
        profiles[t] = ss.type_profiles(data["reference"], level)
        typed_nuclei[t] = nuclei.assign(cell_type=nuclei[col].to_numpy())
        conf_col = f"{col}_confidence"
        if conf_col in nuclei.columns and soft:
            typed_nuclei[t]["confidence"] = nuclei[conf_col].to_numpy()
        if f"{col}_potts" in nuclei.columns:  # the typing's Potts labels (before morphology), as typed_cells has
            typed_nuclei[t]["potts_type"] = nuclei[f"{col}_potts"].to_numpy()
        inside = ss.nuclei_subspots(nuclei, geom) >= 0
        exp = ss.typed_subspot_profiles(
            typed_nuclei[t].loc[inside],
            geom,
            profiles[t],
            slide.var_names,
            confidence_column="confidence" if "confidence" in typed_nuclei[t] else None,
        )
        est = np.repeat(x, 7, axis=0) * ss.typed_shares(exp, 7)
        g, s = _log_r(est, truth)
        out[f"typed_split_{t}"] = {"gene_r": g, "subspot_r": s}
        if t.startswith("pred_"):
            truth_lab = nuclei[col.replace("pred_", "true_")].to_numpy()[inside]
            out[f"typed_split_{t}"]["typing_accuracy"] = float((nuclei[col].to_numpy()[inside] == truth_lab).mean())
    configs = configs or {
        "soscope": {},
        "soscope_published": {"nuclei_offset": False, "image_pca": None, "conserve": False},
    }
    for name, extra in configs.items():
        extra = dict(extra)
        t = extra.pop("_types", None)
        if t and t.endswith("_soft"):
            extra["type_confidence_column"] = "confidence"
        p = SoScopeParams(vgae_epochs=epochs, epochs=epochs, seed=seed, **extra)
        t0 = time.perf_counter()
        r = ss.enhance(
            slide,
            p,
            "visium",
            image=data["image"],
            nuclei=typed_nuclei[t] if t else nuclei,
            raw_image_features=raw,
            type_profiles=profiles[t] if t else None,
            log_every=0,
        )
        sec = time.perf_counter() - t0
        g, s = _log_r(r.adata.X, truth)
        out[f"{name}_X"] = {"gene_r": g, "subspot_r": s, "seconds": round(sec, 1), "x_layer": r.info["x_layer"]}
        for layer in ("model_mean", "conserved", "prior_split"):
            g, s = _log_r(r.adata.layers[layer], truth)
            out[f"{name}_{layer}"] = {"gene_r": g, "subspot_r": s}
    out["_slide"] = {
        "spots": int(slide.n_obs),
        "genes": int(slide.n_vars),
        "nuclei": int(len(data["nuclei"])),
        "mean_cells_per_spot": float(data["true_counts"].sum() / slide.n_obs),
    }
    return out


def _markdown(res: dict) -> str:
    seeds = [k for k in res if k.startswith("seed")]
    methods = [m for m in res[seeds[0]] if not m.startswith("_")]
    uni = int("uniform_seed0" in res)
    lines = [
        f"Realistic slides, seeds {', '.join(s[4:] for s in seeds)}, {res['epochs']}+{res['epochs']} epochs; "
        "median Pearson r on log1p (per gene | per sub-spot)",
        "",
        "| method | " + " | ".join(seeds) + " | mean |" + (" uniform morphology, seed0 |" if uni else ""),
        "|---|" + "---|" * (len(seeds) + 1 + uni),
    ]
    for m in methods:
        cells = [f"{res[s][m]['gene_r']:.3f} \\| {res[s][m]['subspot_r']:.3f}" for s in seeds]
        mean = res["mean"][m]
        tail = ""
        if uni:
            u = res["uniform_seed0"].get(m)
            tail = f" {u['gene_r']:.3f} \\| {u['subspot_r']:.3f} |" if u else " |"
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {mean['gene_r']:.3f} \\| {mean['subspot_r']:.3f} |" + tail)
    return "\n".join(lines) + "\n"


def _figure(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    seeds = [k for k in res if k.startswith("seed")]
    methods = [m for m in res[seeds[0]] if not m.startswith("_")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.35 * len(methods) + 1.5), sharey=True)
    for ax, key in zip(axes, ("gene_r", "subspot_r")):
        for i, m in enumerate(methods):
            vals = [res[s][m][key] for s in seeds]
            ax.scatter(vals, [i] * len(vals), s=18, color="C1" if m.startswith("soscope") else "C0")
            ax.plot([np.mean(vals)] * 2, [i - 0.3, i + 0.3], color="k", lw=1)
        ax.set_yticks(range(len(methods)), methods)
        ax.set_xlabel(f"median {key.replace('_', ' ')} (log1p)")
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle("Enhanced sub-spots vs simple splits (realistic slides; dots = seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(
    quick: bool = False,
    out_dir: str | Path | None = None,
    cache: str | Path | None = None,
    epochs: int | None = None,
    published: bool = True,
    uniform: bool = True,
) -> dict:
    """Every method on realistic slides of ``SEEDS``; writes JSON, markdown and a figure; returns the figures."""
    import torch

    torch.set_num_threads(1)
    cache = Path(cache) if cache else Path(tempfile.gettempdir()) / "spatial_assets_realistic_slides"
    seeds, default_epochs = (SEEDS[:1], 100) if quick else (SEEDS, 400)
    epochs = epochs or default_epochs
    res: dict = {"epochs": epochs}
    configs = dict(CONFIGS)
    if published:
        configs["soscope_published"] = {
            "nuclei_offset": False,
            "image_pca": None,
            "conserve": False,
            "lr": 5e-4,
            "nuclei_morphology_features": [],
        }
    for seed in seeds:
        res[f"seed{seed}"] = evaluate_slide(load_slide(seed, cache), epochs, configs=configs)
    if uniform:  # nuclei that do not follow the cell type: no morphology gain is possible, none must hurt
        res["uniform_seed0"] = evaluate_slide(load_slide(0, cache, morphology="uniform"), epochs, configs=configs)
    methods = [m for m in res[f"seed{seeds[0]}"] if not m.startswith("_")]
    res["mean"] = {
        m: {key: float(np.mean([res[f"seed{s}"][m][key] for s in seeds])) for key in ("gene_r", "subspot_r")}
        for m in methods
    }
    mean = res["mean"]
    res["soscope_minus_nuclei_split"] = {
        key: mean["soscope_X"][key] - mean["nuclei_split"][key] for key in ("gene_r", "subspot_r")
    }
    if "soscope_typed_X" in mean:
        res["soscope_typed_minus_typed_split"] = {
            key: mean["soscope_typed_X"][key] - mean["typed_split_pred_cell_class"][key]
            for key in ("gene_r", "subspot_r")
        }
        res["soscope_typed_minus_nuclei_split"] = {
            key: mean["soscope_typed_X"][key] - mean["nuclei_split"][key] for key in ("gene_r", "subspot_r")
        }
    out = Path(out_dir) if out_dir else HERE / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "realistic_subspots.json").write_text(json.dumps(res, indent=2))
    (out / "realistic_subspots.md").write_text(_markdown(res))
    _figure(res, out / "realistic_subspots.png")
    return res


if __name__ == "__main__":
    args = sys.argv[1:]
    out_arg = args[args.index("--out") + 1] if "--out" in args else None
    ep_arg = int(args[args.index("--epochs") + 1]) if "--epochs" in args else None
    cache_arg = args[args.index("--cache") + 1] if "--cache" in args else None
    r = run(
        "--quick" in args,
        out_arg,
        cache_arg,
        ep_arg,
        published="--no-published" not in args,
        uniform="--no-uniform" not in args,
    )
    print(_markdown(r))
    for key in ("soscope_minus_nuclei_split", "soscope_typed_minus_typed_split", "soscope_typed_minus_nuclei_split"):
        print(key, "(mean over seeds):", r.get(key))
