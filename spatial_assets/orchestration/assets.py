"""The asset graph. Thin wiring: each asset reads its upstream stores, calls the pure science module, writes its
stores atomically and reports metadata (paths, shapes, sizes, figures). No science here.

    reference_data ─┬──────────────────────────────► score_checkpoint ──────────┐
                    │                                                           ▼
    slide_inputs ──►├► segmented_slide ──► typed_cells ──────────────────► decomposed_cells (sample x spot range)
                    │          │                                                │
                    │          └────────────────────► enhanced_subspots         ▼
                    └──────────────────────────────────────────────► decomposed_cells_by_sample
    typed_cells (all samples of a slices group) ──► combined_slices (one partition per group: the 3D view)

Platforms (samples[].platform): visium (segmentation of the H&E), slideseq (each bead a cell; RCTD doublet mode
makes 1 or 2 cells per bead), merfish (each imaged cell its own spot; model genes missing from the panel are
imputed by the decomposition). Samples sharing ``slices`` are typed jointly, with Potts neighbours in 3D.
"""


import base64
import json
import time
from pathlib import Path

import anndata as ad
import dagster as dg
import numpy as np
import pandas as pd

from .. import storage
from ..config import ProjectConfig
from .partitions import (decomposition_partitions, range_bounds, references_partitions, samples_partitions)
from .resources import CPU_OP_TAGS, GPU_OP_TAGS, ComputeResource, ProjectResource

CODE_VERSION = {
    "reference_data": "1", "slide_inputs": "1", "segmented_slide": "1", "typed_cells": "1",
    "score_checkpoint": "1", "decomposed_cells": "1", "decomposed_cells_by_sample": "1", "enhanced_subspots": "1",
    "combined_slices": "1",
}
IMAGE_FREE = ("slideseq", "merfish")  # every spot / bead / imaged cell is a cell: no nuclei segmentation
GPU_RETRY = dg.RetryPolicy(max_retries=2, delay=5)
# Keep downstream assets up to date when a reference, a checkpoint or typed cells change (declarative automation,
# evaluated by Dagster's default automation-condition sensor once it is turned on in the UI).
EAGER = dg.AutomationCondition.eager()


# -------------------------------------------------------------------------------------------------------------
# metadata helpers
# -------------------------------------------------------------------------------------------------------------
def png_md(png: bytes, alt: str = "figure") -> dg.MetadataValue:
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})")


def store_md(path: Path, prefix: str = "") -> dict:
    d = storage.describe(path)
    out = {f"{prefix}path": dg.MetadataValue.path(d["path"]), f"{prefix}size_bytes": d["size_bytes"]}
    if "shape" in d:
        out[f"{prefix}shape"] = dg.MetadataValue.json(d["shape"]) if isinstance(d["shape"], dict) else str(
            tuple(d["shape"]))
    return out


def _plain(v):
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, (list, tuple)) and len(v) > 20:
        return f"{len(v)} items"
    if isinstance(v, dict):
        return json.dumps(v, default=str)[:2000]
    if isinstance(v, (int, float, str, bool)) or v is None:
        return v
    return str(v)[:2000]


def info_md(info: dict, keys: list[str] | None = None) -> dict:
    out = {}
    for k, v in info.items():
        if keys is not None and k not in keys:
            continue
        pv = _plain(v)
        if pv is not None:
            out[k] = pv
    return out


def _sample_key(context) -> str:
    return context.partition_key


def _reference_for(project: ProjectResource, sample: str):
    s = project.config.sample(sample)
    return project.config.reference(s.reference)


def _typing_inputs(project: ProjectResource, sample: str) -> tuple[ad.AnnData, pd.DataFrame]:
    """A sample's slide (QC-passing spots; imaging counts rounded) and segmented cells, from their stores."""
    from ..platforms import integer_counts

    spath = project.store("slide_inputs", sample)
    folder = project.folder("segmented_slide", sample)
    for p, asset in ((spath, "slide_inputs"), (folder / "cells.zarr", "segmented_slide")):
        if not storage.is_complete(p):
            raise FileNotFoundError(f"{p}: {asset} of sample '{sample}' is not materialized (needed by typed_cells "
                                    f"of its slices group: materialize {asset} for every slice first)")
    slide = storage.read_anndata(spath)
    cells = storage.read_dataframe(folder / "cells.zarr")
    spots = storage.read_dataframe(folder / "spots.zarr")
    if "qc_pass" in spots:
        slide = slide[spots.loc[slide.obs_names, "qc_pass"].astype(bool).to_numpy()].copy()
        cells = cells[cells["spot"].isin(slide.obs_names)]
    if project.config.sample(sample).platform == "merfish":
        slide, _ = integer_counts(slide)
    return slide, cells


def _device(compute: ComputeResource, context) -> tuple[str, dict]:
    dev, warn = compute.device(context)
    md = {"device": dev}
    if warn:
        md["device_warning"] = warn
    return dev, md


# -------------------------------------------------------------------------------------------------------------
# assets
# -------------------------------------------------------------------------------------------------------------
def build_assets(cfg: ProjectConfig) -> list:
    refs_part = references_partitions(cfg)

    @dg.asset(partitions_def=refs_part, group_name="inputs", code_version=CODE_VERSION["reference_data"],
              kinds={"anndata", "zarr"}, op_tags=CPU_OP_TAGS)
    def reference_data(context: dg.AssetExecutionContext, project: ProjectResource) -> dg.MaterializeResult:
        """A scRNA-seq reference: raw counts and cell types, validated and stored as AnnData zarr."""
        from ..readers import InputError, validate_counts

        ref_cfg = project.config.reference(context.partition_key)
        try:
            adata = ad.read_h5ad(ref_cfg.path)
        except Exception as e:
            raise InputError(f"{ref_cfg.path}: could not be read as an AnnData .h5ad ({e})") from None
        if ref_cfg.cell_type_key not in adata.obs:
            raise InputError(f"{ref_cfg.path}: obs has no cell-type column '{ref_cfg.cell_type_key}' "
                             f"(references[{ref_cfg.name}].cell_type_key); columns: {list(adata.obs.columns)}")
        validate_counts(adata, str(ref_cfg.path), require_integer=False)
        adata.var_names_make_unique()
        path = storage.write_anndata(adata, project.store("reference_data", ref_cfg.name),
                                     info={"source": str(ref_cfg.path)})
        types = adata.obs[ref_cfg.cell_type_key].astype(str).value_counts()
        return dg.MaterializeResult(metadata={
            **store_md(path), "cells": adata.n_obs, "genes": adata.n_vars, "cell_types": len(types),
            "cells_per_type": dg.MetadataValue.md(types.to_frame("cells").to_markdown()),
            "cell_type_key": ref_cfg.cell_type_key, "source": str(ref_cfg.path)})

    @dg.asset(partitions_def=samples_partitions, group_name="inputs", code_version=CODE_VERSION["slide_inputs"],
              kinds={"anndata", "zarr"}, op_tags=CPU_OP_TAGS)
    def slide_inputs(context: dg.AssetExecutionContext, project: ProjectResource) -> dg.MaterializeResult:
        """A sample's spot counts (AnnData zarr) and H&E image (chunked zarr), validated: counts, coordinates,
        scale factors, and that the image covers the spots."""
        from ..readers import (check_image_covers_spots, read_image, read_spatial, scalefactors,
                               validate_counts)

        sample = _sample_key(context)
        s = project.config.sample(sample)
        slide = read_spatial(s.spatial)
        validate_counts(slide, str(s.spatial), require_integer=s.platform != "merfish")
        slide.uns["sample"] = {"name": sample, "platform": s.platform, "source": str(s.spatial),
                               "image": str(s.image) if s.image else "none", "z": s.z,
                               "slices": s.slices or "none"}
        md: dict = {"spots": slide.n_obs, "genes": slide.n_vars, "platform": s.platform,
                    "median_umi": float(np.median(np.asarray(slide.X.sum(1)).ravel()))}
        if s.image is not None:
            scalefactors(slide, str(s.spatial))
            img = read_image(s.image)
            check_image_covers_spots(img.shape[:2], slide, str(s.spatial), str(s.image))
            ipath = storage.write_arrays({"image": img}, project.store("slide_image", sample),
                                         chunks=(1024, 1024, 3), attrs={"source": str(s.image)})
            md.update(store_md(ipath, "image_"))
            md["image_hw"] = str(tuple(img.shape[:2]))
        path = storage.write_anndata(slide, project.store("slide_inputs", sample))
        md.update(store_md(path))
        return dg.MaterializeResult(metadata=md)

    @dg.asset(partitions_def=samples_partitions, group_name="spatialscope", deps=[slide_inputs],
              code_version=CODE_VERSION["segmented_slide"], kinds={"stardist", "zarr"}, op_tags=GPU_OP_TAGS,
              pool="gpu", retry_policy=GPU_RETRY)
    def segmented_slide(context: dg.AssetExecutionContext, project: ProjectResource,
                        compute: ComputeResource) -> dg.MaterializeResult:
        """SpatialScope step 1: nuclei segmentation of the H&E (StarDist or watershed) -> label image (zarr),
        cells with positions and spot, cells per spot, spot QC."""
        from .. import segmentation as seg
        from ..plots import segmentation as seg_plots

        sample = _sample_key(context)
        s = project.config.sample(sample)
        params = project.params(sample).segmentation
        slide = storage.read_anndata(project.store("slide_inputs", sample))
        folder = project.folder("segmented_slide", sample)
        t0 = time.time()
        md: dict = {}
        if s.image is None or s.platform in IMAGE_FREE:
            if s.platform not in IMAGE_FREE:
                raise ValueError(f"sample '{sample}': platform {s.platform} needs an H&E image "
                                 f"(samples[{sample}].image) for nuclei segmentation")
            from ..platforms import cells_from_spots

            cells, spots, summary = cells_from_spots(slide, platform=s.platform)
            labels = None
            info = {"method": "none", "reason": f"{s.platform}: each spot/bead is a cell (no image)"}
        else:
            dev, dmd = _device(compute, context)
            md.update(dmd)
            image = storage.read_arrays(project.store("slide_image", sample), ["image"], lazy=True)["image"]
            res, cells, spots, summary = seg.segment_slide(image, slide, params)
            labels, info = res.labels, res.info
        with storage.atomic_path(folder) as tmp:
            tmp.mkdir(parents=True)
            if labels is not None:
                storage.write_arrays({"labels": labels}, tmp / "labels.zarr", chunks=(1024, 1024),
                                     attrs={"info": info})
            storage.write_dataframe(cells, tmp / "cells.zarr")
            storage.write_dataframe(spots, tmp / "spots.zarr", info={"summary": summary})
        md.update({"seconds": round(time.time() - t0, 1), **info_md(info), **info_md(summary),
                   "path": dg.MetadataValue.path(str(folder)), "size_bytes": storage.disk_size(folder),
                   **store_md(folder / "cells.zarr", "cells_"), "cells": len(cells)})
        if labels is not None:
            md.update(store_md(folder / "labels.zarr", "labels_"))
            try:
                md["qc_figure"] = png_md(seg_plots.segmentation_qc_png(image, labels, spots, seg.spot_diameter_px(slide),
                                                                       cells=cells), "segmentation QC")
            except Exception as e:  # a figure must never fail the step
                context.log.warning(f"QC figure failed: {e}")
        return dg.MaterializeResult(metadata=md)

    @dg.asset(partitions_def=samples_partitions, group_name="spatialscope",
              deps=[segmented_slide, slide_inputs, dg.AssetDep(reference_data, partition_mapping=dg.AllPartitionMapping())],
              code_version=CODE_VERSION["typed_cells"], kinds={"anndata", "zarr"}, op_tags=CPU_OP_TAGS,
              automation_condition=EAGER)
    def typed_cells(context: dg.AssetExecutionContext, project: ProjectResource) -> dg.MaterializeResult:
        """SpatialScope step 2: RCTD spot deconvolution (Poisson-lognormal), a type per segmented cell with a Potts
        prior, and the gene-wise platform effect."""
        from .. import celltyping, platforms
        from ..plots import celltyping as ct_plots

        sample = _sample_key(context)
        s = project.config.sample(sample)
        ref_cfg = _reference_for(project, sample)
        params = project.params(sample)
        reference = storage.read_anndata(project.store("reference_data", ref_cfg.name))
        slide, cells = _typing_inputs(project, sample)
        # Slide-seq beads: RCTD doublet mode (1 or 2 cells per bead); other platforms: full mode + Potts labels
        kw = {"max_cells_per_spot": params.segmentation.max_cells_per_spot,
              "mode": "doublet" if s.platform == "slideseq" else "full"}
        if s.platform == "slideseq":
            kw.update(class_key=ref_cfg.class_key,
                      confidence_threshold=params.cell_typing.doublet_confidence_threshold,
                      doublet_threshold=params.cell_typing.doublet_threshold,
                      doublet_offset=params.cell_typing.doublet_offset)
        group = [t for t in project.config.all_samples() if s.slices and t.slices == s.slices]
        t0 = time.time()
        md: dict = {"platform": s.platform, "typing_mode": kw["mode"]}
        if len(group) > 1:
            # aligned slices: typed jointly on the stacked slides (micrometres, z from the config), so the Potts
            # neighbours are found in 3D; only this slice's cells and spots are kept
            other = sorted({t.platform for t in group} - {s.platform})
            if other:
                raise ValueError(f"slices group '{s.slices}': sample '{sample}' is {s.platform} but other slices are "
                                 f"{other}; slices of a group must share a platform")
            inputs = {t.name: (slide, cells) if t.name == sample else _typing_inputs(project, t.name) for t in group}
            um = {t.name: platforms.microns_per_pixel(inputs[t.name][0], t.platform)[0] for t in group}
            joint_slide, joint_cells = platforms.stack_slices(inputs, {t.name: t.z for t in group}, um)
            joint = celltyping.identify_cell_types(joint_slide, reference, ref_cfg.cell_type_key, joint_cells,
                                                   params.cell_typing, **kw)
            res = platforms.unstack_result(joint, sample, um[sample])
            md.update({"slices_group": s.slices, "slices": ", ".join(t.name for t in group), "z_um": s.z,
                       "um_per_px": um[sample], "cells_all_slices": len(joint.cells)})
        else:
            res = celltyping.identify_cell_types(slide, reference, ref_cfg.cell_type_key, cells, params.cell_typing,
                                                 **kw)
        out = project.folder("typed_cells", sample)
        pe = res.platform_effect.rename("estimated_be").to_frame()
        with storage.atomic_path(out) as tmp:
            tmp.mkdir(parents=True)
            storage.write_dataframe(res.cells, tmp / "cells.zarr", info={"cell_type_key": ref_cfg.cell_type_key})
            storage.write_dataframe(res.weights, tmp / "weights.zarr")
            storage.write_dataframe(pe, tmp / "platform_effect.zarr")
            if res.beads is not None:
                storage.write_dataframe(res.beads, tmp / "beads.zarr")
        counts = res.cells["cell_type"].astype(str).value_counts()
        if res.beads is not None:
            md["bead_classes"] = dg.MetadataValue.md(
                res.beads["spot_class"].astype(str).value_counts().to_frame("beads").to_markdown())
        md.update({"seconds": round(time.time() - t0, 1), "cells": len(res.cells), "spots": len(res.weights),
                   "sigma": float(res.sigma), **info_md(res.info),
                   "path": dg.MetadataValue.path(str(out)), "size_bytes": storage.disk_size(out),
                   "cell_type_counts": dg.MetadataValue.md(counts.to_frame("cells").to_markdown()),
                   **store_md(out / "cells.zarr", "cells_")})
        try:
            md["cell_types_figure"] = png_md(ct_plots.cell_types_png(res.cells), "cell types")
            xy = pd.DataFrame(np.asarray(slide.obsm["spatial"])[:, :2], index=slide.obs_names,
                              columns=["x", "y"]).loc[res.weights.index]
            md["proportions_figure"] = png_md(ct_plots.spot_proportions_png(res.weights, xy), "spot proportions")
        except Exception as e:
            context.log.warning(f"figure failed: {e}")
        return dg.MaterializeResult(metadata=md)

    @dg.asset(partitions_def=refs_part, group_name="spatialscope", deps=[reference_data],
              code_version=CODE_VERSION["score_checkpoint"], kinds={"pytorch", "safetensors"}, op_tags=GPU_OP_TAGS,
              pool="gpu", retry_policy=GPU_RETRY, automation_condition=EAGER)
    def score_checkpoint(context: dg.AssetExecutionContext, project: ProjectResource,
                         compute: ComputeResource) -> dg.MaterializeResult:
        """A cell-type-conditioned score model of the reference (denoising score matching over a geometric noise
        schedule). Saved periodically: a restarted materialization resumes from the last saved step."""
        from .. import score_model as sm
        from ..plots import score_model as sm_plots

        ref_cfg = project.config.reference(context.partition_key)
        params = project.config.parameters.score_model
        reference = storage.read_anndata(project.store("reference_data", ref_cfg.name))
        dev, md = _device(compute, context)
        out = project.store("score_checkpoint", ref_cfg.name, suffix="")
        t0 = time.time()
        model = sm.train_score_model(reference, ref_cfg.cell_type_key, params, out, device=dev, log=context.log.info)
        (out / ".complete").write_text(json.dumps({"complete": True, "written_at": time.time()}))
        md.update({"seconds": round(time.time() - t0, 1), "path": dg.MetadataValue.path(str(out)),
                   "size_bytes": storage.disk_size(out), "genes": len(model.genes),
                   "cell_types": len(model.cell_types), "noise_levels": int(len(model.sigmas)),
                   "decomposition_step": float(model.decomposition_step)})
        try:
            train = sm.prepare_training_data(reference, ref_cfg.cell_type_key, params, genes=model.genes,
                                             target_sum=model.target_sum)
            q = sm.evaluate_samples(model, reference, n_per_type=100, level_stride=1, seed=0, return_samples=True,
                                    train_data=train, min_cells=3)
            metrics = {k: float(v) for k, v in q["model"].items() if isinstance(v, (int, float))}
            base = {f"gaussian_{k}": float(v) for k, v in q["diag_gaussian"].items() if isinstance(v, (int, float))}
            (out / "quality.json").write_text(json.dumps({**metrics, **base, "n_cells": q["n_cells"],
                                                          "level_stride": 1, "against": "reference cells"}))
            md.update({f"quality_{k}": v for k, v in metrics.items()})
            md["real_vs_generated"] = png_md(sm_plots.plot_real_vs_generated(
                q["real"], q["type_idx"], q["samples"], q["type_idx"], model.cell_types), "real vs generated")
        except Exception as e:
            context.log.warning(f"quality evaluation failed: {e}")
        return dg.MaterializeResult(metadata=md)

    @dg.asset(partitions_def=decomposition_partitions, group_name="spatialscope",
              deps=[dg.AssetDep(typed_cells, partition_mapping=dg.MultiToSingleDimensionPartitionMapping("sample")),
                    dg.AssetDep(slide_inputs, partition_mapping=dg.MultiToSingleDimensionPartitionMapping("sample")),
                    dg.AssetDep(score_checkpoint, partition_mapping=dg.AllPartitionMapping())],
              code_version=CODE_VERSION["decomposed_cells"], kinds={"anndata", "zarr"}, op_tags=GPU_OP_TAGS,
              pool="gpu", retry_policy=GPU_RETRY, automation_condition=EAGER)
    def decomposed_cells(context: dg.AssetExecutionContext, project: ProjectResource,
                         compute: ComputeResource) -> dg.MaterializeResult:
        """SpatialScope step 3 for one spot range of one sample: annealed Langevin decomposition of each spot's
        counts into its cells' expression (AnnData zarr per partition)."""
        from .. import decomposition as dec
        from ..score_model import ScoreModel

        keys = context.partition_key.keys_by_dimension
        sample, rkey = keys["sample"], keys["spot_range"]
        ref_cfg = _reference_for(project, sample)
        params = project.params(sample).decomposition
        start, stop = range_bounds(rkey, project.config.partitions.spot_range_size)
        slide = storage.read_anndata(project.store("slide_inputs", sample))
        tfolder = project.folder("typed_cells", sample)
        cells = storage.read_dataframe(tfolder / "cells.zarr")
        pe = storage.read_dataframe(tfolder / "platform_effect.zarr")["estimated_be"]
        ckpt = project.store("score_checkpoint", ref_cfg.name, suffix="")
        if not storage.is_complete(ckpt):
            raise FileNotFoundError(f"{ckpt}: score checkpoint of reference '{ref_cfg.name}' is not materialized")
        dev, md = _device(compute, context)
        platform = project.config.sample(sample).platform
        if platform in IMAGE_FREE:
            # an imaged cell / bead that cell typing skipped (no counts on its informative genes) has no type
            from ..celltyping import UNASSIGNED

            untyped = cells["cell_type"].astype(str).to_numpy() == UNASSIGNED
            cells = cells.loc[~untyped]
            md["cells_untyped_not_decomposed"] = int(untyped.sum())
        model = ScoreModel.load(ckpt, device=dev)
        model.check_compatible(cell_type_key=ref_cfg.cell_type_key)
        inputs = dec.prepare_spots(slide, cells, model, pe, spot_range=(start, stop),
                                   leave_out_genes=params.leave_out_genes)
        if platform == "merfish":
            # imaging panel: model genes absent from the slide get no spot term, i.e. they are imputed
            md.update({"genes_measured": int(inputs.in_slide.sum()), "genes_imputed": int((~inputs.in_slide).sum())})
        res = dec.decompose(inputs, model, params, device=dev, log=context.log.info)
        path = storage.write_anndata(res.adata, project.store("decomposed_cells", sample, rkey),
                                     info={"spot_range": [start, stop]})
        md.update({**store_md(path), "spot_range": f"{start}..{stop - 1}", **info_md(res.info)})
        return dg.MaterializeResult(metadata=md)

    @dg.asset(partitions_def=samples_partitions, group_name="spatialscope",
              deps=[dg.AssetDep(decomposed_cells,
                                partition_mapping=dg.MultiToSingleDimensionPartitionMapping("sample"))],
              code_version=CODE_VERSION["decomposed_cells_by_sample"], kinds={"anndata", "zarr"}, op_tags=CPU_OP_TAGS,
              automation_condition=EAGER)
    def decomposed_cells_by_sample(context: dg.AssetExecutionContext, project: ProjectResource
                                   ) -> dg.MaterializeResult:
        """All decomposed spot ranges of a sample combined into one AnnData of every cell."""
        sample = _sample_key(context)
        folder = project.folder("decomposed_cells", sample)
        parts = sorted(folder.glob("*.zarr")) if folder.exists() else []
        done = [p for p in parts if storage.is_complete(p)]
        if not done:
            raise FileNotFoundError(f"{folder}: no decomposed spot range of sample '{sample}' is materialized yet")
        adatas = [storage.read_anndata(p) for p in done]
        adatas = [a for a in adatas if a.n_obs]
        combined = ad.concat(adatas, merge="same", uns_merge=None) if adatas else ad.AnnData()
        combined.uns["spot_ranges"] = [p.stem for p in done]
        path = storage.write_anndata(combined, project.store("decomposed_cells_by_sample", sample))
        return dg.MaterializeResult(metadata={**store_md(path), "cells": combined.n_obs,
                                              "spot_ranges": ", ".join(p.stem for p in done)})

    @dg.asset(partitions_def=samples_partitions, group_name="soscope", deps=[slide_inputs, segmented_slide],
              code_version=CODE_VERSION["enhanced_subspots"], kinds={"pytorch", "anndata"}, op_tags=GPU_OP_TAGS,
              pool="gpu", retry_policy=GPU_RETRY)
    def enhanced_subspots(context: dg.AssetExecutionContext, project: ProjectResource,
                          compute: ComputeResource) -> dg.MaterializeResult:
        """soScope: each spot as the sum of its sub-spots, enhanced by a graph-transformer VAE with image features."""
        from .. import soscope
        from ..plots import soscope as so_plots

        sample = _sample_key(context)
        s = project.config.sample(sample)
        params = project.params(sample).soscope
        slide = storage.read_anndata(project.store("slide_inputs", sample))
        image = None
        if s.image is not None and params.image_features != "none":  # with 'none' soScope never reads the image
            image = np.asarray(storage.read_arrays(project.store("slide_image", sample), ["image"], lazy=True)["image"])
        nuclei = None
        cpath = project.folder("segmented_slide", sample) / "cells.zarr"
        if storage.is_complete(cpath):
            nuclei = storage.read_dataframe(cpath)
        dev, md = _device(compute, context)
        t0 = time.time()
        res = soscope.enhance(slide, params, platform=s.platform, image=image, nuclei=nuclei, device=dev,
                              log=context.log.info, grid_subdivision=s.grid_subdivision)
        path = storage.write_anndata(res.adata, project.store("enhanced_subspots", sample))
        md.update({"seconds": round(time.time() - t0, 1), **store_md(path), **info_md(res.info)})
        try:
            md["marker_maps"] = png_md(so_plots.enhanced_maps(slide, res.adata), "spot vs enhanced")
        except Exception as e:
            context.log.warning(f"figure failed: {e}")
        return dg.MaterializeResult(metadata=md)

    groups = sorted({s.slices for s in cfg.all_samples() if s.slices})

    @dg.asset(partitions_def=dg.StaticPartitionsDefinition(groups or ["none"]), group_name="spatialscope",
              deps=[dg.AssetDep(typed_cells, partition_mapping=dg.AllPartitionMapping())],
              code_version=CODE_VERSION["combined_slices"], kinds={"pandas", "zarr"}, op_tags=CPU_OP_TAGS)
    def combined_slices(context: dg.AssetExecutionContext, project: ProjectResource) -> dg.MaterializeResult:
        """Aligned slices (samples sharing ``slices``): the typed cells of all of them in one 3D table (x_um, y_um,
        z_um, slice, cell_type, ...), one partition per slices group. Per-slice results stay in typed_cells."""
        from .. import platforms
        from ..plots import celltyping as ct_plots

        group = context.partition_key
        members = [s for s in project.config.all_samples() if s.slices == group]
        if not members:
            raise ValueError(f"slices group '{group}': no sample of {project.config.source} has slices: {group}")
        per, z, um = {}, {}, {}
        for s in members:
            cpath = project.folder("typed_cells", s.name) / "cells.zarr"
            if not storage.is_complete(cpath):
                raise FileNotFoundError(f"{cpath}: typed_cells of slice '{s.name}' (group '{group}') is not "
                                        "materialized")
            per[s.name] = storage.read_dataframe(cpath)
            um[s.name] = platforms.microns_per_pixel(storage.read_anndata(project.store("slide_inputs", s.name)),
                                                     s.platform)[0]
            z[s.name] = s.z
        view = platforms.combined_view(per, z, um)
        k = project.params(members[0].name).cell_typing.n_neighbors
        frac = platforms.cross_slice_fraction(view[["x_um", "y_um", "z_um"]].to_numpy(), view["slice"], k)
        path = storage.write_dataframe(view, project.store("combined_slices", group),
                                       info={"slices": {n: {"z_um": z[n], "um_per_px": um[n]} for n in per}})
        tab = pd.crosstab(view["cell_type"].astype(str), view["slice"])
        md = {**store_md(path), "cells": len(view), "slices": ", ".join(f"{n} (z={z[n]:g} um)" for n in per),
              "cross_slice_neighbour_fraction": frac,
              "cell_types_per_slice": dg.MetadataValue.md(tab.to_markdown())}
        try:  # slices side by side, in micrometres
            width = float(view["x_um"].max() - view["x_um"].min()) * 1.1 + 1.0
            order = {n: i for i, n in enumerate(sorted(per, key=lambda n: z[n]))}
            fig_df = pd.DataFrame({"x": view["x_um"].to_numpy() + view["slice"].map(order).to_numpy() * width,
                                   "y": view["y_um"].to_numpy(), "cell_type": view["cell_type"].astype(str).to_numpy()})
            md["slices_figure"] = png_md(ct_plots.cell_types_png(fig_df, title="Slices by height (um)"), "slices")
        except Exception as e:
            context.log.warning(f"figure failed: {e}")
        return dg.MaterializeResult(metadata=md)

    return [reference_data, slide_inputs, segmented_slide, typed_cells, score_checkpoint, decomposed_cells,
            decomposed_cells_by_sample, enhanced_subspots, combined_slices]
