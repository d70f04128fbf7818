"""Named jobs for the launchpad, sensors and schedules (runs are never the anonymous ``__ephemeral_asset_job__``)."""

from __future__ import annotations

import dagster as dg

from .partitions import decomposition_partitions, references_partitions, samples_partitions

reference_job = dg.define_asset_job(
    "reference_job",
    selection=dg.AssetSelection.assets("reference_data", "score_checkpoint"),
    partitions_def=references_partitions,
    description="Validate a reference and train its score model",
)
sample_job = dg.define_asset_job(
    "sample_job",
    selection=dg.AssetSelection.assets("slide_inputs", "segmented_slide", "typed_cells", "enhanced_subspots"),
    partitions_def=samples_partitions,
    description="Inputs, segmentation, cell typing and soScope of a sample",
)
decomposition_job = dg.define_asset_job(
    "decomposition_job",
    selection=dg.AssetSelection.assets("decomposed_cells"),
    partitions_def=decomposition_partitions,
    description="Decompose one spot range of one sample",
)
combine_job = dg.define_asset_job(
    "combine_job",
    selection=dg.AssetSelection.assets("decomposed_cells_by_sample", "sample_spatialdata"),
    partitions_def=samples_partitions,
    description="Combine a sample's decomposed spot ranges and write its SpatialData store",
)

JOBS = [reference_job, sample_job, decomposition_job, combine_job]
