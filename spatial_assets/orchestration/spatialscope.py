"""SpatialScope's assets: segmented slide -> typed cells -> (score checkpoint) -> decomposed cells per spot range
-> decomposed cells per sample, with their checks. Thin wiring: read stores, call one science function, write
stores atomically, report metadata."""

import json
import time

import dagster as dg
import numpy as np
import pandas as pd

from .. import celltyping, decomposition, generative, pl, platforms, segmentation
from .. import io as sio
from ..constants import UNASSIGNED, Platform
from .code_versions import code_version
from .metadata import Report, check_result, name_items
from .partitions import (
    decomposition_partitions,
    n_ranges,
    range_bounds,
    range_key,
    references_partitions,
    samples_partitions,
)
from .preflight import accuracy_warnings
from .resources import CPU_OP_TAGS, GPU_OP_TAGS, ComputeResource, ProjectResource
from .retries import run_with_transient_retries, scaled

# No blanket RetryPolicy: GPU steps retry transient faults only (CUDA OOM with a smaller batch, a lost worker),
# see retries.py; input errors fail at once.
# Keep downstream assets up to date when a reference, a checkpoint or typed cells change (declarative automation,
# evaluated by Dagster's default automation-condition sensor once it is turned on in the UI).
EAGER = dg.AutomationCondition.eager()
BY_SAMPLE = dg.MultiToSingleDimensionPartitionMapping("sample")


def _device(compute: ComputeResource, context, report: Report) -> str:
    dev, warn = compute.device(context)
    report.value(device=dev)
    if warn:
        report.value(device_warning=warn)
    return dev


def _slide(project: ProjectResource, sample: str):
    """A sample's spots as typing and decomposition see them: slide_inputs' spots, or on Visium HD the cells
    (bins summed per segmented nucleus, written by segmented_slide), each its own spot."""
    if project.sample(sample).platform == Platform.VISIUM_HD:
        path = project.stores.segmented(sample).bin_cells
        _require(path, "segmented_slide", sample, "cell typing and decomposition (Visium HD cells)")
        return sio.read_anndata(path)
    return sio.read_anndata(project.stores.slide(sample))


def _register_cell_ranges(context, project: ProjectResource, n_cells: int) -> None:
    """Add the spot-range partition keys that ``n_cells`` cells need (Visium HD: known after segmentation)."""
    from .partitions import SPOT_RANGES

    size = project.config.partitions.spot_range_size
    have = set(context.instance.get_dynamic_partitions(SPOT_RANGES))
    new = [range_key(i) for i in range(n_ranges(n_cells, size)) if range_key(i) not in have]
    if new:
        context.instance.add_dynamic_partitions(SPOT_RANGES, new)
        context.log.info(f"added spot-range partitions {new} for {n_cells} Visium HD cells")


def _require(path, asset: str, sample: str, needed_by: str) -> None:
    if not sio.is_complete(path):
        raise FileNotFoundError(
            f"{path}: {asset} of sample '{sample}' is not materialized (needed by {needed_by}: "
            f"materialize {asset} first)"
        )


# -------------------------------------------------------------------------------------------------------------
# segmented slide
# -------------------------------------------------------------------------------------------------------------
@dg.asset(
    partitions_def=samples_partitions,
    group_name="spatialscope",
    deps=["slide_inputs"],
    code_version=code_version("segmented_slide"),
    kinds={"stardist", "zarr"},
    op_tags=GPU_OP_TAGS,
    pool="gpu",
)
def segmented_slide(
    context: dg.AssetExecutionContext, project: ProjectResource, compute: ComputeResource
) -> dg.MaterializeResult:
    """SpatialScope step 1: nuclei segmentation of the H&E (StarDist or watershed) -> label image (zarr),
    cells with positions and spot, cells per spot, spot QC. Image-free platforms: one cell per spot."""
    s = project.sample(context.partition_key)
    report = Report(context.log.warning)
    slide = sio.read_anndata(project.stores.slide(s.name))
    image = None
    if s.image is not None and not s.platform.image_free:
        _device(compute, context, report)
        image = sio.read_arrays(project.stores.slide_image(s.name), ["image"], lazy=True)["image"]
    t0 = time.time()
    bin_cells = None
    if s.platform == Platform.VISIUM_HD:  # nuclei of the H&E, the bins under each summed: cells replace the spots
        res, bin_cells = run_with_transient_retries(
            context,
            lambda _scale: platforms.segment_bins(
                slide,
                image,
                project.params(s.name).segmentation,
                expand_um=s.expand_um,
                sample=s.name,
                log=context.log.info,
            ),
        )
        slide = bin_cells  # the QC figure shows the cells as spots
    else:
        res = run_with_transient_retries(
            context,
            lambda _scale: segmentation.segment_sample(
                slide, image, s.platform, project.params(s.name).segmentation, sample=s.name, log=context.log.info
            ),
        )
    out = project.stores.segmented(s.name)
    with sio.atomic_path(out.folder) as tmp:
        tmp.mkdir(parents=True)
        t = out.inside(tmp)
        if res.labels is not None:
            sio.write_arrays({"labels": res.labels}, t.labels, chunks=(1024, 1024), attrs={"info": res.info})
        sio.write_dataframe(res.cells, t.cells)
        sio.write_dataframe(res.spots, t.spots, info={"summary": res.summary})
        if bin_cells is not None:
            sio.write_anndata(bin_cells, t.bin_cells)
    if bin_cells is not None:  # decomposition ranges of the cells (known only now), added to the instance
        _register_cell_ranges(context, project, bin_cells.n_obs)
        report.store(out.bin_cells, "bin_cells_")
    if res.labels is not None:
        report.figure(
            "qc_figure",
            lambda: pl.segmentation_qc(
                image, res.labels, res.spots, segmentation.spot_diameter_px(slide), cells=res.cells
            ),
        )
    _, problem = sio.spots_with_nuclei_problem(res.spots["n_cells"].to_numpy(), s.name)
    if problem:
        context.log.warning(problem)
    report.value(method=res.info.get("method"), seconds=round(time.time() - t0, 1), cells=len(res.cells), **res.summary)
    report.folder(out.folder)
    report.store(out.cells, "cells_")
    if res.labels is not None:
        report.store(out.labels, "labels_")
    report.details(**res.info)
    return report.result()


@dg.asset_check(
    asset=segmented_slide,
    blocking=True,
    description="cells per spot within 0..max_cells_per_spot, and nuclei in at least half the spots "
    "(fewer: coordinates off the tissue, e.g. x / y swapped)",
)
def cells_per_spot_in_range(context: dg.AssetCheckExecutionContext, project: ProjectResource):
    sample = context.partition_key
    spots = sio.read_dataframe(project.stores.segmented(sample).spots)
    return cells_per_spot_result(spots, project.params(sample).segmentation.max_cells_per_spot, sample)


def cells_per_spot_result(spots: pd.DataFrame, cap: int, sample: str = "") -> dg.AssetCheckResult:
    """``cells_per_spot_in_range`` of a segmented slide's spots table (``n_cells`` per spot) of ``sample``."""
    n = spots["n_cells"].to_numpy()
    # < half the spots with a nucleus: most spots lie off the tissue in the image (x / y swapped? wrong scale?)
    frac, problem = sio.spots_with_nuclei_problem(n, sample)
    ok = bool((n >= 0).all() and (n <= cap).all() and (n > 0).any() and problem is None)
    over = np.flatnonzero(n > cap)[np.argsort(-n[n > cap], kind="stable")]
    problems = []
    if len(over):
        problems.append(
            f"{len(over)} spot(s) hold more than max_cells_per_spot={cap} cells: {name_items(spots.index[over], n[over])}"
        )
    if (n < 0).any():
        problems.append(f"negative cell counts at spot(s) {name_items(spots.index[n < 0], n[n < 0])}")
    if len(n) == 0 or not (n > 0).any():
        problems.append(f"no spot of the {len(n)} holds a cell (nothing segmented inside the spots)")
    elif problem:
        problems.append(problem)
    return check_result(
        ok,
        f"all {len(n)} spots hold 0..{cap} cells",
        problems,
        metadata={
            "max_cells_per_spot": int(n.max()) if len(n) else 0,
            "fraction_spots_with_cells": float((n > 0).mean()) if len(n) else 0.0,
        },
    )


@dg.asset_check(
    asset=segmented_slide,
    blocking=True,  # fails with severity WARN: downstream still runs on the capped cells, but the user must look
    description="at most max_capped_fraction of the QC-passing spots hold more nuclei than max_cells_per_spot",
)
def few_spots_over_cell_cap(context: dg.AssetCheckExecutionContext, project: ProjectResource):
    sample = context.partition_key
    spots = sio.read_dataframe(project.stores.segmented(sample).spots)
    p = project.params(sample).segmentation
    rep = segmentation.cap_report(
        spots["n_cells_raw"].to_numpy(),
        spots["qc_pass"].to_numpy(bool),
        spots.index.astype(str).to_numpy(),
        p.max_cells_per_spot,
        p.max_capped_fraction,
    )
    return dg.AssetCheckResult(
        passed=rep["cap_warning"] is None,
        severity=dg.AssetCheckSeverity.WARN,
        description=rep["cap_warning"]
        or f"{rep['fraction_spots_capped']:.0%} of spots over max_cells_per_spot={p.max_cells_per_spot} "
        f"(threshold {p.max_capped_fraction:.0%})",
        metadata={
            "fraction_spots_capped": rep["fraction_spots_capped"],
            "max_capped_fraction": rep["max_capped_fraction"],
            "capped_spots_first": ", ".join(rep["capped_spots_first"]),
        },
    )


# -------------------------------------------------------------------------------------------------------------
# typed cells
# -------------------------------------------------------------------------------------------------------------
def _typing_inputs(project: ProjectResource, sample: str) -> tuple:
    """A sample's slide and segmented cells as cell typing sees them (QC-passing spots, integer counts)."""
    seg = project.stores.segmented(sample)
    _require(project.stores.slide(sample), "slide_inputs", sample, "typed_cells")
    _require(seg.cells, "segmented_slide", sample, "typed_cells")
    slide = _slide(project, sample)
    cells = sio.read_dataframe(seg.cells)
    spots = sio.read_dataframe(seg.spots)
    s = project.sample(sample)
    slide, cells, _ = celltyping.typing_inputs(slide, cells, spots, s.platform.cells_platform)
    return slide, cells


@dg.asset(
    partitions_def=samples_partitions,
    group_name="spatialscope",
    deps=["segmented_slide", "slide_inputs", dg.AssetDep("reference_data", partition_mapping=dg.AllPartitionMapping())],
    code_version=code_version("typed_cells"),
    kinds={"anndata", "zarr"},
    op_tags=CPU_OP_TAGS,
    automation_condition=EAGER,
)
def typed_cells(context: dg.AssetExecutionContext, project: ProjectResource) -> dg.MaterializeResult:
    """SpatialScope step 2: RCTD spot deconvolution (Poisson-lognormal), a type per segmented cell with a Potts
    prior, and the gene-wise platform effect. Samples sharing ``slices`` are typed jointly, in 3D."""
    s = project.sample(context.partition_key)
    ref = project.reference_of(s.name)
    params = project.params(s.name)
    reference = sio.read_anndata(project.stores.reference(ref.name))
    slide, cells = _typing_inputs(project, s.name)
    group = project.slices_group(s.slices) if s.slices else []
    report = Report(context.log.warning)
    report.value(platform=s.platform.value, typing_mode="doublet" if s.platform.value == Platform.SLIDESEQ else "full")
    t0 = time.time()
    kw = {"class_key": ref.class_key, "max_cells_per_spot": params.segmentation.max_cells_per_spot}
    kw["log"] = context.log.info  # Potts sweep progress
    if len(group) > 1:
        slices = {t.name: (slide, cells) if t.name == s.name else _typing_inputs(project, t.name) for t in group}
        res, ginfo = celltyping.type_slice_jointly(
            s.name,
            slices,
            {t.name: t.z for t in group},
            {t.name: t.platform.cells_platform for t in group},
            reference,
            ref.cell_type_key,
            params.cell_typing,
            **kw,
        )
        report.value(slices_group=s.slices, **ginfo)
    else:
        res = celltyping.type_sample(
            slide, reference, ref.cell_type_key, cells, params.cell_typing, platform=s.platform.cells_platform, **kw
        )
    out = project.stores.typed(s.name)
    with sio.atomic_path(out.folder) as tmp:
        tmp.mkdir(parents=True)
        t = out.inside(tmp)
        sio.write_dataframe(res.cells, t.cells, info={"cell_type_key": ref.cell_type_key})
        sio.write_dataframe(res.weights, t.weights)
        sio.write_dataframe(res.platform_effect.rename("estimated_be").to_frame(), t.platform_effect)
        if res.beads is not None:
            sio.write_dataframe(res.beads, t.beads)
        sio.write_anndata(_spot_weights(project, s, res), t.spots)
    report.figure("cell_types_figure", lambda: pl.cell_types(res.cells))
    xy = pd.DataFrame(np.asarray(slide.obsm["spatial"])[:, :2], index=slide.obs_names, columns=["x", "y"])
    report.figure("proportions_figure", lambda: pl.spot_proportions(res.weights, xy.loc[res.weights.index]))
    report.value(
        seconds=round(time.time() - t0, 1), cells=len(res.cells), spots=len(res.weights), sigma=float(res.sigma)
    )
    report.table("cell_type_counts", res.cells["cell_type"].astype(str).value_counts().to_frame("cells").to_markdown())
    if res.beads is not None:
        report.table("bead_classes", res.beads["spot_class"].astype(str).value_counts().to_frame("beads").to_markdown())
    report.folder(out.folder)
    report.store(out.cells, "cells_")
    report.details(**res.info)
    return report.result()


def _sample_image(project: ProjectResource, s):
    """The sample's stored H&E (lazy), or None (image-free platforms, no image configured)."""
    if s.image is None or s.platform.image_free or not sio.is_complete(project.stores.slide_image(s.name)):
        return None
    return sio.read_arrays(project.stores.slide_image(s.name), ["image"], lazy=True)["image"]


def _spot_weights(project: ProjectResource, s, res):
    """Typed cells' weights as a scanpy-ready spots x types AnnData over every input barcode."""
    seg = project.stores.segmented(s.name)
    spots = sio.read_dataframe(seg.spots) if sio.is_complete(seg.spots) else None
    slide = _slide(project, s.name)
    skipped = res.info.get("skipped_spots", {})
    return sio.spot_weights_anndata(res.weights, slide, spots=spots, skipped=skipped, image=_sample_image(project, s))


@dg.asset_check(
    asset=typed_cells, blocking=True, description="spot type proportions sum to 1 and every cell has a known type"
)
def proportions_sum_to_one(context: dg.AssetCheckExecutionContext, project: ProjectResource):
    t = project.stores.typed(context.partition_key)
    return proportions_result(sio.read_dataframe(t.weights), sio.read_dataframe(t.cells))


def proportions_result(w: pd.DataFrame, cells: pd.DataFrame) -> dg.AssetCheckResult:
    """``proportions_sum_to_one`` of typed cells' spot weights (spots x types) and cells (``cell_type``)."""
    sums = w.to_numpy(dtype=float).sum(1)
    max_dev = float(np.abs(sums - 1).max()) if len(sums) else 0.0
    unknown = sorted(set(cells["cell_type"].astype(str)) - set(w.columns.astype(str)) - {UNASSIGNED})
    dev = np.abs(sums - 1)
    bad = np.flatnonzero(dev >= 1e-4)[np.argsort(-dev[dev >= 1e-4], kind="stable")]
    problems = []
    if len(bad):
        problems.append(
            f"{len(bad)} spot(s) whose proportions do not sum to 1 (|sum - 1| >= 1e-4): "
            f"{name_items(w.index[bad], sums[bad])}"
        )
    if unknown:
        problems.append(f"cells typed with types absent from the spot weights: {name_items(unknown)}")
    return check_result(
        max_dev < 1e-4 and not unknown,
        f"{len(sums)} spots sum to 1 (max |sum - 1| {max_dev:.2g}); every cell type is known",
        problems,
        metadata={"max_abs_deviation": max_dev, "unknown_types": str(unknown)},
    )


# -------------------------------------------------------------------------------------------------------------
# score checkpoint
# -------------------------------------------------------------------------------------------------------------
def _train_externally(context, project, ref, params, device, client: dg.PipesSubprocessClient):
    """Score-model training through Dagster Pipes (``orchestration/pipes_worker.py`` in a subprocess): its log lines
    reach this step's log; the finished model comes back as safetensors + JSON (loaded without unpickling)."""
    import shutil
    import sys

    state = project.stores.checkpoint_state(ref.name)
    model_out = state.parent / f"{state.name}.external_model"
    shutil.rmtree(model_out, ignore_errors=True)
    invocation = client.run(
        context=context,
        command=[sys.executable, "-m", "spatial_assets.orchestration.pipes_worker"],
        extras={
            "reference_store": str(project.stores.reference(ref.name)),
            "cell_type_key": ref.cell_type_key,
            "params_json": params.model_dump_json(),
            "state_folder": str(state),
            "device": str(device),
            "model_out": str(model_out),
        },
    )
    reported = invocation.get_custom_messages()
    if not reported or reported[-1].get("model_out") != str(model_out):
        raise RuntimeError(f"external training (Dagster Pipes) reported no model; expected one in {model_out}")
    model = generative.ScoreModel.load(model_out, device=device)
    context.log.info(f"external training done: step {reported[-1]['train_step']}, model from {model_out}")
    return model


@dg.asset(
    partitions_def=references_partitions,
    group_name="spatialscope",
    deps=["reference_data"],
    code_version=code_version("score_checkpoint"),
    kinds={"pytorch", "safetensors"},
    op_tags=GPU_OP_TAGS,
    pool="gpu",
    automation_condition=EAGER,
)
def score_checkpoint(
    context: dg.AssetExecutionContext,
    project: ProjectResource,
    compute: ComputeResource,
    pipes_subprocess_client: dg.PipesSubprocessClient,
) -> dg.MaterializeResult:
    """A cell-type-conditioned score model of the reference (denoising score matching over a geometric noise
    schedule). Saved periodically: a restarted materialization resumes from the last saved step. Its generated
    cells are compared with the reference's beside a per-type Gaussian (``checkpoint_sample_quality``)."""
    ref = project.reference(context.partition_key)
    params = project.config.parameters.score_model
    reference = sio.read_anndata(project.stores.reference(ref.name))
    report = Report(context.log.warning)
    dev = _device(compute, context, report)
    out = project.stores.checkpoint(ref.name)
    t0 = time.time()
    # periodic saves go to a separate state folder (resumable); the checkpoint folder itself is written once,
    # atomically, with `.complete` last, so a killed retrain never leaves a half-trained model looking complete
    if project.config.compute.pipes == "subprocess":  # Dagster Pipes: training in a process of its own
        model = _train_externally(context, project, ref, params, dev, pipes_subprocess_client)
    else:
        model = run_with_transient_retries(
            context,
            lambda scale: generative.train_score_model(
                reference,
                ref.cell_type_key,
                params.model_copy(update={"batch_size": scaled(params.batch_size, scale)}),
                project.stores.checkpoint_state(ref.name),
                device=dev,
                log=context.log.info,
            ),
        )
    report.value(
        seconds=round(time.time() - t0, 1),
        genes=len(model.genes),
        cell_types=len(model.cell_types),
        noise_levels=int(len(model.sigmas)),
        decomposition_step=float(model.decomposition_step),
    )
    t_q = time.time()
    context.log.info("checkpoint quality: generating pseudo-cells and comparing them with the reference ...")
    try:
        q = generative.checkpoint_quality(model, reference, ref.cell_type_key, params, log=context.log.info)
        context.log.info(f"checkpoint quality evaluated in {time.time() - t_q:.0f} s: passed={q.get('passed')}")
    except Exception as e:
        q = {"passed": False, "reason": f"quality evaluation failed: {type(e).__name__}: {e}"}
        context.log.warning(q["reason"])
    arrays = {k: q.pop(k) for k in ("samples", "real", "type_idx") if k in q}

    def write_checkpoint(tmp):
        model.save(tmp)
        (tmp / out.quality.name).write_text(json.dumps(q))

    sio.write_directory(out.folder, write_checkpoint)
    if arrays:
        report.figure(
            "real_vs_generated",
            lambda: pl.real_vs_generated(
                arrays["real"], arrays["type_idx"], arrays["samples"], arrays["type_idx"], model.cell_types
            ),
        )
    report.value(**{f"quality_{k}": v for k, v in q.items() if isinstance(v, (int, float, bool))})
    report.folder(out.folder)
    return report.result()


@dg.asset_check(
    asset=score_checkpoint,
    blocking=True,
    description="generated pseudo-cells are at least as close to the reference cells as a per-type "
    "diagonal Gaussian (two-sample AUC and per-type mean correlation, margin 0.05)",
)
def checkpoint_sample_quality(context: dg.AssetCheckExecutionContext, project: ProjectResource):
    q_path = project.stores.checkpoint(context.partition_key).quality
    if not q_path.exists():
        return dg.AssetCheckResult(
            passed=False,
            description=f"{q_path} missing (evaluation did not run)",
            metadata={"reason": f"{q_path} missing"},
        )
    q = json.loads(q_path.read_text())
    return dg.AssetCheckResult(
        passed=bool(q.get("passed")),
        description=q.get("reason") or f"passed={bool(q.get('passed'))} (the evaluation gave no reason)",
        metadata={k: v for k, v in q.items() if not isinstance(v, (dict, list))},
    )


# -------------------------------------------------------------------------------------------------------------
# decomposed cells (sample x spot range) and their combination per sample
# -------------------------------------------------------------------------------------------------------------
@dg.asset(
    partitions_def=decomposition_partitions,
    group_name="spatialscope",
    deps=[
        dg.AssetDep("typed_cells", partition_mapping=BY_SAMPLE),
        dg.AssetDep("slide_inputs", partition_mapping=BY_SAMPLE),
        dg.AssetDep("score_checkpoint", partition_mapping=dg.AllPartitionMapping()),
    ],
    code_version=code_version("decomposed_cells"),
    kinds={"anndata", "zarr"},
    op_tags=GPU_OP_TAGS,
    pool="gpu",
    automation_condition=EAGER,
)
def decomposed_cells(
    context: dg.AssetExecutionContext, project: ProjectResource, compute: ComputeResource
) -> dg.MaterializeResult:
    """SpatialScope step 3 for one spot range of one sample: decomposition of each spot's counts into its cells'
    expression (default: mixture prior over the reference's per-type clusters; or annealed Langevin), AnnData zarr
    per partition."""
    keys = context.partition_key.keys_by_dimension
    sample, rkey = keys["sample"], keys["spot_range"]
    s = project.sample(sample)
    ref = project.reference_of(sample)
    start, stop = range_bounds(rkey, project.config.partitions.spot_range_size)
    slide = _slide(project, sample)
    typed = project.stores.typed(sample)
    cells = sio.read_dataframe(typed.cells)
    pe = sio.read_dataframe(typed.platform_effect)["estimated_be"]
    ckpt = project.stores.checkpoint(ref.name).folder
    if not sio.is_complete(ckpt):
        raise FileNotFoundError(f"{ckpt}: score checkpoint of reference '{ref.name}' is not materialized")
    report = Report(context.log.warning)
    dev = _device(compute, context, report)
    model = generative.ScoreModel.load(ckpt, device=dev)
    # the checkpoint must have been trained on this very reference (fingerprint), not one with the same genes;
    # the mixture estimator (default) also clusters the reference's cells of each type
    reference = sio.read_anndata(project.stores.reference(ref.name))
    model.check_compatible(reference=reference, cell_type_key=ref.cell_type_key)
    dparams = project.params(sample).decomposition
    if dparams.estimator != "mixture":
        reference = None
    for w in accuracy_warnings(project.params(sample), f"samples.{sample}.parameters"):
        context.log.warning(w)
        report.value(parameter_warning=w)
    res = run_with_transient_retries(
        context,
        lambda scale: decomposition.decompose_range(
            slide,
            cells,
            model,
            pe,
            (start, stop),
            dparams.model_copy(update={"batch_cells": scaled(dparams.batch_cells, scale)}),
            platform=s.platform.cells_platform,
            device=dev,
            log=context.log.info,
            reference=reference,
        ),
    )
    path = sio.write_anndata(
        res.adata,
        project.stores.decomposed_range(sample, rkey),
        info={"spot_range": [start, stop], "code_version": code_version("decomposed_cells")},
    )
    if res.adata.n_obs:
        report.figure("decomposed_maps", lambda: pl.decomposed_maps(slide, res.adata), "spots vs decomposed cells")
        report.figure("decomposition_summary", lambda: pl.decomposition_summary(res.adata))
    report.value(
        spot_range=f"{start}..{stop - 1}",
        cells=int(res.adata.n_obs),
        spots=res.info.get("spots"),
        reconstruction_rel_error=res.info.get("reconstruction_rel_error"),
        seconds=res.info.get("seconds_total"),
    )
    report.store(path)
    report.details(**res.info)
    return report.result()


@dg.asset_check(
    asset=decomposed_cells,
    blocking=True,
    description="decomposed cells reconstruct their spots (relative error of spot sums < 0.5)",
)
def spot_reconstruction(context: dg.AssetCheckExecutionContext, project: ProjectResource):
    keys = context.partition_key.keys_by_dimension
    a = sio.read_anndata(project.stores.decomposed_range(keys["sample"], keys["spot_range"]))
    info = dict(a.uns.get("decomposition", {}))
    err = float(info.get("reconstruction_rel_error", np.nan)) if info else np.nan
    X = a.X
    row_sums = np.asarray(X.sum(1)).ravel() if a.n_obs else np.zeros(0)
    nonfinite = np.flatnonzero(~np.isfinite(row_sums))
    finite = len(nonfinite) == 0
    passed = finite and (a.n_obs == 0 or (np.isfinite(err) and err < 0.5))
    problems = []
    if not finite:
        problems.append(f"{len(nonfinite)} cell(s) with non-finite expression: {name_items(a.obs_names[nonfinite])}")
    if a.n_obs and not (np.isfinite(err) and err < 0.5):
        med = float(info.get("reconstruction_rel_error_median_spot", np.nan))
        problems.append(
            f"relative error of the spot sums {err:.3g} >= threshold 0.5 (median spot {med:.3g}, "
            f"{info.get('spots', '?')} spots, {len(info.get('non_finite_cells') or [])} non-finite cells)"
        )
        stride = project.params(keys["sample"]).decomposition.level_stride
        if stride > 1:
            problems.append(f"decomposition.level_stride={stride} skips noise levels (a coarse stride breaks it)")
    return check_result(
        passed,
        f"{a.n_obs} cells reconstruct their spots (relative error {err:.3g} < 0.5)",
        problems,
        metadata={"spot_reconstruction_error": err, "cells": a.n_obs},
    )


@dg.asset(
    partitions_def=samples_partitions,
    group_name="spatialscope",
    deps=[dg.AssetDep(decomposed_cells, partition_mapping=BY_SAMPLE)],
    code_version=code_version("decomposed_cells_by_sample"),
    kinds={"anndata", "zarr"},
    op_tags=CPU_OP_TAGS,
    automation_condition=EAGER,
)
def decomposed_cells_by_sample(context: dg.AssetExecutionContext, project: ProjectResource) -> dg.MaterializeResult:
    """All decomposed spot ranges of a sample combined into one AnnData of every cell."""
    sample = context.partition_key
    folder = project.stores.decomposed_ranges(sample)
    slide = _slide(project, sample)
    size = project.config.partitions.spot_range_size
    expected = {range_key(i): range_bounds(range_key(i), size) for i in range(n_ranges(slide.n_obs, size))}
    paths, stale = sio.current_range_stores(folder, expected)
    ranges = {k: sio.read_anndata(p) for k, p in paths.items()}
    if stale:
        context.log.warning(
            f"{folder}: ignoring {len(stale)} range store(s) not of the current partition scheme "
            f"(spot_range_size={size}): {', '.join(stale)}"
        )
    combined = decomposition.combine_ranges(ranges, expected_ranges=list(expected), slide=slide, source=str(folder))
    if combined.n_obs:  # scanpy-ready: obsm/uns['spatial'], raw-scale counts layer
        sio.make_scanpy_ready(
            combined,
            slide,
            _sample_image(project, project.sample(sample)),
            store="decomposed_cells",
            counts=sio.decomposed_counts(combined),
        )
    path = sio.write_anndata(combined, project.stores.decomposed(sample))
    report = Report(context.log.warning)
    if combined.n_obs:
        report.figure("decomposed_maps", lambda: pl.decomposed_maps(slide, combined), "spots vs decomposed cells")
        report.figure("decomposition_summary", lambda: pl.decomposition_summary(combined))
    report.value(cells=combined.n_obs, spot_ranges=", ".join(ranges), stale_range_stores_ignored=len(stale))
    report.store(path)
    return report.result()
