"""Input assets: a reference (per reference partition) and a sample's slide and image (per sample partition)."""

import dagster as dg

from .. import celltyping
from .. import io as sio
from .code_versions import code_version
from .metadata import Report
from .partitions import references_partitions, samples_partitions
from .resources import CPU_OP_TAGS, ProjectResource


@dg.asset(
    partitions_def=references_partitions,
    group_name="inputs",
    code_version=code_version("reference_data"),
    kinds={"anndata", "zarr"},
    op_tags=CPU_OP_TAGS,
)
def reference_data(context: dg.AssetExecutionContext, project: ProjectResource) -> dg.MaterializeResult:
    """A scRNA-seq reference: raw counts and cell types, validated, with its final type list (the small-types
    policy, ``parameters.cell_typing.small_types``) applied before anything is trained; stored as AnnData zarr."""
    ref = project.reference(context.partition_key)
    adata = sio.load_reference(ref.path, ref.cell_type_key)
    try:  # >= 2 types with >= min_cells_per_type cells, checked here, before minutes of score-model training
        adata, types_report = celltyping.prepare_reference_types(
            adata, ref.cell_type_key, project.config.parameters.cell_typing, ref.class_key
        )
    except celltyping.SmallTypesError as e:
        raise sio.InputError(f"{ref.path}: {e}") from None
    sio.check_cell_types(
        adata, ref.cell_type_key, project.config.parameters.cell_typing.min_cells_per_type, str(ref.path)
    )
    for msg in types_report.get("messages", []):
        context.log.warning(msg)
    path = sio.write_anndata(adata, project.stores.reference(ref.name), info={"source": str(ref.path)})
    types = adata.obs[ref.cell_type_key].astype(str).value_counts()
    report = Report(context.log.warning)
    report.value(cells=adata.n_obs, genes=adata.n_vars, cell_types=len(types), cell_type_key=ref.cell_type_key)
    report.table("cells_per_type", types.to_frame("cells").to_markdown())
    report.store(path)
    report.details(source=str(ref.path), reference_types=types_report)
    return report.result()


@dg.asset(
    partitions_def=samples_partitions,
    group_name="inputs",
    code_version=code_version("slide_inputs"),
    kinds={"anndata", "zarr"},
    op_tags=CPU_OP_TAGS,
)
def slide_inputs(context: dg.AssetExecutionContext, project: ProjectResource) -> dg.MaterializeResult:
    """A sample's spot counts (AnnData zarr) and H&E image (chunked zarr), validated: counts, coordinates,
    scale factors, and that the image covers the spots."""
    s = project.sample(context.partition_key)
    loaded = sio.load_slide(s.spatial, s.platform, s.image, name=s.name, image_scale=s.image_scale, bin_size=s.bin_size)
    ref = project.reference_of(s.name)  # gene IDs against the reference, before any stage runs
    if ref.path.suffix == ".h5ad" and ref.path.exists():  # names the cause: Ensembl vs symbols, species' case
        sio.check_gene_ids(
            loaded.slide,
            sio.reference_gene_names(ref.path),
            slide_source=str(s.spatial),
            reference_source=str(ref.path),
        )
    ref_store = project.stores.reference(ref.name)
    ref_genes = sio.read_anndata(ref_store).var_names if sio.is_complete(ref_store) else sio.gene_names(ref.path)
    shared = sio.check_shared_genes(
        loaded.slide.var_names,
        ref_genes,
        str(s.spatial),
        str(ref.path),
        project.params(s.name).cell_typing.min_shared_genes,
    )
    loaded.slide.uns["sample"].update(z=s.z, slices=s.slices or "none")
    report = Report(context.log.warning)
    report.value(**loaded.info, shared_genes=shared)
    if loaded.info.get("zero_count_spots_skipped"):
        context.log.warning(
            f"{s.spatial}: {loaded.info['zero_count_spots_skipped']} spots with zero counts skipped "
            f"(e.g. {loaded.info['zero_count_spots_examples']})"
        )
    if loaded.image is not None:
        ipath = sio.write_arrays(
            {"image": loaded.image},
            project.stores.slide_image(s.name),
            chunks=(1024, 1024, 3),
            attrs={"source": str(s.image)},
        )
        report.store(ipath, "image_")
    report.store(sio.write_anndata(loaded.slide, project.stores.slide(s.name)))
    return report.result()
