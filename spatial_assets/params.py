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
    """SpatialScope step 1 (nuclei segmentation); defaults as SpatialScope / StarDist's command line.

    Attributes
    ----------
    method : {"stardist", "watershed"}, default "stardist"
        Segmentation method.
    model : str, default "2D_versatile_he"
        StarDist registry name (needs the internet once) or a path to a local StarDist model folder.
    channel : {"auto", "rgb", "hematoxylin", "gray"}, default "auto"
        Which channel to feed the model ("hematoxylin" = rgb2hed's H channel, "gray" = luminance, "rgb" for a
        3-channel model); "auto" = RGB for a 3-channel model, hematoxylin for a 1-channel model or watershed.
    prob_thresh : float or None, default 0.2
        StarDist object probability threshold, in [0, 1]; None = the model's own (its ``thresholds.json``; the
        bundled H&E model is meant to run with them).
    nms_thresh : float or None, default 0.1
        StarDist non-maximum-suppression overlap threshold, in [0, 1]; None = the model's own.
    norm_percentiles : tuple of float, default (1.0, 99.8)
        Percentiles of the image intensity normalisation.
    scale : float, default 1.0
        Rescale the image by this factor before prediction (StarDist's ``scale``), e.g. when the model was
        trained on nuclei of another size in pixels; labels come back at the original resolution.
    tile_size : int, default 2048
        Tiled prediction: tile side in pixels (StarDist's ``n_tiles`` is derived from it); at least 256.
    max_cells_per_spot : int, default 20
        Cap on the cells kept per spot.
    max_capped_fraction : float, default 0.2
        When more than this fraction of QC-passing spots hold more nuclei than ``max_cells_per_spot``, the step
        warns and the ``few_spots_over_cell_cap`` check fails (the model usually over-segments then).
    nucleus_features : bool, default True
        Measure per-nucleus shape / stain / texture features (``segmentation.FEATURE_COLUMNS``) for the cells
        table (used by the morphology-aware labels).
    min_umi : float, default 500
        Spots with fewer UMIs fail QC.
    max_umi : float, default 50000
        Spots with more UMIs fail QC.
    fallback : {"watershed"} or None, default None
        Explicit opt-in to fall back to another method when the StarDist model cannot be obtained.
    """

    method: Literal["stardist", "watershed"] = "stardist"
    # "2D_versatile_he" (StarDist registry, needs the internet once) or a path to a local StarDist model folder.
    model: str = "2D_versatile_he"
    # For a 1-channel model: which channel to feed it. "hematoxylin" = rgb2hed's H channel; "gray" = luminance.
    channel: Literal["auto", "rgb", "hematoxylin", "gray"] = "auto"
    # StarDist thresholds (SpatialScope's 0.2 / 0.1); None = the model's own, optimised on its validation images
    # (thresholds.json of the model folder; the bundled H&E model is meant to run with them).
    prob_thresh: float | None = Field(0.2, ge=0, le=1)
    nms_thresh: float | None = Field(0.1, ge=0, le=1)
    norm_percentiles: tuple[float, float] = (1.0, 99.8)
    # Rescale the image by this factor before prediction (StarDist's ``scale``), e.g. when the model was trained
    # on nuclei of another size in pixels; labels come back at the original resolution.
    scale: float = Field(1.0, gt=0)
    # Tiled prediction: tile side in pixels (StarDist n_tiles is derived from it).
    tile_size: int = Field(2048, ge=256)
    max_cells_per_spot: int = Field(20, ge=1)
    # Warn (and fail the segmented_slide check) when more than this fraction of QC-passing spots hold more nuclei
    # than max_cells_per_spot: the cap is then dropping cells, usually because the model over-segments.
    max_capped_fraction: float = Field(0.2, ge=0, le=1)
    # Measure per-nucleus shape / stain / texture features (segmentation.FEATURE_COLUMNS) for the cells table.
    nucleus_features: bool = True
    min_umi: float = Field(500, ge=0)
    max_umi: float = Field(50_000, gt=0)
    # Explicit opt-in to fall back to another method when the StarDist model cannot be obtained.
    fallback: Literal["watershed"] | None = None


class CellTypingParams(_Params):
    """SpatialScope step 2 (RCTD full mode + Potts labels); defaults as RCTD / SpatialScope.

    Attributes
    ----------
    min_cells_per_type : int, default 25
        Fewest reference cells a type needs (see ``small_types``).
    max_cells_per_type : int, default 10000
        At most this many reference cells per type are used (seeded subsample).
    min_shared_genes : int, default 10
        Fewest genes the slide and the reference must share (``var_names``), checked when the slide is registered.
    gene_cutoff : float, default 0.000125
        RCTD's expression threshold of the bulk (platform-effect) gene set.
    fc_cutoff : float, default 0.5
        RCTD's log fold-change threshold of the bulk gene set.
    gene_cutoff_reg : float, default 0.0002
        Expression threshold of the regression (weights) gene set.
    fc_cutoff_reg : float, default 0.75
        Log fold-change threshold of the regression gene set.
    sigma_fit_spots : int, default 1000
        Spots sigma is fitted on (at least 10).
    sigma_fit_min_umi : float, default 300
        Spots with more UMIs are eligible for the sigma fit.
    nu : float, default 10.0
        Weight of the Potts prior.
    n_neighbors : int, default 10
        Nearest cells of each cell in the Potts graph.
    max_sweeps : int, default 8
        Maximum sweeps of iterated conditional modes.
    doublet_confidence_threshold : float, default 10.0
        Slide-seq (RCTD doublet mode): log-likelihood margin for a confident type.
    doublet_threshold : float, default 25.0
        Slide-seq: log-likelihood margin for calling a doublet rather than a singlet.
    doublet_offset : float or None, default None
        Slide-seq: distance (full-resolution pixels) between a doublet bead's two cells; None = a quarter of the
        median nearest-bead distance.
    small_types : {"error", "drop", "merge"}, default "error"
        Reference types with fewer than ``min_cells_per_type`` cells: "error" stops, "drop" removes their cells
        (a warning names them), "merge" relabels them to their class in ``obs[class_key]``
        (``references[].class_key``; types still too small after merging are dropped). Applied once, when the
        reference is registered, so the score model, typing and decomposition share one type list.
    morphology : {"auto", "on", "off"}, default "auto"
        Morphology-aware per-cell labels: "auto" uses the nuclei only when a permutation test shows they tell the
        spot's types apart (else the Potts labels stay); "on": always; "off": never.
    morphology_features : list of str, default ["nucleus_area", "nucleus_axis_ratio", "nucleus_h_mean"]
        Per-cell columns of the cells table used as nucleus features (absent columns: morphology not used).
    morphology_potts_mix : float, default 0.5
        Prior of a cell's type: ``(1 - a) x RCTD proportions + a x composition of the spot's Potts labels``; 0
        trusts the weights only, 1 the Potts labels' counts only.
    morphology_prior_floor : float, default 1e-3
        Floor of the prior per type: lower = morphology needs more evidence to pick a type the spot lacks.
    morphology_min_z : float, default 3.0
        z-score of the morphology gain against its permutation null that "auto" requires.
    morphology_permutations : int, default 19
        Shuffled refits of the null (cost: that many extra EM fits).
    morphology_min_gain : float, default 0.1
        Least gain over the permutation null (nats per cell) for "auto" to use the nuclei (an effect size).
    morphology_shrinkage : float, default 10.0
        Pseudo-cells pulling each type's feature covariance / mean to the pooled ones.
    morphology_assignment : {"posterior", "sinkhorn"}, default "posterior"
        "posterior": each cell's most probable type; "sinkhorn": posteriors held to each spot's prior composition.
    seed : int, default 0
        Seed of every random step of cell typing.
    """

    min_cells_per_type: int = Field(25, ge=1)
    max_cells_per_type: int = Field(10_000, ge=1)
    # Fewest genes slide and reference must share (var_names), checked when the slide is registered.
    min_shared_genes: int = Field(10, ge=1)
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
    """Cell-type-conditioned score model of the reference (SpatialScope's generative prior).

    Attributes
    ----------
    n_genes : int, default 2000
        Highly variable genes used when the reference has no ``var['Marker']`` column.
    max_cells_per_type : int, default 3000
        Training cells per type at most (seeded subsample).
    sigma_begin : float, default 100.0
        Largest noise level of the geometric schedule.
    sigma_end : float, default 0.01
        Smallest noise level.
    n_sigmas : int, default 232
        Number of noise levels.
    sampling_step : float, default 6.6e-6
        Base Langevin step size of unconditional sampling.
    steps_per_level : int, default 5
        Langevin steps per noise level (sampling and decomposition).
    decomposition_step : float or None, default None
        Decomposition step size; None = SpatialScope's rule (1e-5 when ``sigma_begin > 70``, else 1e-6).
    hidden : int, default 256
        Width of the residual MLP (256 keeps a Langevin step of 2,500 cells x 2,000 genes at ~0.1 s on one CPU
        core).
    n_blocks : int, default 3
        Residual FiLM blocks.
    lr : float, default 1e-4
        Adam learning rate.
    batch_size : int, default 256
        Cells per training step.
    grad_clip : float, default 1.0
        Gradient-norm clipping threshold.
    ema_decay : float, default 0.999
        Decay of the exponential moving average of the weights (the model used).
    train_steps : int, default 20000
        Training steps in all.
    save_every : int, default 1000
        Steps between resumable saves of the training state.
    mixed_precision : bool, default True
        Mixed precision on CUDA (bfloat16 where supported); ignored on CPU.
    seed : int, default 0
        Seed of the cell subsample, initial weights and per-step draws.
    early_stop_patience : int or None, default 4
        Training stops when the held-out denoising loss has not improved for this many evaluations
        (None = always run ``train_steps``); the checkpoint's config records the steps run and the reason.
    early_stop_min_delta : float, default 0.002
        Relative improvement of the held-out loss that counts as an improvement.
    eval_every : int, default 250
        Steps between evaluations of the held-out loss (EMA network, fixed seeded noise draws).
    holdout_fraction : float, default 0.1
        Fraction of the reference's training cells held out for the stop rule.
    quality_cells_per_type : int, default 100
        Reference cells per type compared with as many pseudo-cells by the checkpoint quality evaluation.
    quality_max_cells : int, default 2000
        Cells compared in all at most (the per-type count is lowered to fit; at least 2 per type).
    quality_time_budget_s : float or None, default 300.0
        Sampling-time budget of the quality evaluation, estimated from a short timed pilot: cells per type are
        lowered to fit, down to ``quality_min_cells_per_type`` (None = no budget); what was evaluated is recorded.
    quality_min_cells_per_type : int, default 20
        Fewest cells per type the time budget may lower the evaluation to (fewer make the AUC pure noise).
    quality_level_stride : int, default 1
        Noise-level stride of the quality evaluation's sampler (1 = the whole schedule; coarser fails good
        checkpoints).
    """

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
    # Stop rule: every `eval_every` steps the EMA network's denoising loss on held-out reference cells (a fixed,
    # seeded set of noise draws) is measured; training stops when it has not improved by a relative
    # `early_stop_min_delta` for `early_stop_patience` evaluations (None = always run train_steps).
    early_stop_patience: int | None = Field(4, ge=1)
    early_stop_min_delta: float = Field(0.002, ge=0)
    eval_every: int = Field(250, ge=1)
    holdout_fraction: float = Field(0.1, gt=0, lt=0.5)
    # Bounds of checkpoint_quality (pseudo-cells x reference cells): subsample and time budget (issue #13).
    quality_cells_per_type: int = Field(100, ge=2)
    quality_max_cells: int = Field(2000, ge=2)
    quality_time_budget_s: float | None = Field(300.0, gt=0)
    quality_min_cells_per_type: int = Field(20, ge=2)
    quality_level_stride: int = Field(1, ge=1)


class DecompositionParams(_Params):
    """SpatialScope step 3: decomposition of spots into their cells.

    Attributes
    ----------
    estimator : {"mixture", "langevin"}, default "mixture"
        "mixture": each cell is a posterior-weighted mix of its type's reference clusters given the spot's counts,
        with per-cell size factors and exact spot sums (needs the reference). "langevin": SpatialScope's annealed
        Langevin dynamics with the score model. Measured numbers of both in docs/ACCURACY.md.
    mixture_components : int, default 16
        k-means clusters of each type's reference cells (the mixture's components).
    mixture_iterations : int, default 30
        Mean-field rounds of the responsibilities and size factors.
    mixture_damping : float, default 0.5
        Damping of the responsibility updates (1 = none).
    mixture_temperature : float, default 0.2
        Exponent of the Poisson likelihood in the responsibilities (accounts for overdispersion).
    mixture_size_factors : bool, default True
        Fit a size factor per cell to its spot (multiplicative Poisson updates).
    mixture_size_shrink : float, default 0.0
        Log-shrinkage of the size factors towards 1 per round.
    mixture_library_prior : bool, default False
        Scale each cluster's profile by its reference cells' mean library size (relative to the reference's), so
        types / clusters with more RNA per cell take larger shares before the size factors are fitted.
    mixture_spatial_neighbours : int, default 0
        Spatial empirical prior: mix the cluster weights with those of the k nearest same-type cells (0 = off).
    mixture_spatial_weight : float, default 0.5
        Weight of the neighbours' responsibilities in that prior.
    n_replicates : int, default 3
        Independent Langevin runs per spot (their spread is reported per cell).
    max_retries : int, default 5
        Rounds of re-running the spots whose replicates came out non-finite (seeds ``seed + round``).
    sigma_power : float, default 1.0
        Weight of the spot likelihood term at level sigma is ``1 / sigma ** sigma_power``.
    leave_out_genes : list of str, default []
        Genes hidden from the spot likelihood (leave-genes-out validation / imputation).
    level_stride : int, default 1
        Use every k-th noise level only (1 = the whole schedule); for quick demos / tests.
    batch_cells : int, default 20000
        Cells per batch of score evaluations.
    seed : int, default 0
        Seed of the Langevin noise (and of the mixture's k-means).
    """

    estimator: Literal["mixture", "langevin"] = "mixture"
    # mixture prior: k-means clusters per type, mean-field rounds, damping, likelihood exponent (overdispersion)
    mixture_components: int = Field(16, ge=1)
    mixture_iterations: int = Field(30, ge=1)
    mixture_damping: float = Field(0.5, gt=0, le=1)
    mixture_temperature: float = Field(0.2, gt=0)
    # per-cell size factors fitted to the spot (multiplicative Poisson updates), log-shrinkage per round
    mixture_size_factors: bool = True
    mixture_size_shrink: float = Field(0.0, ge=0, lt=1)
    # clusters' relative reference library sizes as the prior scale of a cell's expression
    mixture_library_prior: bool = False
    # spatial empirical prior: mix the cluster weights with the responsibilities of the k nearest same-type cells
    # (0 = off), with this weight, then rerun the posterior
    mixture_spatial_neighbours: int = Field(0, ge=0)
    mixture_spatial_weight: float = Field(0.5, ge=0, le=1)
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
    """soScope resolution enhancement.

    Attributes
    ----------
    likelihood : {"nb", "poisson", "gaussian", "joint"}, default "nb"
        Likelihood of the spot values; "joint" takes the modality of each feature from ``var[modality_key]``.
    modality_key : str, default "feature_type"
        For "joint": the var column that tells the modality.
    protein_likelihood : {"poisson", "gaussian"}, default "poisson"
        For "joint": the likelihood of the non-RNA modality.
    n_subspots : int or None, default None
        Sub-spots per spot; None = from the platform (7 Visium, 9 square grid).
    hidden : int, default 128
        Hidden width of the networks.
    z_dim : int, default 128
        Latent dimension.
    heads : int, default 1
        Attention heads of the graph transformer layers.
    scale_kernel : float, default 10.0
        Edge kernel: the median edge distance gets weight ``1 / scale_kernel`` (> 1).
    vgae_epochs : int, default 400
        Epochs of the spot-level VGAE pre-training.
    epochs : int, default 400
        Epochs of the soScope enhancement.
    lr_vgae : float, default 1e-3
        Learning rate of the VGAE.
    lr : float, default 2e-3
        Learning rate of the enhancement (published: 5e-4, slower to move off the nuclei-split start; see
        docs/ACCURACY.md).
    n_genes : int or None, default None
        Enhance only the most variable features (variance of log1p of library-normalised values); None = all.
    image_features : {"squidpy", "none"}, default "squidpy"
        Image features of the sub-spots (squidpy's image features of the patches), or none.
    cnn_weights : str or None, default None
        Path of SmallCNN weights for CNN image embeddings instead.
    negative_edges_per_edge : int, default 1
        Random sub-spot pairs (negative edges) drawn per image-graph edge in each epoch's image regulariser.
    seed : int, default 0
        Seed of training.
    beta_start, beta_end : float, default 1e-3, 1e-3
        KL weight, exponential schedule from ``beta_start`` to ``beta_end``.
    gamma_start, gamma_end : float, default 1.0, 0.01
        Image-regulariser factor, decaying from ``gamma_start`` to ``gamma_end``.
    schedule_start_frac : float, default 0.5
        The schedules stay flat until this fraction of the epochs.
    image_weight : float, default 1.0
        Weight of the image regulariser (0 = off).
    reg_temperature : float, default 5.0
        Sigmoid temperature of the regulariser's cosine similarities.
    gaussian_scale_vgae, gaussian_scale : float, default 10.0, 1.0
        Gaussian likelihood: squared error divided by this scale (VGAE stage, soScope stage).
    grad_clip : float, default 10.0
        Gradient-norm clip of both stages.
    subspot_radius : float or None, default None
        Radius in pixels of the sub-spot image graph W; None = neighbouring sub-spots.
    squidpy_features : list of {"summary", "histogram", "texture"}, default all three
        squidpy image feature sets computed per sub-spot patch.
    init_decoder_from_vgae : bool, default False
        Start the enhancement decoder from the pre-trained VGAE's decoder.
    image_pca : int or None, default 8
        Image features are z-scored, then reduced to this many principal components (None = all), so ~105
        squidpy columns do not drown the nuclei features.
    image_feature_weight, nuclei_feature_weight : float, default 1.0, 1.0
        Total weight each feature block (image, nuclei) is scaled to.
    nuclei_offset : bool, default True
        Nuclei counts as a size factor: a sub-spot's expression is offset by log((count + pseudocount) / spot
        total), so the untrained model is the nuclei split and training refines the per-gene shares; False =
        soScope's flat offset (every sub-spot starts at spot / K).
    nuclei_pseudocount : float, default 0.01
        Pseudocount of that offset.
    nuclei_morphology_features : list of str, default ``segmentation.FEATURE_COLUMNS``
        Per-nucleus columns of the nuclei table (the segmentation's nucleus features) pooled per sub-spot (mean
        and standard deviation over its nuclei) as an extra sub-spot feature block; absent columns are skipped
        ([] = off).
    nuclei_morphology_weight : float, default 1.0
        Total weight that block is scaled to.
    nuclei_morphology : {"auto", "on", "off"}, default "auto"
        Whether that block is used: "auto" only when no typed nuclei (``type_profiles``) are given (with them the
        morphology is in the typed prior, or cell typing found it tells no type apart).
    typed_prior : {"auto", "on", "off"}, default "auto"
        With typed nuclei (``type_column``) and type-mean profiles, the offset is per gene: each sub-spot's share of
        the spot's sum over its nuclei of their type-mean profile (the typed-nuclei split), refined by training.
        "auto": not when the labels equal the table's ``potts_type`` for every nucleus in a spot (cell typing used no
        nucleus morphology, so the labels do not tell the nuclei of a spot apart); "off": the nuclei split.
    type_column : str, default "cell_type"
        Column of the nuclei table with each nucleus's type (the ``typed_cells`` labels).
    type_confidence_column : str or None, default None
        Column of the nuclei table with each label's confidence (e.g. ``typed_cells``' ``confidence``): a nucleus
        counts as ``c x its type's profile + (1 - c) x its spot's mean nucleus profile`` (used when the column is
        present). None = labels taken as certain (measured better per sub-spot, see docs/ACCURACY.md).
    conserve : bool, default True
        X = the model's split rescaled so each spot's sub-spots sum exactly to the spot (``layers['conserved']``);
        False = X is the likelihood mean (soScope's output, ``layers['model_mean']``).
    """

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
    # --- sub-spot features and output (this project's additions; see docs/ACCURACY.md, Sub-spots) ---
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
    # Typed-cell prior: with a type per nucleus and type-mean profiles, the offset is per gene, each sub-spot's share
    # of its spot's sum over its nuclei of their type-mean profile (the typed-nuclei split). See docs/ACCURACY.md.
    nuclei_morphology_features: list[str] = Field(
        default_factory=lambda: [
            "nucleus_area",
            "nucleus_eccentricity",
            "nucleus_axis_ratio",
            "nucleus_solidity",
            "nucleus_h_mean",
            "nucleus_h_sd",
            "nucleus_h_skew",
            "nucleus_h_contrast",
            "nucleus_h_gradient",
        ]
    )
    nuclei_morphology_weight: float = Field(1.0, ge=0)
    nuclei_morphology: Literal["auto", "on", "off"] = "auto"
    typed_prior: Literal["auto", "on", "off"] = "auto"
    type_column: str = "cell_type"
    type_confidence_column: str | None = None
    # X = the model's split rescaled so each spot's sub-spots sum exactly to the spot (layers['conserved']);
    # False: X = the likelihood mean (soScope's output, layers['model_mean']).
    conserve: bool = True


class Parameters(_Params):
    """All stage parameters: the ``parameters:`` section of ``dagster_project.yaml``.

    Attributes
    ----------
    segmentation : SegmentationParams
        Nuclei segmentation.
    cell_typing : CellTypingParams
        Cell typing.
    score_model : ScoreModelParams
        Score model of each reference.
    decomposition : DecompositionParams
        Langevin decomposition.
    soscope : SoScopeParams
        soScope enhancement.
    """

    segmentation: SegmentationParams = Field(default_factory=SegmentationParams)
    cell_typing: CellTypingParams = Field(default_factory=CellTypingParams)
    score_model: ScoreModelParams = Field(default_factory=ScoreModelParams)
    decomposition: DecompositionParams = Field(default_factory=DecompositionParams)
    soscope: SoScopeParams = Field(default_factory=SoScopeParams)
