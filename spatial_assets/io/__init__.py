"""Reading inputs and writing stores.

* Readers (:func:`read_spatial`, :func:`read_image`, ...): ``.h5ad``, AnnData ``.zarr`` and Space Ranger folders;
  TIFF images lazily (a whole slide is never loaded twice), jpg / png; validation of counts, coordinates, scale
  factors and image coverage, with errors naming the file, the field and what was expected (:class:`InputError`).
* Stores (:func:`write_anndata`, :func:`read_anndata`, ...): AnnData zarr, DataFrames and chunked arrays written
  atomically (a temporary sibling renamed into place; a completion marker in the zarr attributes), so a store is
  either whole or absent.
"""

from ._genes import check_gene_ids, id_kind, reference_gene_names
from ._readers import (
    InputError,
    check_image_covers_spots,
    count_spots,
    image_shape,
    library_id,
    read_image,
    read_spatial,
    require_columns,
    scalefactors,
    validate_counts,
    validate_spatial,
)
from ._samples import SlideInputs, load_reference, load_slide
from ._scanpy_ready import (
    STORE_CONTENTS,
    decomposed_counts,
    make_scanpy_ready,
    spatial_uns,
    spot_weights_anndata,
)
from ._spatialdata_in import (
    read_spatialdata_zarr,
    read_visium,
    read_visium_hd_bins,
    read_xenium,
    spatialdata_to_anndata,
)
from ._spatialdata_out import (
    describe_spatialdata,
    render_spatialdata,
    spatialdata_from_stores,
    to_spatialdata,
    write_spatialdata,
)
from ._stores import (
    MARKER_ATTR,
    atomic_path,
    current_range_stores,
    describe,
    disk_size,
    is_complete,
    read_anndata,
    read_arrays,
    read_attrs,
    read_dataframe,
    store_path,
    write_anndata,
    write_arrays,
    write_dataframe,
    write_directory,
)
from ._validate import (
    UnsafeNameError,
    check_cell_types,
    check_name,
    check_not_empty,
    check_raw_counts,
    check_shared_genes,
    check_unique_names,
    ensure_storage_root,
    gene_names,
    read_h5ad_file,
    spots_with_nuclei_problem,
    zero_count_spots,
)

__all__ = [
    "MARKER_ATTR",
    "STORE_CONTENTS",
    "decomposed_counts",
    "make_scanpy_ready",
    "spatial_uns",
    "spot_weights_anndata",
    "InputError",
    "UnsafeNameError",
    "check_cell_types",
    "check_name",
    "check_not_empty",
    "check_raw_counts",
    "check_shared_genes",
    "check_unique_names",
    "ensure_storage_root",
    "gene_names",
    "read_h5ad_file",
    "spots_with_nuclei_problem",
    "zero_count_spots",
    "SlideInputs",
    "atomic_path",
    "current_range_stores",
    "check_gene_ids",
    "check_image_covers_spots",
    "count_spots",
    "describe",
    "disk_size",
    "id_kind",
    "image_shape",
    "is_complete",
    "library_id",
    "load_reference",
    "load_slide",
    "read_anndata",
    "read_arrays",
    "read_attrs",
    "read_dataframe",
    "read_image",
    "read_spatial",
    "reference_gene_names",
    "require_columns",
    "read_spatialdata_zarr",
    "read_visium",
    "read_visium_hd_bins",
    "read_xenium",
    "scalefactors",
    "spatialdata_to_anndata",
    "store_path",
    "validate_counts",
    "validate_spatial",
    "write_anndata",
    "write_arrays",
    "write_dataframe",
    "to_spatialdata",
    "spatialdata_from_stores",
    "describe_spatialdata",
    "render_spatialdata",
    "write_directory",
    "write_spatialdata",
]
