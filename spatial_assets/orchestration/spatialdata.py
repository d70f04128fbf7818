"""The per-sample SpatialData store: the H&E, nuclei labels, spots / cells / sub-spots and their tables in one zarr.

Thin wiring over :func:`spatial_assets.io.spatialdata_from_stores` and :func:`spatial_assets.io.write_spatialdata`.
It depends on every store that owns one of its elements (slide inputs and image, segmented slide, typed cells,
decomposed cells, enhanced sub-spots) and is eager like them, so it is rewritten whenever one of its owners is.
Sub-spots are optional: a sample whose ``enhanced_subspots`` has never been materialized (soScope not run) gets a
store without the ``subspots`` shapes / ``enhanced_subspots`` table, and the metadata names what was left out.
"""

import dagster as dg

from .. import io as sio
from .code_versions import code_version
from .metadata import Report
from .partitions import samples_partitions
from .resources import CPU_OP_TAGS, ProjectResource
from .spatialscope import EAGER


@dg.asset(
    partitions_def=samples_partitions,
    group_name="outputs",
    deps=["slide_inputs", "segmented_slide", "typed_cells", "decomposed_cells_by_sample", "enhanced_subspots"],
    code_version=code_version("sample_spatialdata"),
    kinds={"zarr"},
    op_tags=CPU_OP_TAGS,
    automation_condition=EAGER,
)
def sample_spatialdata(context: dg.AssetExecutionContext, project: ProjectResource) -> dg.MaterializeResult:
    """One SpatialData zarr per sample (``<root>/spatialdata/<sample>.zarr``): H&E (multiscale), nuclei labels,
    spots / cells / sub-spots as circles in um, tables of typed cells, decomposed cells and sub-spots."""
    sample = context.partition_key
    st = project.stores
    s = project.sample(sample)
    has_image = s.image is not None and not s.platform.image_free
    sdata, missing = sio.spatialdata_from_stores(
        st.slide(sample),
        image=st.slide_image(sample) if has_image else None,
        labels=st.segmented(sample).labels,
        cells=st.typed(sample).cells,
        spot_weights=st.typed(sample).spots,
        decomposed=st.decomposed(sample),
        subspots=st.subspots(sample),
        sample=sample,
    )
    if missing:
        context.log.info(
            f"{sample}: SpatialData store without {', '.join(missing)} (not materialized, or none on this platform)"
        )
    path = sio.write_spatialdata(sdata, st.spatialdata(sample))
    report = Report(context.log.warning)

    def figure():
        import spatialdata as sd

        return sio.render_spatialdata(sd.read_zarr(path))  # rendered from the written store: it opens

    report.figure("spatialdata_render", figure, "H&E and cells coloured by type (spatialdata-plot)")
    d = sio.describe_spatialdata(sdata)
    report.value(
        elements=", ".join([*d["images"], *d["labels"], *d["shapes"]]),
        tables=", ".join(d["tables"]),
        coordinate_systems=", ".join(d["coordinate_systems"]),
        left_out=", ".join(missing) or "none",
    )
    report.folder(path)
    report.details(**d)
    return report.result()
