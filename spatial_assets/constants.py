"""Names shared by every stage: platforms, the label of untyped cells, and the keys of stored tables."""

from __future__ import annotations

from enum import StrEnum


class Platform(StrEnum):
    """The spatial platforms a sample can come from (``samples[].platform`` in ``dagster_project.yaml``)."""

    VISIUM = "visium"  # 55-um spots on a hexagonal lattice, with an H&E image
    SQUARE_GRID = "square_grid"  # spots on a square grid (e.g. Spatial-CITE-seq, DBiT-seq)
    SLIDESEQ = "slideseq"  # 10-um beads: each bead holds one or two cells (RCTD doublet mode)
    MERFISH = "merfish"  # imaging: each segmented cell is its own spot with a small panel of genes

    @property
    def image_free(self) -> bool:
        """Every spot / bead / imaged cell is already a cell: no nuclei segmentation of an image."""
        return self in (Platform.SLIDESEQ, Platform.MERFISH)


PLATFORMS: tuple[str, ...] = tuple(p.value for p in Platform)
IMAGE_FREE_PLATFORMS: tuple[str, ...] = tuple(p.value for p in Platform if p.image_free)

#: The type given to cells that cell typing could not type (a skipped spot, a cell outside every spot).
UNASSIGNED = "unassigned"

#: ``obsm`` key of spot / cell coordinates (full-resolution image pixels), as scanpy and squidpy expect.
SPATIAL_KEY = "spatial"
#: Column of a cell's type in every cells table.
CELL_TYPE_COLUMN = "cell_type"
#: Column of a cell's spot in every cells table.
SPOT_COLUMN = "spot"
