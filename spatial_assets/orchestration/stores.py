"""Every store of the project and where it lives under ``storage_root``: the one module that names store paths.

    <root>/reference_data/<reference>.zarr          AnnData (raw counts + types)
    <root>/slide_inputs/<sample>.zarr               AnnData (spot counts, obsm['spatial'])
    <root>/slide_image/<sample>.zarr                chunked H&E image
    <root>/segmented_slide/<sample>/{labels,cells,spots}.zarr
    <root>/typed_cells/<sample>/{cells,weights,platform_effect,spots[,beads]}.zarr
    <root>/score_checkpoint/<reference>/            model.safetensors + config.json + quality.json + .complete
    <root>/score_checkpoint_state/<reference>/      resumable training state (train_state.safetensors, saves)
    <root>/decomposed_cells/<sample>/<range>.zarr   AnnData per spot range
    <root>/decomposed_cells_by_sample/<sample>.zarr AnnData of all ranges
    <root>/enhanced_subspots/<sample>.zarr          AnnData of sub-spots
    <root>/combined_slices/<group>.zarr             table of typed cells of a slices group
    <root>/spatialdata/<sample>.zarr                SpatialData (H&E, nuclei, spots / cells / sub-spots + tables)

Folders holding several stores (segmented slide, typed cells, checkpoint) are written atomically as a whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..io._validate import check_name


class Asset:
    """Asset names (also the top-level folders of ``storage_root``)."""

    REFERENCE_DATA = "reference_data"
    SLIDE_INPUTS = "slide_inputs"
    SLIDE_IMAGE = "slide_image"  # stored by slide_inputs
    SEGMENTED_SLIDE = "segmented_slide"
    TYPED_CELLS = "typed_cells"
    SCORE_CHECKPOINT = "score_checkpoint"
    SCORE_CHECKPOINT_STATE = "score_checkpoint_state"  # resumable training state, kept apart from the checkpoint
    DECOMPOSED_CELLS = "decomposed_cells"
    DECOMPOSED_CELLS_BY_SAMPLE = "decomposed_cells_by_sample"
    ENHANCED_SUBSPOTS = "enhanced_subspots"
    COMBINED_SLICES = "combined_slices"
    SPATIALDATA = "spatialdata"  # stored by sample_spatialdata


@dataclass(frozen=True)
class SegmentedStores:
    folder: Path

    @property
    def labels(self) -> Path:
        return self.folder / "labels.zarr"

    @property
    def cells(self) -> Path:
        return self.folder / "cells.zarr"

    @property
    def spots(self) -> Path:
        return self.folder / "spots.zarr"

    @property
    def bin_cells(self) -> Path:
        """Visium HD: cells x genes AnnData, the bins summed per segmented nucleus (the spots of typing on)."""
        return self.folder / "bin_cells.zarr"

    def inside(self, tmp: Path) -> SegmentedStores:
        """The same layout inside a temporary folder (for an atomic write of the whole folder)."""
        return SegmentedStores(Path(tmp))


@dataclass(frozen=True)
class TypedStores:
    folder: Path

    @property
    def cells(self) -> Path:
        return self.folder / "cells.zarr"

    @property
    def weights(self) -> Path:
        return self.folder / "weights.zarr"

    @property
    def platform_effect(self) -> Path:
        return self.folder / "platform_effect.zarr"

    @property
    def beads(self) -> Path:
        return self.folder / "beads.zarr"

    @property
    def spots(self) -> Path:
        """Scanpy-ready spots x types AnnData over every input barcode (``obs['typing_status']``)."""
        return self.folder / "spots.zarr"

    def inside(self, tmp: Path) -> TypedStores:
        return TypedStores(Path(tmp))


@dataclass(frozen=True)
class CheckpointStores:
    folder: Path

    @property
    def quality(self) -> Path:
        return self.folder / "quality.json"


class Stores:
    """Store paths under one ``storage_root``. Every name is checked with :func:`spatial_assets.io.check_name`
    (a partition key added by hand, e.g. ``../x``, cannot address a path outside ``storage_root``)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _file(self, asset: str, name: str, suffix: str = ".zarr") -> Path:
        return self.root / asset / f"{check_name(name, f'{asset} name')}{suffix}"

    def _folder(self, asset: str, name: str) -> Path:
        return self.root / asset / check_name(name, f"{asset} name")

    def reference(self, reference: str) -> Path:
        return self._file(Asset.REFERENCE_DATA, reference)

    def slide(self, sample: str) -> Path:
        return self._file(Asset.SLIDE_INPUTS, sample)

    def slide_image(self, sample: str) -> Path:
        return self._file(Asset.SLIDE_IMAGE, sample)

    def segmented(self, sample: str) -> SegmentedStores:
        return SegmentedStores(self._folder(Asset.SEGMENTED_SLIDE, sample))

    def typed(self, sample: str) -> TypedStores:
        return TypedStores(self._folder(Asset.TYPED_CELLS, sample))

    def checkpoint(self, reference: str) -> CheckpointStores:
        return CheckpointStores(self._folder(Asset.SCORE_CHECKPOINT, reference))

    def checkpoint_state(self, reference: str) -> Path:
        """The folder of a reference's resumable training state (never read as a checkpoint)."""
        return self._folder(Asset.SCORE_CHECKPOINT_STATE, reference)

    def decomposed_ranges(self, sample: str) -> Path:
        """The folder of a sample's decomposed spot ranges."""
        return self._folder(Asset.DECOMPOSED_CELLS, sample)

    def decomposed_range(self, sample: str, range_key: str) -> Path:
        return self.decomposed_ranges(sample) / f"{check_name(range_key, 'spot range key')}.zarr"

    def decomposed(self, sample: str) -> Path:
        return self._file(Asset.DECOMPOSED_CELLS_BY_SAMPLE, sample)

    def subspots(self, sample: str) -> Path:
        return self._file(Asset.ENHANCED_SUBSPOTS, sample)

    def slices(self, group: str) -> Path:
        return self._file(Asset.COMBINED_SLICES, group)

    def spatialdata(self, sample: str) -> Path:
        """The sample's SpatialData zarr (written by ``sample_spatialdata``)."""
        return self._file(Asset.SPATIALDATA, sample)
