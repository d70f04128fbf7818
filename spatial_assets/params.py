"""Parameters of every stage, with the published methods' defaults.

Plain pydantic models (no dagster): the science modules take them, and ``config.py`` reads them from the
``parameters:`` section of ``dagster_project.yaml``. Unknown keys are rejected so a typo never passes silently.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SegmentationParams(_Params):
    """SpatialScope step 1 (nuclei segmentation); defaults as SpatialScope / StarDist's command line."""

    method: Literal["stardist", "watershed"] = "stardist"
    # "2D_versatile_he" (StarDist registry, needs the internet once) or a path to a local StarDist model folder.
    model: str = "2D_versatile_he"
    # For a 1-channel model: which channel to feed it. "hematoxylin" = rgb2hed's H channel; "gray" = luminance.
    channel: Literal["auto", "rgb", "hematoxylin", "gray"] = "auto"
    prob_thresh: float = Field(0.2, ge=0, le=1)
    nms_thresh: float = Field(0.1, ge=0, le=1)
    norm_percentiles: tuple[float, float] = (1.0, 99.8)
    # Rescale the image by this factor before prediction (StarDist's ``scale``), e.g. when the model was trained
    # on nuclei of another size in pixels; labels come back at the original resolution.
    scale: float = Field(1.0, gt=0)
    # Tiled prediction: tile side in pixels (StarDist n_tiles is derived from it).
    tile_size: int = Field(2048, ge=256)
    max_cells_per_spot: int = Field(20, ge=1)
    min_umi: float = Field(500, ge=0)
    max_umi: float = Field(50_000, gt=0)
    # Explicit opt-in to fall back to another method when the StarDist model cannot be obtained.
    fallback: Literal["watershed"] | None = None


class CellTypingParams(_Params):
    """SpatialScope step 2 (RCTD full mode + Potts labels); defaults as RCTD / SpatialScope."""

    min_cells_per_type: int = Field(25, ge=1)
    max_cells_per_type: int = Field(10_000, ge=1)
    # DE gene selection, RCTD's names: *_reg = the regression (weights) gene set; the others = the bulk
    # (platform-effect) gene set.
    gene_cutoff: float = 0.000125
    fc_cutoff: float = 0.5
    gene_cutoff_reg: float = 0.0002
    fc_cutoff_reg: float = 0.75
    sigma_fit_spots: int = Field(1000, ge=10)
    sigma_fit_min_umi: float = 300
    # Potts prior
    nu: float = Field(10.0, ge=0)
    n_neighbors: int = Field(10, ge=1)
    max_sweeps: int = Field(8, ge=1)
    # Slide-seq (RCTD doublet mode): log-likelihood margins of RCTD for a confident type and for calling a doublet,
    # and the distance (full-resolution pixels) between a doublet bead's two cells (None = a default).
    doublet_confidence_threshold: float = Field(10.0, ge=0)
    doublet_threshold: float = Field(25.0, ge=0)
    doublet_offset: float | None = Field(None, gt=0)
    # Reference types with fewer than min_cells_per_type cells (spatial_assets.reference_types): "error" stops,
    # "drop" removes their cells (warning names them), "merge" relabels them to their class in obs[class_key]
    # (references[].class_key: a coarser column; types still too small after merging are dropped). Applied once,
    # when the reference is registered, so the score model, typing and decomposition share one type list. Trades
    # reference detail for a typing that can run.
    small_types: Literal["error", "drop", "merge"] = "error"
    # Morphology-aware per-cell labels (spatial_assets.morphology_typing). "auto": use the nuclei only when a
    # permutation test shows they tell the spot's types apart (else the Potts labels stay); "on": always; "off".
    morphology: Literal["auto", "on", "off"] = "auto"
    # Per-cell columns of the cells table used as nucleus features (absent columns: morphology not used).
    morphology_features: list[str] = Field(
        default_factory=lambda: ["nucleus_area", "nucleus_axis_ratio", "nucleus_h_mean"]
    )
    # Prior of a cell's type: (1 - a) x RCTD proportions + a x composition of the spot's Potts labels. 0 trusts
    # the weights only, 1 the Potts labels' counts only (which weigh the counts cell by cell but are integer).
    morphology_potts_mix: float = Field(0.5, ge=0, le=1)
    # Floor of the prior per type: lower = morphology needs more evidence to pick a type the spot lacks.
    morphology_prior_floor: float = Field(1e-3, gt=0, lt=1)
    # z-score of the morphology gain against its permutation null that "auto" mode requires: higher = fewer
    # false uses on slides whose nuclei carry no type information, at the risk of ignoring weakly informative
    # nuclei. morphology_permutations: shuffled refits for the null (cost: that many extra EM fits).
    morphology_min_z: float = Field(3.0, ge=0)
    morphology_permutations: int = Field(19, ge=2)
    # Least gain over the permutation null (nats per cell) for "auto" to use the nuclei: an effect size, so a
    # weak but significant dependence on a large slide does not relabel cells. Lower = uses fainter morphology.
    morphology_min_gain: float = Field(0.1, ge=0)
    # Pseudo-cells pulling each type's feature covariance / mean to the pooled ones: higher = steadier for rare
    # types, less type-specific.
    morphology_shrinkage: float = Field(10.0, ge=0)
    # "posterior": each cell's most probable type; "sinkhorn": posteriors held to each spot's prior composition
    # (the relaxed per-spot assignment; less accurate on the realistic slides, where RCTD's compositions are
    # off by ~0.08 per type -- kept for comparison, see benchmarks/bench_typing.py).
    morphology_assignment: Literal["posterior", "sinkhorn"] = "posterior"
    seed: int = 0


class ScoreModelParams(_Params):
    """Cell-type-conditioned score model of the reference (SpatialScope's generative prior)."""

    n_genes: int = Field(2000, ge=2)  # used when the reference has no var['Marker'] column
    max_cells_per_type: int = Field(3000, ge=1)
    sigma_begin: float = Field(100.0, gt=0)
    sigma_end: float = Field(0.01, gt=0)
    n_sigmas: int = Field(232, ge=2)
    sampling_step: float = Field(6.6e-6, gt=0)
    steps_per_level: int = Field(5, ge=1)
    # Decomposition step size; None = SpatialScope's rule (1e-5 when sigma_begin > 70, else 1e-6).
    decomposition_step: float | None = None
    # Residual MLP width: 256 keeps a Langevin step of 2,500 cells x 2,000 genes at ~0.1 s on one CPU core
    # (benchmarks/bench_score_model.py), which the decomposition's 15-minute-per-500-spots CPU target needs.
    hidden: int = Field(256, ge=8)
    n_blocks: int = Field(3, ge=1)
    lr: float = Field(1e-4, gt=0)
    batch_size: int = Field(256, ge=1)
    grad_clip: float = Field(1.0, gt=0)
    ema_decay: float = Field(0.999, gt=0, lt=1)
    train_steps: int = Field(20_000, ge=1)
    save_every: int = Field(1000, ge=1)
    mixed_precision: bool = True
    seed: int = 0


class DecompositionParams(_Params):
    """SpatialScope step 3 (annealed Langevin decomposition)."""

    n_replicates: int = Field(3, ge=1)
    max_retries: int = Field(5, ge=0)
    sigma_power: float = 1.0
    # Genes hidden from the spot likelihood (leave-genes-out validation / imputation).
    leave_out_genes: list[str] = Field(default_factory=list)
    # Use every k-th noise level only (1 = the whole schedule). For quick demos / tests.
    level_stride: int = Field(1, ge=1)
    batch_cells: int = Field(20_000, ge=1)
    seed: int = 0


class SoScopeParams(_Params):
    """soScope resolution enhancement."""

    likelihood: Literal["nb", "poisson", "gaussian", "joint"] = "nb"
    # For "joint": which var column tells the modality, and the likelihood of the non-RNA modality.
    modality_key: str = "feature_type"
    protein_likelihood: Literal["poisson", "gaussian"] = "poisson"
    n_subspots: int | None = None  # None = from the platform (7 Visium, 9 square grid)
    hidden: int = Field(128, ge=8)
    z_dim: int = Field(128, ge=2)
    heads: int = Field(1, ge=1)
    scale_kernel: float = Field(10.0, gt=1)
    vgae_epochs: int = Field(400, ge=0)
    epochs: int = Field(400, ge=1)
    lr_vgae: float = Field(1e-3, gt=0)
    lr: float = Field(2e-3, gt=0)  # published 5e-4 (slower to move off the nuclei-split start, see docs)
    n_genes: int | None = Field(None, ge=1)  # None = all genes
    image_features: Literal["squidpy", "none"] = "squidpy"
    cnn_weights: str | None = None
    negative_edges_per_edge: int = Field(1, ge=0)
    seed: int = 0
    # --- training schedules and loss weights (soScope's published values unless noted) ---
    beta_start: float = Field(1e-3, ge=0)  # KL weight, exponential schedule beta_start -> beta_end
    beta_end: float = Field(1e-3, ge=0)
    gamma_start: float = Field(1.0, gt=0)  # image-regulariser factor, decays gamma_start -> gamma_end
    gamma_end: float = Field(0.01, gt=0)
    schedule_start_frac: float = Field(0.5, ge=0, le=1)  # schedules stay flat until this fraction of the epochs
    image_weight: float = Field(1.0, ge=0)  # weight of the image regulariser (0 = off)
    reg_temperature: float = Field(5.0, gt=0)  # sigmoid temperature of the regulariser's cosine similarities
    gaussian_scale_vgae: float = Field(10.0, gt=0)  # Gaussian likelihood: squared error / scale (VGAE stage)
    gaussian_scale: float = Field(1.0, gt=0)  # ... (soScope stage)
    grad_clip: float = Field(10.0, gt=0)  # gradient-norm clip of both stages
    subspot_radius: float | None = Field(None, gt=0)  # W graph radius in px (None: neighbouring sub-spots)
    squidpy_features: list[Literal["summary", "histogram", "texture"]] = Field(
        default_factory=lambda: ["summary", "histogram", "texture"], min_length=1
    )
    init_decoder_from_vgae: bool = False
    # --- sub-spot features and output (this project's additions; see docs/ACCURACY_subspots.md) ---
    # Image features are z-scored, then reduced to this many principal components (None: all of them), so ~105
    # squidpy columns do not drown the 2 nuclei features; each block is then scaled to the given total weight.
    image_pca: int | None = Field(8, ge=1)
    image_feature_weight: float = Field(1.0, ge=0)
    nuclei_feature_weight: float = Field(1.0, ge=0)
    # Nuclei counts as a size factor: a sub-spot's expression is offset by log((count + pseudocount) / spot total),
    # so the untrained model is the nuclei split and training refines the per-gene shares. False: soScope's flat
    # offset (every sub-spot starts at spot / K).
    nuclei_offset: bool = True
    nuclei_pseudocount: float = Field(0.01, gt=0)
    # X = the model's split rescaled so each spot's sub-spots sum exactly to the spot (layers['conserved']);
    # False: X = the likelihood mean (soScope's output, layers['model_mean']).
    conserve: bool = True


class Parameters(_Params):
    segmentation: SegmentationParams = Field(default_factory=SegmentationParams)
    cell_typing: CellTypingParams = Field(default_factory=CellTypingParams)
    score_model: ScoreModelParams = Field(default_factory=ScoreModelParams)
    decomposition: DecompositionParams = Field(default_factory=DecompositionParams)
    soscope: SoScopeParams = Field(default_factory=SoScopeParams)
