"""soScope's asset: enhanced sub-spots of a sample, with the check that they add up to their spots."""

import time

import dagster as dg
import numpy as np
import pandas as pd

from .. import io as sio
from .. import pl, soscope
from .code_versions import code_version
from .metadata import Report, check_result, name_items
from .partitions import samples_partitions
from .resources import GPU_OP_TAGS, ComputeResource, ProjectResource
from .retries import run_with_transient_retries
from .spatialscope import _device, _sample_image


@dg.asset(
    partitions_def=samples_partitions,
    group_name="soscope",
    deps=[
        "slide_inputs",
        "segmented_slide",
        "typed_cells",
        dg.AssetDep("reference_data", partition_mapping=dg.AllPartitionMapping()),  # type profiles of the prior
    ],
    code_version=code_version("enhanced_subspots"),
    kinds={"pytorch", "anndata"},
    op_tags=GPU_OP_TAGS,
    pool="gpu",
)
def enhanced_subspots(
    context: dg.AssetExecutionContext, project: ProjectResource, compute: ComputeResource
) -> dg.MaterializeResult:
    """soScope: each spot as the sum of its sub-spots, enhanced by a graph-transformer VAE with image features."""
    s = project.sample(context.partition_key)
    if not s.platform.subspots:  # fail at once, before reading anything: a deterministic input error
        raise sio.InputError(
            f"samples[{s.name}].platform: {s.platform.value} has no sub-spots (its bins are finer than cells and its "
            "cells come from the segmentation); its single-cell output is decomposed_cells_by_sample. Leave "
            "enhanced_subspots out for this sample (the schedules and make demo never request it)."
        )
    params = project.params(s.name).soscope
    slide = sio.read_anndata(project.stores.slide(s.name))
    image = None
    if s.image is not None and params.image_features != "none":  # with 'none' soScope never reads the image
        image = np.asarray(sio.read_arrays(project.stores.slide_image(s.name), ["image"], lazy=True)["image"])
    cells = project.stores.segmented(s.name).cells
    nuclei = sio.read_dataframe(cells) if sio.is_complete(cells) else None
    nuclei, type_profiles = _typed_nuclei(project, s.name, params, nuclei, context.log.info)
    report = Report(context.log.warning)
    dev = _device(compute, context, report)
    t0 = time.time()
    res = run_with_transient_retries(  # full-graph training: no batch to shrink, OOM / lost worker retried as is
        context,
        lambda _scale: soscope.enhance(
            slide,
            params,
            platform=s.platform.value,
            image=image,
            nuclei=nuclei,
            device=dev,
            log=context.log.info,
            grid_subdivision=s.grid_subdivision,
            type_profiles=type_profiles,
        ),
    )
    image = image if image is not None else _sample_image(project, s)
    try:  # scanpy-ready: uns['spatial'] (images, scale factors); counts layer = the spot-conserving split
        sio.make_scanpy_ready(
            res.adata, slide, image, store="enhanced_subspots", counts=res.adata.layers.get("conserved")
        )
    except sio.InputError as e:  # image-free platforms without Visium scale factors
        context.log.info(f"enhanced sub-spots without uns['spatial']: {e}")
    path = sio.write_anndata(res.adata, project.stores.subspots(s.name))
    report.figure("marker_maps", lambda: pl.enhanced_maps(slide, res.adata), "spot vs enhanced")
    report.value(seconds=round(time.time() - t0, 1), subspots=int(res.adata.n_obs))
    report.store(path)
    report.details(**{k: v for k, v in res.info.items() if k != "loss_history"})
    return report.result()


def _typed_nuclei(project: ProjectResource, sample: str, params, nuclei, log):
    """The segmented nuclei with typed_cells' labels (type, Potts type, confidence) and the reference's type-mean
    profiles, for soScope's typed-cell prior; (nuclei, None) when the prior is off or nothing is typed."""
    typed = project.stores.typed(sample).cells
    if nuclei is None or params.typed_prior == "off" or not sio.is_complete(typed):
        return nuclei, None
    labels = sio.read_dataframe(typed)
    if params.type_column not in labels.columns:
        return nuclei, None
    ref = project.reference_of(sample)
    profiles = soscope.type_profiles(sio.read_anndata(project.stores.reference(ref.name)), ref.cell_type_key)
    cols = [c for c in (params.type_column, "potts_type", params.type_confidence_column) if c in labels.columns]
    lab = labels[cols].reindex(nuclei.index)
    lab[params.type_column] = lab[params.type_column].astype(object)
    known = lab[params.type_column].astype(str).isin(profiles.index.astype(str))
    if (~known & lab[params.type_column].notna()).any():  # e.g. small types merged by typing: an average nucleus
        log(f"soScope typed prior: {int((~known).sum())} nuclei without a reference type profile count as unlabelled")
    lab.loc[~known, params.type_column] = np.nan
    return nuclei.drop(columns=[c for c in cols if c in nuclei.columns]).join(lab), profiles


@dg.asset_check(
    asset=enhanced_subspots,
    blocking=True,
    description="every spot has its sub-spots; the conserved profiles sum exactly to the spot and "
    "the model's own sub-spot means reconstruct it (relative L1 < 0.75)",
)
def subspots_sum_to_spot(context: dg.AssetCheckExecutionContext, project: ProjectResource):
    s = context.partition_key
    sub = sio.read_anndata(project.stores.subspots(s))
    slide = sio.read_anndata(project.stores.slide(s))
    spot = sub.obs["spot"].astype(str).to_numpy()

    def rel_error(M) -> float:
        M = M.toarray() if hasattr(M, "toarray") else np.asarray(M)
        sums = pd.DataFrame(M, columns=sub.var_names).groupby(spot).sum()
        obs = slide[sums.index].to_df()[sums.columns].to_numpy()
        return float(np.abs(sums.to_numpy() - obs).sum() / max(np.abs(obs).sum(), 1e-9))

    model_err = rel_error(sub.layers["model_mean"]) if "model_mean" in sub.layers else rel_error(sub.X)
    conserved_err = rel_error(sub.layers["conserved"]) if "conserved" in sub.layers else model_err
    has = np.isin(slide.obs_names, np.unique(spot))
    covered = float(has.mean())
    problems = []
    if covered < 1.0:
        problems.append(f"{int((~has).sum())} spot(s) without sub-spots: {name_items(slide.obs_names[~has])}")
    if conserved_err >= 1e-3:
        problems.append(f"conserved sub-spot profiles miss their spots by {conserved_err:.3g} (threshold 1e-3)")
    if model_err >= 0.75:
        problems.append(f"model sub-spot means miss their spots by {model_err:.3g} (threshold 0.75)")
    return check_result(
        covered == 1.0 and conserved_err < 1e-3 and model_err < 0.75,
        f"every spot has sub-spots; conserved error {conserved_err:.2g}, model error {model_err:.3g}",
        problems,
        metadata={
            "model_relative_sum_error": model_err,
            "conserved_relative_sum_error": conserved_err,
            "spots_covered": covered,
        },
    )
