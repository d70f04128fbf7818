"""SpatialScope step 3: decompose spots into single cells by annealed Langevin dynamics (Wan et al. 2023).

Every cell of a spot gets a log1p expression profile ``x + mu_type`` sampled from the cell-type-conditioned score
model (the prior), constrained so that the spot's cells sum to the spot (the likelihood). Spots are processed all
at once: spot sums are segment sums over cells (``torch.index_add_``), replicates are extra rows of one batch.

Scale: the slide is divided gene-wise by the platform effect and every spot is scaled to ``n_cells x`` the
reference's mean library size, so decomposed cells are in the reference's normalised scale (``expm1`` of its log1p
data). ``obs['spot_scale']`` maps raw slide counts into that scale: ``counts / platform_effect * spot_scale``.

The score model is duck-typed (see :class:`GaussianScoreModel` for the attributes used). No dagster import here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from .metrics import pearson_columns
from .params import DecompositionParams

CLIP_SPOT = 1.0  # spot residual r_s clipped to [-1, 1] (SpatialScope)
CLIP_CELL = 2.0  # per-cell spot term g_c clipped to [-2, 2] (SpatialScope)
EXP_CAP = 80.0  # x + mu is capped here before exp (float32 overflow); the clipped spot term is saturated anyway
EXPM1_MAX = float(np.log(np.finfo(np.float32).max))  # log1p results above this overflow expm1: non-finite
EXP_FLOOR = -60.0  # ... and floored here (exp(-60) ~ 1e-26: no denormal floats, which are ~100x slower on CPUs)

_MODEL_ATTRS = ("genes", "cell_types", "type_means", "sigmas", "decomposition_step", "steps_per_level",
                "ref_library_size", "score")


# ----------------------------------------------------------------------------------------------------------------
# An analytic score model (exact score), used by tests, benchmarks and as a network-free prior
# ----------------------------------------------------------------------------------------------------------------
class GaussianScoreModel:
    """Analytic prior with the score-model interface: log1p expression of a type-t cell = mu_t + N(0, diag(s_t^2)).

    The score of the residual perturbed with noise sigma is exact: ``-x / (s_t^2 + sigma^2)``.
    """

    def __init__(self, genes: Sequence[str], cell_types: Sequence[str], type_means, type_sd, *,
                 sigmas=None, cell_type_key: str = "cell_type", ref_library_size: float | None = None,
                 target_sum: float | None = None, decomposition_step: float | None = None,
                 sampling_step: float = 6.6e-6, steps_per_level: int = 5, device: str | torch.device = "cpu"):
        self.genes = [str(g) for g in genes]
        self.cell_types = [str(t) for t in cell_types]
        self.cell_type_key = cell_type_key
        self.device = torch.device(device)
        self.type_means = torch.as_tensor(np.asarray(type_means), dtype=torch.float32, device=self.device)
        sd = torch.as_tensor(np.asarray(type_sd), dtype=torch.float32, device=self.device)
        if sd.ndim == 0:
            sd = sd.expand_as(self.type_means)
        elif sd.ndim == 1:
            sd = sd[:, None].expand_as(self.type_means)
        if self.type_means.shape != (len(self.cell_types), len(self.genes)) or sd.shape != self.type_means.shape:
            raise ValueError(f"GaussianScoreModel: type_means / type_sd must be (n_types={len(self.cell_types)}, "
                             f"n_genes={len(self.genes)}), got {tuple(self.type_means.shape)} / {tuple(sd.shape)}")
        self.type_var = (sd ** 2).contiguous()
        if sigmas is None:
            sigmas = np.geomspace(100.0, 0.01, 232)
        self.sigmas = torch.as_tensor(np.asarray(sigmas), dtype=torch.float32, device=self.device)
        self.sampling_step = float(sampling_step)
        if decomposition_step is None:
            decomposition_step = 1e-5 if float(self.sigmas[0]) > 70 else 1e-6
        self.decomposition_step = float(decomposition_step)
        self.steps_per_level = int(steps_per_level)
        lib = torch.expm1(self.type_means).clamp_min(0).sum(1).mean().item()
        self.ref_library_size = float(ref_library_size if ref_library_size is not None else lib)
        self.target_sum = float(target_sum if target_sum is not None else self.ref_library_size)

    def score(self, x: torch.Tensor, type_idx: torch.Tensor, sigma: float) -> torch.Tensor:
        """Exact score of the noised residual: ``-x / (s_type^2 + sigma^2)``."""
        return x / self.type_var.index_select(0, type_idx).add(float(sigma) ** 2).neg_()

    def check_compatible(self, reference=None, cell_type_key=None, genes=None) -> None:
        """Raise ValueError naming what differs between this model and a reference / key / gene list."""
        if cell_type_key is not None and cell_type_key != self.cell_type_key:
            raise ValueError(f"score model: cell-type column is '{self.cell_type_key}', asked for '{cell_type_key}'")
        if genes is not None:
            missing = [g for g in self.genes if g not in set(map(str, genes))]
            if missing:
                raise ValueError(f"score model: {len(missing)} of its genes are missing, e.g. {missing[:5]}")
        if reference is not None:
            key = cell_type_key or self.cell_type_key
            if key not in reference.obs:
                raise ValueError(f"reference.obs has no column '{key}'")
            absent = sorted(set(reference.obs[key].astype(str)) - set(self.cell_types))
            if absent:
                raise ValueError(f"score model: reference types absent from the model: {absent[:10]}")

    @classmethod
    def from_reference(cls, reference: ad.AnnData, cell_type_key: str = "cell_type", *,
                       genes: Sequence[str] | None = None, target_sum: float | None = None,
                       min_sd: float = 0.05, **kwargs) -> "GaussianScoreModel":
        """Fit per-type means and per-gene standard deviations of log1p(normalised counts) of a reference.

        ``target_sum`` None keeps raw counts (log1p of counts); else each cell is normalised to that total first.
        """
        if cell_type_key not in reference.obs:
            raise ValueError(f"reference.obs has no column '{cell_type_key}' (columns: {list(reference.obs)})")
        ref = reference if genes is None else reference[:, list(genes)]
        X = ref.X.toarray() if sp.issparse(ref.X) else np.asarray(ref.X, dtype=float)
        X = X.astype(np.float64)
        if target_sum is not None:
            lib = X.sum(1, keepdims=True)
            X = X / np.where(lib > 0, lib, 1) * target_sum
        L = np.log1p(X)
        codes, types = pd.factorize(ref.obs[cell_type_key].astype(str), sort=True)
        n = np.bincount(codes, minlength=len(types)).astype(float)
        onehot = sp.csr_matrix((np.ones(len(codes)), (codes, np.arange(len(codes)))), shape=(len(types), len(codes)))
        mean = (onehot @ L) / n[:, None]
        var = (onehot @ L ** 2) / n[:, None] - mean ** 2
        sd = np.sqrt(np.clip(var, 0, None) * n[:, None] / np.maximum(n[:, None] - 1, 1))
        sd = np.maximum(sd, min_sd)
        return cls(list(ref.var_names), list(types), mean, sd, cell_type_key=cell_type_key,
                   ref_library_size=float(np.expm1(L).sum(1).mean()), target_sum=target_sum, **kwargs)


def _check_model(model) -> None:
    missing = [a for a in _MODEL_ATTRS if not hasattr(model, a)]
    if missing:
        raise TypeError(f"score model {type(model).__name__} lacks {missing}: expected the ScoreModel interface")
    T, G = len(model.cell_types), len(model.genes)
    if tuple(model.type_means.shape) != (T, G):
        raise ValueError(f"score model: type_means has shape {tuple(model.type_means.shape)}, expected "
                         f"(n_types={T}, n_genes={G})")
    s = model.sigmas.detach().cpu().numpy()
    if s.ndim != 1 or len(s) < 1 or not np.all(np.isfinite(s)) or np.any(s <= 0) or np.any(np.diff(s) > 0):
        raise ValueError("score model: sigmas must be positive, finite and descending; "
                         f"found {len(s)} values from {s[:1]} to {s[-1:]}")


# ----------------------------------------------------------------------------------------------------------------
# Inputs: spots of a range with their typed cells
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class DecompositionInput:
    """The spots of one range and their typed cells, on the score model's gene axis.

    ``counts``: (S, G) slide counts divided by the platform effect (0 for model genes absent from the slide);
    ``cells``: index cell id, columns spot, spot_idx (row in ``spots``), type_idx (row in model.cell_types),
    cell_type, x, y, sorted by spot; ``spots``: index spot name (slide order), columns n_cells, x, y.
    """

    genes: list[str]
    counts: np.ndarray
    spots: pd.DataFrame
    cells: pd.DataFrame
    in_slide: np.ndarray
    platform_effect: np.ndarray
    leave_out: list[str]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n_spots(self) -> int:
        return len(self.spots)

    @property
    def n_cells(self) -> int:
        return len(self.cells)


def _as_float_matrix(X, name: str) -> np.ndarray:
    X = X.toarray() if sp.issparse(X) else np.asarray(X)
    if X.dtype.kind not in "fiub":
        raise ValueError(f"{name}: expected numeric counts, found dtype {X.dtype}")
    return X.astype(np.float64)


def _check_counts(X, name: str) -> None:
    vals = X.data if sp.issparse(X) else np.asarray(X)
    if vals.size == 0:
        return
    if vals.dtype.kind not in "fiub":
        raise ValueError(f"{name}: expected numeric counts, found dtype {vals.dtype}")
    n_bad = int(np.count_nonzero(~np.isfinite(vals)))
    if n_bad:
        raise ValueError(f"{name}: expected finite counts, found {n_bad} NaN/inf values")
    mn = float(vals.min())
    if mn < 0:
        raise ValueError(f"{name}: expected non-negative counts, found minimum {mn:g}")


def _platform_effect(platform_effect, genes: list[str]) -> np.ndarray:
    """Platform effect per gene (NaN, 0 or inf -> 1; genes absent from the series -> 1)."""
    if platform_effect is None:
        return np.ones(len(genes))
    if not isinstance(platform_effect, pd.Series):
        raise ValueError(f"platform_effect: expected a pandas Series indexed by gene (var 'estimated_be'), "
                         f"found {type(platform_effect).__name__}")
    be = pd.to_numeric(platform_effect, errors="coerce")
    be.index = be.index.astype(str)
    if be.index.has_duplicates:
        raise ValueError(f"platform_effect: duplicated genes {sorted(set(be.index[be.index.duplicated()]))[:5]}")
    v = be.reindex(genes).to_numpy(dtype=float)
    neg = np.isfinite(v) & (v < 0)
    if neg.any():
        bad = [g for g, b in zip(genes, neg) if b]
        raise ValueError(f"platform_effect: expected non-negative ratios, found negative values for {bad[:5]}")
    return np.where(np.isfinite(v) & (v > 0), v, 1.0)


UNASSIGNED = "unassigned"  # the label cell typing gives cells it could not type


def prepare_spots(slide: ad.AnnData, cells: pd.DataFrame, model, platform_effect: pd.Series | None = None,
                  spot_range: tuple[int, int] | None = None, leave_out_genes: Sequence[str] = (), *,
                  cell_type_key: str | None = None, type_column: str = "cell_type") -> DecompositionInput:
    """Select the spots ``spot_range = (start, stop)`` (slide order; None = all) and their typed cells.

    ``cells``: DataFrame indexed by cell id with columns ``spot`` (slide obs name), ``type_column`` and optionally
    ``x``, ``y``. Cells whose spot is not in the slide are dropped and counted; spots of the range without cells, or
    with no counts on the genes used, are skipped and listed in ``info``. A range starting beyond the last spot
    gives an empty input (``info['empty_reason']``). ``cell_type_key``: if given, checked against the model's.
    """
    _check_model(model)
    if cell_type_key is not None and hasattr(model, "check_compatible"):
        model.check_compatible(cell_type_key=cell_type_key)
    if not isinstance(slide, ad.AnnData):
        raise ValueError(f"slide: expected an AnnData (spots x genes), found {type(slide).__name__}")
    if not isinstance(cells, pd.DataFrame):
        raise ValueError(f"cells: expected a pandas DataFrame, found {type(cells).__name__}")
    need = [c for c in ("spot", type_column) if c not in cells.columns]
    if need:
        raise ValueError(f"cells: missing column(s) {need}; found columns {list(cells.columns)}")
    if cells.index.has_duplicates:
        dup = cells.index[cells.index.duplicated()].astype(str)
        raise ValueError(f"cells: duplicated cell ids, e.g. {list(dup[:5])}")
    if slide.var_names.has_duplicates:
        dup = slide.var_names[slide.var_names.duplicated()]
        raise ValueError(f"slide.var_names: duplicated genes, e.g. {list(dup[:5])}")
    _check_counts(slide.X, "slide.X")

    genes = list(model.genes)
    slide_genes = pd.Index(slide.var_names.astype(str))
    col = slide_genes.get_indexer(genes)
    in_slide = col >= 0
    if not in_slide.any():
        raise ValueError(f"no genes shared between slide.var_names ({len(slide_genes)} genes, e.g. "
                         f"{list(slide_genes[:3])}) and the score model's genes ({len(genes)}, e.g. {genes[:3]})")
    leave_out = [str(g) for g in leave_out_genes]
    shared = set(np.asarray(genes)[in_slide])
    bad = [g for g in leave_out if g not in shared]
    if bad:
        raise ValueError(f"leave_out_genes: {bad[:10]} are not among the {len(shared)} genes shared by the slide "
                         f"and the score model")
    hidden = np.isin(genes, leave_out)
    if not (in_slide & ~hidden).any():
        raise ValueError("leave_out_genes: every shared gene is left out; at least one must constrain the spots")
    be = _platform_effect(platform_effect, genes)
    be[~in_slide] = 1.0

    n_total = slide.n_obs
    info: dict[str, Any] = {"slide_spots": int(n_total), "genes": len(genes),
                            "genes_in_slide": int(in_slide.sum()), "leave_out_genes": leave_out}
    if spot_range is None:
        start, stop = 0, n_total
    else:
        try:
            start, stop = (int(v) for v in spot_range)
        except (TypeError, ValueError):
            raise ValueError(f"spot_range: expected (start, stop) integers, found {spot_range!r}") from None
        if start < 0 or stop < start:
            raise ValueError(f"spot_range: expected 0 <= start <= stop, found ({start}, {stop})")
    info["spot_range"] = [start, stop]
    stop = min(stop, n_total)
    spot_names = pd.Index(slide.obs_names.astype(str))

    cell_spot = cells["spot"].astype(str).to_numpy()
    pos_in_slide = spot_names.get_indexer(cell_spot)
    not_in_slide = int(np.count_nonzero(pos_in_slide < 0))
    info["cells_not_in_slide"] = not_in_slide
    if spot_range is None and not_in_slide == len(cells) and len(cells):
        raise ValueError(f"cells: none of the {len(cells)} cells' spots are slide spots (e.g. cells['spot'] = "
                         f"{list(pd.unique(cell_spot))[:3]}, slide.obs_names e.g. {list(spot_names[:3])})")

    def _empty(reason: str) -> DecompositionInput:
        info.update(empty_reason=reason, spots=0, cells=0, spots_skipped_no_cells=[],
                    spots_skipped_zero_counts=[])
        return DecompositionInput(genes, np.zeros((0, len(genes))), pd.DataFrame(
            {"n_cells": np.zeros(0, int), "x": np.zeros(0), "y": np.zeros(0)}, index=pd.Index([], name="spot")),
            pd.DataFrame({"spot": [], "spot_idx": [], "type_idx": [], "cell_type": [], "x": [], "y": []}),
            in_slide, be, leave_out, info)

    if start >= n_total or start == stop:
        return _empty(f"spot range [{start}, {info['spot_range'][1]}) holds no spots: the slide has {n_total}")

    # cells of the range
    in_range = (pos_in_slide >= start) & (pos_in_slide < stop)
    # Spots with a cell that cell typing left 'unassigned' (e.g. a skipped spot) are skipped whole and reported:
    # decomposing only the typed cells of such a spot would give them the unassigned cells' counts.
    unassigned = cells[type_column].astype(str).to_numpy() == UNASSIGNED
    bad_spots = np.unique(cell_spot[in_range & unassigned])
    info["spots_skipped_unassigned_cells"] = bad_spots[:200].tolist()
    info["n_spots_skipped_unassigned_cells"] = int(len(bad_spots))
    if len(bad_spots):
        in_range &= ~np.isin(cell_spot, bad_spots)
    sel = cells.loc[in_range]
    types = sel[type_column]
    if types.isna().any():
        raise ValueError(f"cells['{type_column}']: {int(types.isna().sum())} cells of the range have no type, "
                         f"e.g. {list(sel.index[types.isna()].astype(str)[:5])}")
    types = types.astype(str).to_numpy()
    tix = pd.Index(model.cell_types).get_indexer(types)
    if (tix < 0).any():
        absent = sorted(set(types[tix < 0]))
        raise ValueError(f"cells['{type_column}']: cell types absent from the score model: {absent[:10]} "
                         f"({int((tix < 0).sum())} cells); the model knows {len(model.cell_types)} types, "
                         f"e.g. {list(model.cell_types)[:5]}")
    local = pos_in_slide[in_range] - start
    n_cells = np.bincount(local, minlength=stop - start)

    # counts of the range on the model's gene axis, divided by the platform effect
    Xr = slide.X[start:stop]
    Xr = Xr.toarray() if sp.issparse(Xr) else np.asarray(Xr)
    counts = np.zeros((stop - start, len(genes)))
    counts[:, in_slide] = Xr[:, col[in_slide]].astype(np.float64) / be[in_slide]
    observed = in_slide & ~hidden
    lib = counts[:, observed].sum(1)
    names = spot_names[start:stop]
    no_cells = n_cells == 0
    zero = (~no_cells) & (lib <= 0)
    keep = ~no_cells & ~zero
    info["spots_skipped_no_cells"] = [str(s) for s in names[no_cells]]
    info["spots_skipped_zero_counts"] = [str(s) for s in names[zero]]
    info["cells_in_zero_count_spots"] = int(n_cells[zero].sum())
    if not keep.any():
        return _empty(f"no spot of range [{start}, {stop}) has both cells and counts "
                      f"({int(no_cells.sum())} without cells, {int(zero.sum())} without counts)")

    new_idx = np.cumsum(keep) - 1
    cell_keep = keep[local]
    xy = np.asarray(slide.obsm["spatial"])[start:stop] if "spatial" in slide.obsm else np.full((stop - start, 2),
                                                                                                 np.nan)
    spots = pd.DataFrame({"n_cells": n_cells[keep], "x": xy[keep, 0].astype(float), "y": xy[keep, 1].astype(float)},
                         index=pd.Index(names[keep], name="spot"))
    sel = sel.loc[cell_keep]
    cell_df = pd.DataFrame({
        "spot": np.asarray(names)[local[cell_keep]],
        "spot_idx": new_idx[local[cell_keep]].astype(np.int64),
        "type_idx": tix[cell_keep].astype(np.int64),
        "cell_type": types[cell_keep],
        "x": pd.to_numeric(sel["x"], errors="coerce").to_numpy(float) if "x" in sel else np.nan,
        "y": pd.to_numeric(sel["y"], errors="coerce").to_numpy(float) if "y" in sel else np.nan,
    }, index=pd.Index(sel.index.astype(str), name="cell"))
    cell_df = cell_df.sort_values("spot_idx", kind="stable")
    info.update(spots=int(keep.sum()), cells=len(cell_df))
    return DecompositionInput(genes, counts[keep], spots, cell_df, in_slide, be, leave_out, info)


def _targets(inputs: DecompositionInput, model, hidden: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-cell-scaled spots times n_cells (S, G), the per-spot scale of raw/platform counts, the observed mask.

    Each spot is scaled so that its observed genes sum to ``n_cells x`` the reference library on those genes
    (the model's ``ref_library_size`` times the observed genes' share of the mean type profile).
    """
    observed = inputs.in_slide & ~hidden
    prof = torch.expm1(model.type_means.detach().float().cpu()).clamp_min(0).mean(0).numpy().astype(np.float64)
    frac = prof[observed].sum() / prof.sum() if prof.sum() > 0 else 1.0
    ref_lib = float(model.ref_library_size) * float(frac)
    n = inputs.spots["n_cells"].to_numpy(float)
    lib = inputs.counts[:, observed].sum(1)
    scale = ref_lib * n / lib
    return inputs.counts * scale[:, None], scale, observed


# ----------------------------------------------------------------------------------------------------------------
# The sampler
# ----------------------------------------------------------------------------------------------------------------
def spot_term(x: torch.Tensor, mu: torch.Tensor, seg: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, *,
              clip_spot: float = CLIP_SPOT, clip_cell: float = CLIP_CELL, out: torch.Tensor | None = None,
              seg_sum: torch.Tensor | None = None) -> torch.Tensor:
    """Per-cell spot term g (M, G) of SpatialScope's likelihood, all spots at once (segment sums).

    ``r_s = clip(sum_{c in s} (exp(x_c + mu_c) - 1) - y_s n_s, +-clip_spot) * mask`` with ``target`` = n_s (1 + y_s)
    (K, G) and ``seg`` (M,) the segment of each row; ``g_c = clip(exp(x_c + mu_c) r_s(c), +-clip_cell)``.
    ``out`` (M, G) and ``seg_sum`` (K, G) are optional work buffers.
    """
    e = torch.add(x, mu, out=out) if out is not None else x + mu
    e.clamp_(EXP_FLOOR, EXP_CAP).exp_()
    if seg_sum is None:
        seg_sum = torch.zeros_like(target)
    else:
        seg_sum.zero_()
    seg_sum.index_add_(0, seg, e)
    r = seg_sum.sub_(target).clamp_(-clip_spot, clip_spot).mul_(mask)
    return e.mul_(r.index_select(0, seg)).clamp_(-clip_cell, clip_cell)


def noise_levels(model, level_stride: int = 1) -> np.ndarray:
    """Indices of the noise levels used: every ``level_stride``-th, always ending on the last (sigma_end)."""
    L = len(model.sigmas)
    return np.arange(L - 1, -1, -int(level_stride))[::-1].copy()


def annealed_langevin(model, type_idx: torch.Tensor, *, seg: torch.Tensor | None = None,
                      target: torch.Tensor | None = None, n_seg: int | None = None,
                      spot_mask: torch.Tensor | None = None, levels: np.ndarray | None = None,
                      step: float | None = None, sigma_power: float = 1.0, seed: int = 0,
                      batch_cells: int = 20_000, clip_spot: float = CLIP_SPOT, clip_cell: float = CLIP_CELL,
                      timings: dict | None = None, log: Callable[[str], None] | None = None) -> torch.Tensor:
    """Annealed Langevin over rows (cells), returning log1p expression ``x + mu`` (M, G).

    Without ``target`` this samples the prior (no spot term). With it, rows belong to segments ``seg`` (spots)
    whose summed ``exp(x + mu) - 1`` must match ``target - n_cells`` i.e. ``target`` = n_s (1 + y_s) (K, G); genes
    where ``spot_mask`` is 0 get no spot term. ``step`` defaults to the model's decomposition step.
    """
    dev = model.type_means.device
    type_idx = type_idx.to(dev)
    M, G = len(type_idx), model.type_means.shape[1]
    sig = model.sigmas.detach().float().cpu().numpy()
    levels = noise_levels(model) if levels is None else np.asarray(levels)
    sigma_end = float(sig[-1])
    step = float(model.decomposition_step if step is None else step)
    gen = torch.Generator(device=dev)
    gen.manual_seed(int(seed))
    mu = model.type_means.float().index_select(0, type_idx)
    x = torch.randn(M, G, generator=gen, device=dev)
    score = torch.empty_like(x) if M > batch_cells else None
    noise = torch.empty_like(x)
    use_spot = target is not None
    if use_spot:
        seg = seg.to(dev)
        target = target.to(dev, torch.float32)
        n_seg = int(target.shape[0]) if n_seg is None else n_seg
        mask = torch.ones(G, device=dev) if spot_mask is None else spot_mask.to(dev, torch.float32)
        ssum = torch.empty(n_seg, G, device=dev)
        e = torch.empty_like(x)
    t_net = t_other = c_net = c_other = 0.0  # wall and main-thread CPU seconds
    n_steps = 0
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)  # honest timings

    def _score(sigma: float) -> torch.Tensor:
        nonlocal t_net, c_net
        t0, c0 = time.perf_counter(), time.thread_time()
        if M <= batch_cells:
            out = model.score(x, type_idx, sigma)
        else:
            out = score
            for i in range(0, M, batch_cells):
                out[i:i + batch_cells] = model.score(x[i:i + batch_cells], type_idx[i:i + batch_cells], sigma)
        sync()
        t_net += time.perf_counter() - t0
        c_net += time.thread_time() - c0
        return out

    def _spot_term() -> torch.Tensor:
        return spot_term(x, mu, seg, target, mask, clip_spot=clip_spot, clip_cell=clip_cell, out=e, seg_sum=ssum)

    with torch.no_grad():
        for li, lev in enumerate(levels):
            sigma = float(sig[lev])
            eta = step * (sigma / sigma_end) ** 2
            lam = 1.0 / sigma ** sigma_power
            for _ in range(int(model.steps_per_level)):
                sc = _score(sigma)
                t0, c0 = time.perf_counter(), time.thread_time()
                x.add_(sc, alpha=eta)
                if use_spot:
                    x.add_(_spot_term(), alpha=-eta * lam)
                x.add_(noise.normal_(generator=gen), alpha=math.sqrt(2 * eta))
                sync()
                t_other += time.perf_counter() - t0
                c_other += time.thread_time() - c0
                n_steps += 1
            if log is not None and (li + 1) % max(1, len(levels) // 4) == 0:
                log(f"decomposition: level {li + 1}/{len(levels)} (sigma {sigma:.3g}), {M} rows")
        # final denoising step at sigma_end
        sc = _score(sigma_end)
        t0, c0 = time.perf_counter(), time.thread_time()
        x.add_(sc, alpha=sigma_end ** 2)
        if use_spot:
            x.add_(_spot_term(), alpha=-sigma_end ** 2 / sigma_end ** sigma_power)
        x.add_(mu)
        t_other += time.perf_counter() - t0
        c_other += time.thread_time() - c0
    if timings is not None:
        timings["network_s"] = timings.get("network_s", 0.0) + t_net
        timings["other_s"] = timings.get("other_s", 0.0) + t_other
        timings["network_cpu_s"] = timings.get("network_cpu_s", 0.0) + c_net
        timings["other_cpu_s"] = timings.get("other_cpu_s", 0.0) + c_other
        timings["steps"] = timings.get("steps", 0) + n_steps + 1
    return x


# ----------------------------------------------------------------------------------------------------------------
# Decomposition
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class DecompositionResult:
    """``adata``: cells x model genes, X = posterior mean expression (reference scale); ``info``: the run's summary."""

    adata: ad.AnnData
    info: dict[str, Any]


def _segment_matrix(spot_idx: np.ndarray, n_spots: int) -> sp.csr_matrix:
    """Sparse (n_spots x n_cells) indicator: ``M @ cell_values`` = per-spot sums."""
    n = len(spot_idx)
    return sp.csr_matrix((np.ones(n), (spot_idx, np.arange(n))), shape=(n_spots, n))


def _empty_result(inputs: DecompositionInput, info: dict) -> DecompositionResult:
    obs = pd.DataFrame({"spot": pd.Series([], dtype=str), "x": np.zeros(0), "y": np.zeros(0),
                        "cell_type": pd.Series([], dtype=str), "replicate_spread": np.zeros(0),
                        "n_retries": np.zeros(0, np.int64), "n_finite_replicates": np.zeros(0, np.int64),
                        "spot_scale": np.zeros(0),
                        "spot_rel_error": np.zeros(0)}, index=pd.Index([], name="cell"))
    var = pd.DataFrame({"platform_effect": inputs.platform_effect, "in_slide": inputs.in_slide,
                        "left_out": np.isin(inputs.genes, info.get("leave_out_genes", []))},
                       index=pd.Index(inputs.genes, name="gene"))
    a = ad.AnnData(X=np.zeros((0, len(inputs.genes)), np.float32), obs=obs, var=var)
    a.uns["decomposition"] = info
    return DecompositionResult(a, info)


def decompose(inputs: DecompositionInput, model, params: DecompositionParams | None = None,
              device: str | torch.device | None = None, log: Callable[[str], None] | None = None, *,
              clip_spot: float = CLIP_SPOT, clip_cell: float = CLIP_CELL) -> DecompositionResult:
    """Decompose every spot of ``inputs`` into its cells (SpatialScope step 3) with ``params.n_replicates``.

    The score model must live on ``device`` (None = the model's device). Genes hidden from the spot term are
    ``inputs.leave_out`` plus ``params.leave_out_genes``; their recovery is scored against the spot values
    (``info['leave_out_spot_r']``). Cells whose result is not finite are re-run with their spots (whole spot
    replicates) up to ``params.max_retries`` rounds with seeds ``seed + round``; the rest are reported and NaN.
    """
    params = params or DecompositionParams()
    _check_model(model)
    if list(model.genes) != list(inputs.genes):
        raise ValueError(f"score model genes ({len(model.genes)}) differ from the inputs' ({len(inputs.genes)}): "
                         "prepare_spots was run with another checkpoint")
    if device is not None and torch.device(device).type != model.type_means.device.type:
        raise ValueError(f"device: asked for '{device}' but the score model is on '{model.type_means.device}'")
    genes = list(inputs.genes)
    extra = [g for g in params.leave_out_genes if g not in inputs.leave_out]
    bad = [g for g in extra if g not in set(np.asarray(genes)[inputs.in_slide])]
    if bad:
        raise ValueError(f"params.leave_out_genes: {bad[:10]} are not among the genes shared by slide and model")
    leave_out = list(inputs.leave_out) + extra
    hidden = np.isin(genes, leave_out)
    sig = model.sigmas.detach().float().cpu().numpy()
    levels = noise_levels(model, params.level_stride)
    info: dict[str, Any] = {k: v for k, v in inputs.info.items()}
    info.update(leave_out_genes=leave_out, replicates=int(params.n_replicates), seed=int(params.seed),
                levels=len(levels), levels_total=len(sig), level_stride=int(params.level_stride),
                steps_per_level=int(model.steps_per_level), decomposition_step=float(model.decomposition_step),
                sigma_power=float(params.sigma_power), sigma_begin=float(sig[levels[0]]),
                sigma_end=float(sig[-1]), device=str(model.type_means.device))
    if inputs.n_cells == 0:
        info.setdefault("empty_reason", "no cells to decompose")
        info.update(cells=0, spots=0, non_finite_cells=[], retry_rounds=0)
        return _empty_result(inputs, info)
    if not (inputs.in_slide & ~hidden).any():
        raise ValueError("leave_out_genes: every shared gene is left out; at least one must constrain the spots")

    t_start, cpu_start = time.perf_counter(), time.process_time()
    dev = model.type_means.device
    target_np, spot_scale, observed = _targets(inputs, model, hidden)
    S, C, G, R = inputs.n_spots, inputs.n_cells, len(genes), int(params.n_replicates)
    n = inputs.spots["n_cells"].to_numpy(np.float64)
    tgt = torch.as_tensor(target_np + n[:, None], dtype=torch.float32)  # n_s (1 + y_s)
    spot_idx = inputs.cells["spot_idx"].to_numpy(np.int64)
    type_idx = inputs.cells["type_idx"].to_numpy(np.int64)
    mask = torch.as_tensor(observed, dtype=torch.float32)
    timings: dict = {}

    def run(rows_r: np.ndarray, rows_c: np.ndarray, seed: int) -> torch.Tensor:
        """Rows (replicate, cell); segments = the (replicate, spot) pairs present, renumbered."""
        seg_full = rows_r * S + spot_idx[rows_c]
        useg, seg = np.unique(seg_full, return_inverse=True)
        return annealed_langevin(
            model, torch.as_tensor(type_idx[rows_c]), seg=torch.as_tensor(seg, device=dev),
            target=tgt[torch.as_tensor(useg % S)], spot_mask=mask, levels=levels, sigma_power=params.sigma_power,
            seed=seed, batch_cells=params.batch_cells, clip_spot=clip_spot, clip_cell=clip_cell,
            timings=timings, log=log).cpu()

    def finite_rows(v: torch.Tensor) -> np.ndarray:
        # finite on the expression scale: log1p values above ~88 overflow float32 expm1 and count as non-finite
        return (torch.isfinite(v).all(-1) & (v.amax(-1) < EXPM1_MAX)).numpy()

    def seg_of(r: np.ndarray, c: np.ndarray) -> np.ndarray:
        return r * S + spot_idx[c]

    rr = np.repeat(np.arange(R), C)
    cc = np.tile(np.arange(C), R)

    res = run(rr, cc, params.seed).reshape(R, C, G)
    finite = finite_rows(res)  # (R, C)
    n_retries = np.zeros(C, np.int64)
    retry_seeds = []
    rounds = 0
    while not finite.all() and rounds < params.max_retries:
        rounds += 1
        bad_r, bad_c = np.nonzero(~finite)
        bad_seg = np.unique(seg_of(bad_r, bad_c))
        redo = np.isin(seg_of(rr, cc), bad_seg)
        seed = int(params.seed) + rounds
        retry_seeds.append(seed)
        if log is not None:
            log(f"decomposition: retry {rounds}: {len(np.unique(bad_c))} non-finite cells, "
                f"{len(bad_seg)} spot replicates re-run")
        out = run(rr[redo], cc[redo], seed)
        res[torch.as_tensor(rr[redo]), torch.as_tensor(cc[redo])] = out
        n_retries[np.unique(cc[redo])] += 1
        finite = finite_rows(res)

    # posterior mean over finite replicates (in place: one (R, C, G) buffer)
    n_fin = finite.sum(0)
    w = torch.as_tensor(finite)[:, :, None]
    expr = res.expm1_().clamp_min_(0).masked_fill_(~w, 0)  # (R, C, G)
    denom = torch.as_tensor(np.maximum(n_fin, 1), dtype=torch.float32)[:, None]
    mean = (expr.sum(0) / denom).numpy().astype(np.float64)
    mean[n_fin == 0] = np.nan
    logv = expr.log1p_()
    logv.sub_(logv.sum(0) / denom).pow_(2).masked_fill_(~w, 0)
    var = logv.sum(0) / torch.as_tensor(np.maximum(n_fin - 1, 1), dtype=torch.float32)[:, None]
    spread = np.where(n_fin > 1, var.sqrt().mean(1).numpy().astype(np.float64), np.nan)
    del res, expr, logv
    non_finite = inputs.cells.index[n_fin == 0].astype(str).tolist()

    # reconstruction of the spots (observed genes) and recovery of hidden genes at spot level
    Mseg = _segment_matrix(spot_idx, S)
    sums = Mseg @ np.where(np.isfinite(mean), mean, 0.0)
    diff = (sums - target_np)[:, observed]
    tnorm = np.sqrt((target_np[:, observed] ** 2).sum(1))
    rel = np.sqrt((diff ** 2).sum(1)) / np.where(tnorm > 0, tnorm, 1)
    rel_all = float(np.sqrt((diff ** 2).sum()) / max(np.sqrt((target_np[:, observed] ** 2).sum()), 1e-30))
    held = inputs.in_slide & hidden
    held_r = pearson_columns(sums[:, held], target_np[:, held]) if held.any() else np.zeros(0)

    seconds, cpu_seconds = time.perf_counter() - t_start, time.process_time() - cpu_start
    steps = max(timings.get("steps", 1), 1)
    info.update(
        cells=C, spots=S, rows_per_step=R * C, retry_rounds=rounds, retry_seeds=retry_seeds,
        non_finite_cells=non_finite, cells_retried=int((n_retries > 0).sum()),
        reconstruction_rel_error=rel_all, reconstruction_rel_error_median_spot=float(np.median(rel)),
        leave_out_spot_r={str(g): float(r) for g, r in zip(np.asarray(genes)[held], held_r)},
        leave_out_spot_r_median=float(np.nanmedian(held_r)) if held.any() and np.isfinite(held_r).any()
        else float("nan"),
        seconds_total=seconds, cpu_seconds_total=cpu_seconds, langevin_steps=int(steps),
        seconds_per_step=(timings["network_s"] + timings["other_s"]) / steps,
        network_seconds_per_step=timings["network_s"] / steps, other_seconds_per_step=timings["other_s"] / steps,
        # CPU of the calling thread (equals the work done when torch runs on 1 thread; a load-independent figure)
        network_thread_cpu_seconds_per_step=timings["network_cpu_s"] / steps,
        other_thread_cpu_seconds_per_step=timings["other_cpu_s"] / steps,
        spots_per_second=S / seconds if seconds > 0 else float("nan"),
    )
    obs = pd.DataFrame({
        "spot": inputs.cells["spot"].to_numpy(str), "x": inputs.cells["x"].to_numpy(float),
        "y": inputs.cells["y"].to_numpy(float), "cell_type": inputs.cells["cell_type"].to_numpy(str),
        "replicate_spread": spread, "n_retries": n_retries, "n_finite_replicates": n_fin.astype(np.int64),
        "spot_scale": spot_scale[spot_idx], "spot_rel_error": rel[spot_idx],
    }, index=pd.Index(inputs.cells.index.astype(str), name="cell"))
    var = pd.DataFrame({"platform_effect": inputs.platform_effect, "in_slide": inputs.in_slide, "left_out": hidden},
                       index=pd.Index(genes, name="gene"))
    out = ad.AnnData(X=mean.astype(np.float32), obs=obs, var=var)
    out.uns["decomposition"] = info
    if log is not None:
        log(f"decomposition: {C} cells in {S} spots, {seconds:.1f} s, spot reconstruction error {rel_all:.3g}")
    return DecompositionResult(out, info)


# ----------------------------------------------------------------------------------------------------------------
# Baseline and evaluation
# ----------------------------------------------------------------------------------------------------------------
def baseline_type_mean(inputs: DecompositionInput, model, *, per_gene: bool = False,
                       leave_out_genes: Sequence[str] = ()) -> np.ndarray:
    """Each cell = its type's mean profile expm1(mu), scaled so that the spot's cells sum to the spot; (C, G).

    ``per_gene=False``: one factor per spot (the spot's observed total). ``per_gene=True``: each observed gene of
    the spot is split among its cells in proportion to their type means (hidden genes keep the per-spot factor).
    """
    hidden = np.isin(inputs.genes, list(inputs.leave_out) + list(leave_out_genes))
    target, _, observed = _targets(inputs, model, hidden)
    prof = torch.expm1(model.type_means.detach().float().cpu()).clamp_min(0).numpy().astype(np.float64)
    spot_idx = inputs.cells["spot_idx"].to_numpy(np.int64)
    cell = prof[inputs.cells["type_idx"].to_numpy(np.int64)]
    Mseg = _segment_matrix(spot_idx, inputs.n_spots)
    ssum = Mseg @ cell  # (S, G)
    tot = ssum[:, observed].sum(1)
    factor = target[:, observed].sum(1) / np.where(tot > 0, tot, 1)
    out = cell * factor[spot_idx, None]
    if per_gene:
        with np.errstate(invalid="ignore", divide="ignore"):
            share = cell / np.where(ssum > 0, ssum, 1)[spot_idx]
        n = inputs.spots["n_cells"].to_numpy(float)
        share = np.where(ssum[spot_idx] > 0, share, 1.0 / n[spot_idx, None])
        out[:, observed] = (share * target[spot_idx])[:, observed]
    return out


def evaluate_against_truth(result: DecompositionResult | ad.AnnData, truth: ad.AnnData,
                           genes: Sequence[str] | None = None, *, prediction: np.ndarray | None = None,
                           multi_cell_only: bool = False) -> dict[str, float]:
    """Compare decomposed cells with true cells (raw counts, obs names = cell ids) in the decomposition's scale.

    Truth is brought to the reference scale like the slide: ``counts / platform_effect * spot_scale``. Returns the
    median over genes of the Pearson r across cells (linear and log1p), the median over cells of the Pearson r
    across genes, and the relative error of per-spot sums. ``genes`` restricts the genes scored (e.g. held-out
    ones); ``prediction`` (cells x genes of the result) scores another estimate (e.g. a baseline) on the same cells.
    """
    a = result.adata if isinstance(result, DecompositionResult) else result
    if not isinstance(truth, ad.AnnData):
        raise ValueError(f"truth: expected an AnnData of cells x genes, found {type(truth).__name__}")
    common = a.obs_names[a.obs_names.isin(truth.obs_names)]
    if len(common) == 0:
        raise ValueError(f"truth: no cell ids shared with the decomposition (truth e.g. {list(truth.obs_names[:3])}, "
                         f"decomposed e.g. {list(a.obs_names[:3])})")
    gl = list(a.var_names[a.var["in_slide"].to_numpy(bool)]) if "in_slide" in a.var else list(a.var_names)
    gl = [g for g in gl if g in set(truth.var_names)]
    if genes is not None:
        missing = [g for g in genes if g not in set(gl)]
        if missing:
            raise ValueError(f"genes: {missing[:10]} are not in both the decomposition and the truth")
        gl = list(genes)
    rows = a.obs_names.get_indexer(common)
    pred = np.asarray(a.X if prediction is None else prediction, dtype=np.float64)[rows][:, a.var_names.get_indexer(gl)]
    t = truth[common, gl].X
    t = (t.toarray() if sp.issparse(t) else np.asarray(t)).astype(np.float64)
    be = a.var["platform_effect"].reindex(gl).to_numpy(float) if "platform_effect" in a.var else np.ones(len(gl))
    t = t / be * a.obs["spot_scale"].to_numpy(float)[rows, None]
    spot = a.obs["spot"].to_numpy(str)[rows]
    if multi_cell_only:
        _, inv, cnt = np.unique(spot, return_inverse=True, return_counts=True)
        keep = cnt[inv] > 1
        pred, t, spot = pred[keep], t[keep], spot[keep]
    ok = np.isfinite(pred).all(1)
    pred, t, spot = pred[ok], t[ok], spot[ok]
    gene_r = pearson_columns(pred, t)
    gene_r_log = pearson_columns(np.log1p(pred), np.log1p(t))
    cell_r = pearson_columns(pred.T, t.T)
    _, sinv = np.unique(spot, return_inverse=True)
    Mseg = _segment_matrix(sinv, int(sinv.max()) + 1 if len(sinv) else 0)
    ds, ts = Mseg @ pred, Mseg @ t
    spot_err = float(np.sqrt(((ds - ts) ** 2).sum()) / max(np.sqrt((ts ** 2).sum()), 1e-30))

    def med(v):
        return float(np.nanmedian(v)) if np.isfinite(v).any() else float("nan")

    return {"cells": int(len(pred)), "genes": len(gl), "gene_r_median": med(gene_r),
            "gene_r_log1p_median": med(gene_r_log), "cell_r_median": med(cell_r),
            "spot_rel_error": spot_err, "rmse_log1p": float(np.sqrt(np.mean((np.log1p(pred) - np.log1p(t)) ** 2)))}
