"""Names shared by every stage: platforms, the label of untyped cells, and the keys of stored tables."""

from __future__ import annotations

from enum import StrEnum


class Platform(StrEnum):
    """The spatial platforms a sample can come from (``samples[].platform`` in ``dagster_project.yaml``)."""

    VISIUM = "visium"  # 55-um spots on a hexagonal lattice, with an H&E image
    SQUARE_GRID = "square_grid"  # spots on a square grid (e.g. Spatial-CITE-seq, DBiT-seq)
    SLIDESEQ = "slideseq"  # 10-um beads: each bead holds one or two cells (RCTD doublet mode)
    MERFISH = "merfish"  # imaging: each segmented cell is its own spot with a small panel of genes
    XENIUM = "xenium"  # 10x Xenium: cells come segmented (imaging panel; genes outside it are imputed)
    VISIUM_HD = "visium_hd"  # 2 / 8 / 16-um bins + H&E: bins summed per segmented nucleus, then as an imaging panel

    @property
    def image_free(self) -> bool:
        """Every spot / bead / imaged cell is already a cell: no nuclei segmentation of an image."""
        return self in (Platform.SLIDESEQ, Platform.MERFISH, Platform.XENIUM)

    @property
    def imaging(self) -> bool:
        """An imaging panel: each segmented cell is its own spot, counts may be non-integer, missing genes imputed."""
        return self in (Platform.MERFISH, Platform.XENIUM)

    @property
    def subspots(self) -> bool:
        """soScope's sub-spots apply: Visium HD's bins are already finer than cells, and its cells come from the
        segmentation (``decomposed_cells``), so it has no ``enhanced_subspots``."""
        return self is not Platform.VISIUM_HD

    @property
    def cells_platform(self) -> Platform:
        """The platform cell typing and decomposition see: Visium HD's cells (its bins summed per segmented
        nucleus) are each their own spot, as on an imaging panel (``merfish``); every other platform is itself."""
        return Platform.MERFISH if self is Platform.VISIUM_HD else self


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
