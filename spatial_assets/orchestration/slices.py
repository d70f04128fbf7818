"""Aligned 3D slices: the typed cells of every slice of a group in one table (one partition per group)."""

import dagster as dg
import pandas as pd

from .. import io as sio
from .. import pl, platforms
from .code_versions import code_version
from .metadata import Report
from .partitions import slices_groups_partitions
from .resources import CPU_OP_TAGS, ProjectResource


@dg.asset(
    partitions_def=slices_groups_partitions,
    group_name="spatialscope",
    deps=[dg.AssetDep("typed_cells", partition_mapping=dg.AllPartitionMapping())],
    code_version=code_version("combined_slices"),
    kinds={"pandas", "zarr"},
    op_tags=CPU_OP_TAGS,
)
def combined_slices(context: dg.AssetExecutionContext, project: ProjectResource) -> dg.MaterializeResult:
    """Aligned slices (samples sharing ``slices``): the typed cells of all of them in one 3D table (x_um, y_um,
    z_um, slice, cell_type, ...). Per-slice results stay in typed_cells."""
    group = context.partition_key
    members = project.slices_group(group)
    if not members:
        raise ValueError(f"slices group '{group}': no sample of {project.config.source} has slices: {group}")
    per, z, um = {}, {}, {}
    for s in members:
        cpath = project.stores.typed(s.name).cells
        if not sio.is_complete(cpath):
            raise FileNotFoundError(f"{cpath}: typed_cells of slice '{s.name}' (group '{group}') is not materialized")
        per[s.name] = sio.read_dataframe(cpath)
        um[s.name] = platforms.microns_per_pixel(sio.read_anndata(project.stores.slide(s.name)), s.platform.value)[0]
        z[s.name] = s.z
    view = platforms.combined_view(per, z, um)
    frac = platforms.cross_slice_fraction(
        view[["x_um", "y_um", "z_um"]].to_numpy(),
        view["slice"],
        project.params(members[0].name).cell_typing.n_neighbors,
    )
    path = sio.write_dataframe(
        view, project.stores.slices(group), info={"slices": {n: {"z_um": z[n], "um_per_px": um[n]} for n in per}}
    )
    report = Report(context.log.warning)
    report.figure("slices_figure", lambda: pl.slices_side_by_side(view), "slices")
    report.value(
        cells=len(view), slices=", ".join(f"{n} (z={z[n]:g} um)" for n in per), cross_slice_neighbour_fraction=frac
    )
    report.table("cell_types_per_slice", pd.crosstab(view["cell_type"].astype(str), view["slice"]).to_markdown())
    report.store(path)
    return report.result()
